"""``lamina`` entry point: parse the command line, run a command, render errors.

Each command lives in its own module exposing ``register(subparsers)``; the
module's ``run(args, ui)`` turns the argparse namespace into typed options for
the library and returns an exit status.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from lamina import __version__
from lamina.errors import LaminaError, UsageError

# command -> module of lamina.cli that registers it.  Modules are imported only
# for the command being run: importing every command's libraries (rich, httpx,
# asyncio, sqlite...) costs more than unpacking a small image.
COMMANDS: dict[str, str] = {
    "unpack": "unpack", "repack": "repack", "new": "new", "config": "config",
    "insert": "insert", "tag": "tag", "rm": "tag", "ls": "ls", "stat": "stat",
    "gc": "gc", "pull": "pull", "push": "push", "serve": "serve", "import": "imports",
    "images": "images", "rmi": "images", "fsck": "fsck", "hooks": "hooks", "copy": "copy",
    "mount": "mount", "lazy-index": "mount", "umount": "umount", "drivers": "drivers",
    "share": "share",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message, hint=f"see '{self.prog} --help'")


def build_parser(command: str | None = None, *, commands: bool = True
                 ) -> argparse.ArgumentParser:
    """The parser for *command* alone when it is known, else for every command
    (none with *commands* false: ``lamina --version`` needs no command module)."""
    p = _Parser(prog="lamina", description="Store, unpack, repack and serve OCI image layers.")
    p.add_argument("--version", action="version", version=f"lamina {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    wanted = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(
        COMMANDS.values())) if commands else []
    for name in wanted:
        importlib.import_module(f"lamina.cli.{name}").register(sub)
    return p


def _term(signum: int, frame: FrameType | None) -> None:
    # turn SIGTERM into the same clean unwinding as Ctrl-C: staging is removed
    raise KeyboardInterrupt


def _raise_nofile() -> None:
    # a copy works on several layers at once, each holding the 256 fan-out directories
    # of the objects store open: more than a 1024 soft limit allows; like Go programs,
    # take the hard limit (the soft one only exists for select()-era programs)
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 16
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _term)
    _raise_nofile()
    args_list = list(sys.argv[1:] if argv is None else argv)
    json_mode = "--json" in args_list
    from lamina.cli.ui import UI
    ui = UI(json_mode=json_mode, quiet=json_mode or "--quiet" in args_list or "-q" in args_list)
    try:
        command = args_list[0] if args_list and not args_list[0].startswith("-") else None
        args = build_parser(command, commands=args_list != ["--version"]).parse_args(args_list)
        ui = UI(json_mode=getattr(args, "json", False), quiet=getattr(args, "quiet", False))
        return int(args.run(args, ui))
    except LaminaError as e:
        ui.error(e)
        return e.code
    except KeyboardInterrupt:
        ui.interrupted()
        return 130
