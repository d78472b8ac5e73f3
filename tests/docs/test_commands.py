"""Every command README.md and docs/*.md give runs as written on a fresh clone.

Cheap commands run for real (``recsys config show``, every documented command's ``--help``,
``make -n``, importing each benchmark from a foreign working directory without ``PYTHONPATH``).
The others are checked as far as they can be without their cost (the ``recsys`` ones parse
against the CLI: sub-commands, options and value types; files they name exist) and then
skipped with the reason; ``pytest tests/docs -rs`` lists them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer

from tests.docs.commands import REPO_ROOT, DocCommand, alternatives, documented_commands

BIN = Path(sys.executable).parent
COMMANDS = documented_commands()
# Run for real: cheap, no side effects on the data directory.
CHEAP_RECSYS = ({"config", "show"}, {"deploy", "render-config", "--check"})
# Benchmarks whose import still fails, and why (remove the entry with the fix).
KNOWN_BROKEN: dict[str, str] = {}
SKIP_REASONS = {
    "kubectl": "needs a Kubernetes cluster", "helm": "needs a Kubernetes cluster",
    "docker": "needs a Docker engine", "watch": "needs a Kubernetes cluster",
    "grep": "reads the output of the command before it",
    "prefect": "needs a Prefect server / work pool", "feast": "changes the Feast registry",
    "infra/services/services.sh": "starts PostgreSQL-backed servers",
    ".venv/bin/pytest": "runs a test suite",
}


def _root() -> click.Group:
    from recsys_platform.cli import app

    group = typer.main.get_command(app)
    assert isinstance(group, click.Group)
    return group


def _resolve(words: list[str]) -> tuple[click.Command, list[str], list[str]]:
    """The command a ``recsys`` word list names, its path and the remaining arguments."""
    command: click.Command = _root()
    path: list[str] = []
    rest = list(words)
    while isinstance(command, click.Group) and rest and rest[0].startswith("-"):
        # a group's own options before its sub-command (`recsys --config FILE train`)
        option = next((p for p in command.params if rest[0] in p.opts), None)
        if option is None:
            break
        del rest[: 1 if getattr(option, "is_flag", False) else 2]
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.get_command(click.Context(command), rest[0])
        assert sub is not None, f"`recsys {' '.join(path + rest[:1])}`: no such command"
        command, path = sub, path + [rest.pop(0)]
    return command, path, rest


def _options(command: click.Command) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)} \
        | {"--help"}


def _parse(command: click.Command, path: list[str], args: list[str]) -> None:
    """Parses ``args`` as click would (types, required options), invoking nothing."""
    parent = click.Context(_root(), info_name="recsys")
    command.make_context(" ".join(path), list(args), parent=parent)


def _check_recsys(cmd: DocCommand, words: list[str]) -> list[str]:
    """Checks one ``recsys`` command; returns the command paths it names (for ``--help``)."""
    if words[1:] == ["..."]:
        return []
    paths = []
    for form in alternatives(words[1:]):
        command, path, rest = _resolve(form)
        paths.append(path)
        named = {w.strip("[]").split("=")[0] for w in rest if w.strip("[").startswith("-")}
        unknown = named - _options(command)
        assert not unknown, f"{cmd.source}: `recsys {' '.join(path)}` has no {sorted(unknown)}"
        if not cmd.synopsis and (rest or not cmd.inline):
            _parse(command, path, rest)
    return paths


def _repo_paths(words: list[str]) -> list[str]:
    tops = {p.name for p in REPO_ROOT.iterdir()}
    return [w for w in words if re.fullmatch(r"[\w.-]+(/[\w.-]+)*", w) and "/" in w
            and w.split("/")[0] in tops]


def _import_check(script: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    path = REPO_ROOT / script
    # As `python <script>` does: the script's own folder first on sys.path, nothing else.
    code = (f"import runpy, sys; sys.path.insert(0, {str(path.parent)!r}); "
            f"runpy.run_path({str(path)!r}, run_name='docs_check')")
    return subprocess.run([sys.executable, "-c", code], cwd=Path("/"), env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("cmd", COMMANDS, ids=[f"{c.source} {c.text[:60]}" for c in COMMANDS])
def test_documented_command(cmd: DocCommand) -> None:
    parts = cmd.parts()
    if not parts:
        pytest.skip("a shell variable assignment")
    skipped: list[str] = []
    for words in parts:
        if words[0] == ".venv/bin/recsys":
            words = ["recsys", *words[1:]]
        head = words[0]
        if head == "recsys":
            _check_recsys(cmd, words)
            if set(words[1:]) in CHEAP_RECSYS:
                out = subprocess.run([str(BIN / "recsys"), *words[1:]], cwd=REPO_ROOT,
                                     capture_output=True, text=True, timeout=300)
                assert out.returncode == 0, f"{cmd.source}: {cmd.text}\n{out.stderr[-2000:]}"
            else:
                skipped.append(f"`{' '.join(words)}` (expensive or long-running; it parses "
                               "against the CLI)")
        elif head == "make":
            out = subprocess.run(["make", "-n", *words[1:]], cwd=REPO_ROOT,
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, f"{cmd.source}: make -n {words[1:]}: {out.stderr}"
            skipped.append(f"`{cmd.text}` (expensive; `make -n` passed)")
        elif head in ("python", ".venv/bin/python") and words[1:2] == ["-m"]:
            assert importlib.util.find_spec(words[2]) is not None, f"no module {words[2]}"
            skipped.append(f"`{cmd.text}` (long-running)")
        elif head.startswith("benchmarks/") or (head.endswith("python") and len(words) > 1
                                                and words[1].startswith("benchmarks/")):
            script = head if head.startswith("benchmarks/") else words[1]
            out = _import_check(script)
            if out.returncode != 0 and script in KNOWN_BROKEN:
                pytest.xfail(f"{script}: {KNOWN_BROKEN[script]}")
            assert out.returncode == 0, f"{cmd.source}: importing {script} from another " \
                                        f"directory fails:\n{out.stderr[-2000:]}"
            skipped.append(f"`{cmd.text}` (a benchmark; it imports from any directory)")
        else:
            reason = next((r for k, r in SKIP_REASONS.items() if head.endswith(k)), None)
            assert reason, f"{cmd.source}: no rule for `{cmd.text}`; add one to this test"
            for path in _repo_paths(words) if head != "prefect" else []:  # deployment names
                assert (REPO_ROOT / path).exists(), f"{cmd.source}: {path} does not exist"
            skipped.append(f"`{' '.join(words)}` ({reason})")
    if skipped:
        pytest.skip("; ".join(skipped))


def test_every_documented_command_answers_help() -> None:
    """``recsys <command> --help`` for each command path the docs name, in one child process
    (the CLI's callback configures logging and settings; this process keeps its own)."""
    paths = sorted({" ".join(path) for cmd in COMMANDS for words in cmd.parts()
                    if words[0] in ("recsys", ".venv/bin/recsys")
                    for path in _check_recsys(cmd, words)})
    code = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from recsys_platform.cli import app\n"
        "runner = CliRunner()\n"
        "out = {p: runner.invoke(app, [*p.split(), '--help']).exit_code for p in sys.argv[1:]}\n"
        "print(json.dumps(out))\n")
    out = subprocess.run([sys.executable, "-c", code, *paths], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    codes = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(paths) > 20 and codes == {p: 0 for p in paths}


def test_the_console_script_runs_from_any_directory(tmp_path: Path) -> None:
    out = subprocess.run([str(BIN / "recsys"), "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "demo" in out.stdout, out.stderr
