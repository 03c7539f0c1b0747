"""The command table that lets ``lamina`` import only the command being run."""

from __future__ import annotations

import argparse
import subprocess
import sys

from lamina.cli.main import COMMANDS, build_parser


def _choices(p: argparse.ArgumentParser) -> set[str]:
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_every_registered_command_is_in_the_table() -> None:
    assert _choices(build_parser()) == set(COMMANDS)


def test_each_command_parser_registers_its_command() -> None:
    for name in COMMANDS:
        assert name in _choices(build_parser(name)), name


def _python(code: str) -> list[str]:
    """The stdout lines of *code* run in a fresh interpreter (nothing imported yet)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.splitlines()


def test_unpack_does_not_import_other_commands_libraries() -> None:
    assert _python("import sys; from lamina.cli.main import build_parser; "
                   "build_parser('unpack'); print(','.join(m for m in ('httpx', 'asyncio', "
                   "'sqlite3', 'lamina.store', 'lamina.ipc') if m in sys.modules))") == [""]


def test_version_imports_no_command() -> None:
    out = _python("import sys; from lamina.cli.main import main\n"
                  "try:\n    main(['--version'])\nexcept SystemExit as e:\n"
                  "    assert e.code == 0\n"
                  "print(sorted(m for m in sys.modules if m.startswith('lamina.cli.')))")
    assert out[0].startswith("lamina ")
    assert out[1] == "['lamina.cli.main', 'lamina.cli.ui']"
