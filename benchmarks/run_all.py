"""`make bench`: runs every benchmarks/bench_*.py and records their output in docs/benchmarks.md.

Each script prints its own measurements next to a floor measured in the same run; this runner
only times them and writes one table (machine, date, each script's lines) into the section
between the markers below, leaving the hand-written sections of the file alone.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
TIMEOUT_S = int(os.environ.get("BENCH_TIMEOUT_S", "900"))
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Library progress printed to stdout (Feast's materialize): not a measurement.
NOISE = re.compile(r"^(Materializing \d+ feature views .*|[\w-]+:)$")


def measurements(lines: list[str]) -> list[str]:
    """The script's own lines: colour codes and library progress removed."""
    clean = (ANSI.sub("", line).strip() for line in lines)
    return [line for line in clean if line and not NOISE.match(line)]


def run(script: Path) -> tuple[str, float, list[str]]:
    start = time.perf_counter()
    try:
        # The repository root on the path: scripts share fixtures with the tests (tests.model).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        out = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True,
                             text=True, timeout=TIMEOUT_S, env=env)
        lines = measurements(out.stdout.splitlines())
        status = "ok" if out.returncode == 0 else f"failed (exit {out.returncode})"
        if out.returncode != 0:
            lines += out.stderr.strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        status, lines = f"timed out after {TIMEOUT_S}s", []
    return status, time.perf_counter() - start, lines


def previous_rows() -> dict[str, str]:
    """The table rows of the last run, by script name (kept by ``--only``)."""
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        return {}
    section = text[text.index(BEGIN):text.index(END)]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `bench_"):
            head, _, cell = line[:-2].rpartition(" | ")
            rows[line.split("`")[1]] = f"{head} | {'<br>'.join(measurements(cell.split('<br>')))} |"
    return rows


def main(argv: list[str]) -> int:
    """Runs every benchmark, or with ``--only NAME...`` those and keeps the other rows."""
    only = set(argv[argv.index("--only") + 1:]) if "--only" in argv else set()
    scripts = sorted(p for p in (ROOT / "benchmarks").glob("bench_*.py"))
    kept = previous_rows() if only else {}
    rows = []
    failed = 0
    for script in scripts:
        if only and script.name not in only and script.stem not in only:
            if script.name in kept:
                rows.append(kept[script.name])
            continue
        print(f"== {script.name}", flush=True)
        status, seconds, lines = run(script)
        failed += status != "ok"
        for line in lines:
            print("   " + line)
        cell = "<br>".join(line.replace("|", "\\|") for line in lines) or "-"
        when = f"{datetime.now(UTC):%H:%M} UTC" if only else ""
        rows.append(f"| `{script.name}` | {status} | {seconds:.0f} s {when}".rstrip()
                    + f" | {cell} |")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    table = "\n".join([
        BEGIN,
        f"Last `make bench`: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine}"
        + (f" (re-ran {', '.join(sorted(only))}; other rows from the previous run)."
           if only else "."),
        "",
        "| script | status | wall | output (ratios are against the floor of the same run) |",
        "|---|---|---|---|",
        *rows,
        END,
    ])
    text = DOC.read_text()
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + table + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Latest run of every benchmark\n\n" + table + "\n"
    DOC.write_text(text)
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
