"""Lines of a CLI run's output that are not the project's own (issue 15: at most 20 in a demo).

The project's own output is its Rich tables, rules, progress and prints, and its log records
(``<time> LEVEL recsys_...: ...``). What is counted here is what libraries write past the
CLI's quiet console: records of other loggers (the CLI's format, Ray's, Serve's), Python
warnings and the source line printed under them, tracebacks, Ray's ``(raylet)``/``(pid=...)``
relays, tqdm bars, MLflow's and Prefect's own prints. The project's INFO records are counted
apart (the demo shows them only with ``-v``).

    .venv/bin/python tests/docs/demo_output.py demo.log   # prints the count and the lines
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_STAMP = r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:[,.]\d+)?"
_LEVEL = r"(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)"
PROJECT_RECORD = re.compile(rf"^{_STAMP}\s+{_LEVEL}\s+(?:recsys_\w+|__main__)[.:\s]")
WARNING = re.compile(r"^\S+\.py:\d+: \w*Warning\b")  # warnings.showwarning's first line
FOREIGN = [
    re.compile(rf"^{_STAMP}\s+{_LEVEL}\s"),  # a record in the CLI's format, not ours
    re.compile(rf"^{_LEVEL}\s+{_STAMP}"),  # Serve's format
    re.compile(rf"^{_STAMP}\s+{_LEVEL}\s+\S+\.py:\d+ --"),  # Ray's
    WARNING,
    re.compile(r"^\S*Warning: "),
    re.compile(r"^Traceback \(most recent call last\)"),
    re.compile(r"^(?:\x1b\[\d+m)?\((?:raylet|pid=|\w+ pid=)"),  # Ray's relay of worker output
    re.compile(r"\d+%\|"),  # tqdm
    re.compile(r"^(?:Successfully registered model|Created version|Registered model .* already)"),
    re.compile(r"^(?:Finished in state|HTTP Request: |Starting temporary server|Stopping temporary"
               r" server)"),  # Prefect
    re.compile(r"^Downloading artifacts"),
]


def classify(text: str) -> tuple[list[str], list[str]]:
    """(library lines, project INFO records) of ``text`` (stdout and stderr together). The
    indented lines right under a foreign line (a warning's source line, a traceback's frames)
    count too."""
    foreign: list[str] = []
    project: list[str] = []
    inside = warning = False
    for line in text.splitlines():
        if warning:  # a warning's message runs to the indented source line printed under it
            foreign.append(line)
            warning = not line[:1].isspace()
            continue
        if PROJECT_RECORD.match(line):
            inside = False
            if " INFO " in line[:40] or " DEBUG " in line[:40]:
                project.append(line)
            continue
        if any(p.search(line) for p in FOREIGN):
            foreign.append(line)
            inside = True
            warning = bool(WARNING.match(line))
        elif inside and line[:1].isspace() and line.strip() and line.lstrip()[:1] not in "│┃":
            foreign.append(line)
        else:
            inside = False
    return foreign, project


def main() -> None:
    foreign, project = classify(Path(sys.argv[1]).read_text(errors="replace"))
    for line in foreign:
        print(f"library: {line[:160]}")  # noqa: T201
    for line in project:
        print(f"project INFO: {line[:160]}")  # noqa: T201
    print(f"{len(foreign)} library lines, {len(project)} project INFO records")  # noqa: T201


if __name__ == "__main__":
    main()
