"""``lamina`` entry point: parse the command line, run a command, render errors.

Each command lives in its own module exposing ``register(subparsers)``; the
module's ``run(args, ui)`` turns the argparse namespace into typed options for
the library and returns an exit status.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from lamina import __version__
from lamina.cli import config as config_cmd
from lamina.cli import fsck as fsck_cmd
from lamina.cli import gc as gc_cmd
from lamina.cli import images as images_cmd
from lamina.cli import imports as import_cmd
from lamina.cli import insert as insert_cmd
from lamina.cli import ls as ls_cmd
from lamina.cli import new as new_cmd
from lamina.cli import pull as pull_cmd
from lamina.cli import push as push_cmd
from lamina.cli import repack as repack_cmd
from lamina.cli import serve as serve_cmd
from lamina.cli import stat as stat_cmd
from lamina.cli import tag as tag_cmd
from lamina.cli import unpack as unpack_cmd
from lamina.cli.ui import UI
from lamina.errors import LaminaError, UsageError

COMMANDS = [unpack_cmd, repack_cmd, new_cmd, config_cmd, insert_cmd, tag_cmd, ls_cmd,
            stat_cmd, gc_cmd, pull_cmd, push_cmd, serve_cmd, import_cmd, images_cmd, fsck_cmd]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message, hint=f"see '{self.prog} --help'")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lamina", description="Store, unpack, repack and serve OCI image layers.")
    p.add_argument("--version", action="version", version=f"lamina {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for mod in COMMANDS:
        mod.register(sub)
    return p


def _term(signum: int, frame: FrameType | None) -> None:
    # turn SIGTERM into the same clean unwinding as Ctrl-C: staging is removed
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _term)
    args_list = list(sys.argv[1:] if argv is None else argv)
    json_mode = "--json" in args_list
    ui = UI(json_mode=json_mode, quiet=json_mode or "--quiet" in args_list or "-q" in args_list)
    try:
        args = build_parser().parse_args(args_list)
        ui = UI(json_mode=getattr(args, "json", False), quiet=getattr(args, "quiet", False))
        return int(args.run(args, ui))
    except LaminaError as e:
        ui.error(e)
        return e.code
    except KeyboardInterrupt:
        ui.interrupted()
        return 130
