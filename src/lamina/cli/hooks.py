"""``lamina hooks``: the hooks configured for each event, in the order they run."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lamina.cli.ui import UI


def hooks_arg(p: argparse.ArgumentParser) -> None:
    """``--hooks FILE`` (repeatable), read after /etc and $XDG_CONFIG_HOME hooks.toml."""
    p.add_argument("--hooks", action="append", default=[], metavar="FILE",
                   help="hooks.toml to use after /etc/lamina/hooks.toml and "
                        "$XDG_CONFIG_HOME/lamina/hooks.toml (repeatable)")


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "hooks", help="list the configured hooks",
        description="List the hooks of /etc/lamina/hooks.toml, "
                    "$XDG_CONFIG_HOME/lamina/hooks.toml and --hooks FILE per event, in the "
                    "order they run.")
    hooks_arg(p)
    p.add_argument("--json", action="store_true", help="print a JSON list on stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ui: UI) -> int:
    from lamina.hooks import EVENTS, HookOptions, default_files, load_hooks

    hooks = load_hooks(HookOptions(files=tuple(args.hooks)))
    if args.json:
        ui.emit_json([h.to_json() for h in hooks])
        return 0
    lines = []
    for event in EVENTS:
        mine = [h for h in hooks if h.event == event]
        for h in mine:
            when = []
            if h.media_types:
                when.append("media type " + "|".join(h.media_types))
            when.extend(f"{k}={v}" for k, v in h.annotations.items())
            lines.append(f"{event:22} {' '.join([h.path, *h.args])}  (timeout "
                         f"{h.timeout:g}s{'; when ' + ', '.join(when) if when else ''}; "
                         f"from {h.source})")
    if not lines:
        files = [*default_files(), *args.hooks]
        ui.info(f"no hooks configured (looked in {', '.join(files)})")
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()
    return 0
