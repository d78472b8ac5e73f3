"""The shell commands README.md and docs/*.md give, extracted and classified.

Commands come from ```bash fences (one per line, ``\\`` continuations joined, ``# comments``
dropped) and from inline code spans that start like a command (``recsys ...``, ``make ...``,
``.venv/bin/python ...``, ``benchmarks/bench_*.py ...``). A command with placeholders
(``N``, ``FILE``, ``[--opt]``, ``a\\|b``, ``...``) is a *synopsis*: it is checked against the
CLI's options rather than run. ``python tests/docs/commands.py`` prints the list.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/*.md")

_FENCE = re.compile(r"^```(\w*)\s*$")
_SPAN = re.compile(r"`([^`\n]+)`")
_COMMAND_START = re.compile(
    r"^(?:[A-Z_]+=\S+ )*(?:recsys |make |\.venv/bin/\S+|python |feast |prefect |helm |kubectl |"
    r"docker |infra/services/\S+\.sh|benchmarks/bench_\w+\.py)")
# Upper-case words and shapes that stand for a value the reader supplies.
_PLACEHOLDER = re.compile(r"(^|[\s=])(?:[A-Z][A-Z_]*|\.\.\.|\"\.\.\.\")(?=$|\s)|\[|\\\||<[^>]+>")


@dataclass(frozen=True)
class DocCommand:
    """One documented command and where it is written."""

    text: str
    source: str  # "docs/stream.md:144"
    synopsis: bool
    inline: bool = False  # a code span in prose (may name a command without its arguments)

    def parts(self) -> list[list[str]]:
        """The words of each command of a ``a && b`` or ``a | b`` line, without ``VAR=value``
        prefixes (shell-split; ``\\|`` of a synopsis stays an alternative)."""
        text = self.text.replace("\\|", "\x00")
        out = []
        for part in re.split(r"\s(?:&&|\|)\s", text):
            words = [w.replace("\x00", "|") for w in shlex.split(part)]
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words.pop(0)
            if words:
                out.append(words)
        return out


def _strip_comment(line: str) -> str:
    # A '#' that starts a word starts a comment (the fenced blocks use `cmd   # what it does`).
    return re.split(r"(?:^|\s)#", line, maxsplit=1)[0].rstrip()


def _fenced(path: Path, rel: str) -> list[DocCommand]:
    out: list[DocCommand] = []
    in_bash, pending, start = False, "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = _FENCE.match(line.strip())
        if fence:
            in_bash = not in_bash and fence.group(1) in ("bash", "sh", "shell", "console")
            if not in_bash and fence.group(1):  # an opening fence of another language
                in_bash = False
            continue
        if not in_bash:
            continue
        text = _strip_comment(line)
        if not pending:
            start = number
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        text = (pending + text).strip()
        pending = ""
        if text:
            out.append(DocCommand(" ".join(text.split()), f"{rel}:{start}",
                                  bool(_PLACEHOLDER.search(text))))
    return out


def _inline(path: Path, rel: str) -> list[DocCommand]:
    out: list[DocCommand] = []
    in_fence = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if _FENCE.match(line.strip()):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for span in _SPAN.findall(line):
            span = span.strip()
            if _COMMAND_START.match(span) and not span.endswith("/"):
                out.append(DocCommand(span, f"{rel}:{number}", bool(_PLACEHOLDER.search(span)),
                                      inline=True))
    return out


def documented_commands(root: Path = REPO_ROOT) -> list[DocCommand]:
    """Every command of the docs, first occurrence of each text kept."""
    seen: dict[str, DocCommand] = {}
    for pattern in DOCS:
        for path in sorted(root.glob(pattern)):
            rel = path.relative_to(root).as_posix()
            for command in _fenced(path, rel) + _inline(path, rel):
                seen.setdefault(command.text, command)
    return list(seen.values())


def alternatives(words: list[str]) -> list[list[str]]:
    """The forms of a synopsis: ``serve up|down|recommend USER_ID`` -> ``serve up``,
    ``serve down``, ``serve recommend USER_ID`` (``|`` separates whole alternatives after the
    words they share)."""
    first = next((i for i, w in enumerate(words) if "|" in w and not w.startswith("-")), None)
    if first is None:
        return [list(words)]
    shared, rest = words[:first], " ".join(words[first:])
    return [shared + option.split() for option in rest.split("|")]


def main() -> None:
    for command in documented_commands():
        kind = "synopsis" if command.synopsis else "command"
        print(f"{command.source:28} {kind:8} {command.text}")


if __name__ == "__main__":
    main()
