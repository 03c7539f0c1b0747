"""``lamina images`` and ``lamina rmi``: list and remove the store's images (refs)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from lamina.cli.common import open_store, store_arg
from lamina.cli.ui import UI
from lamina.store.ids import parse_ref


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "images", help="list the images in the store",
        description="Print the store's refs: name, manifest digest, platform, layer count "
                    "and compressed size.")
    store_arg(p)
    p.add_argument("--json", action="store_true", help="print a JSON list on stdout")
    p.set_defaults(run=run)

    r: argparse.ArgumentParser = sub.add_parser(
        "rmi", help="remove images from the store (their content stays until 'lamina gc')",
        description="Remove the refs NAME[:TAG]; run 'lamina gc' to delete the content no "
                    "other image or in-use extraction needs.")
    r.add_argument("names", nargs="+", metavar="NAME[:TAG]")
    store_arg(r)
    r.add_argument("-q", "--quiet", action="store_true")
    r.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    r.set_defaults(run=run_rmi)


def run(args: argparse.Namespace, ui: UI) -> int:
    with open_store(args.store) as store:
        refs = store.images()
    if args.json:
        ui.emit_json([r.to_json() for r in refs])
        return 0
    rows = [("NAME", "MANIFEST", "PLATFORM", "LAYERS", "SIZE", "IMPORTED")]
    rows += [(r.name, r.manifest[7:19], r.platform, str(r.layers), f"{r.size / 1e6:.1f}MB",
              time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created))) for r in refs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    sys.stdout.write("".join(" ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                             .rstrip() + "\n" for r in rows))
    sys.stdout.flush()
    return 0


def run_rmi(args: argparse.Namespace, ui: UI) -> int:
    with open_store(args.store) as store, store.session():
        for n in args.names:    # all names checked first: nothing removed on a typo
            store.resolve_ref(n)
        for n in args.names:
            store.remove_ref(n)
    if args.json:
        ui.emit_json({"removed": [parse_ref(n) for n in args.names]})
    else:
        for n in args.names:
            ui.info(f"removed {parse_ref(n)}")
    return 0
