"""``lamina images``: the images (refs) in the local store."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from lamina.cli.common import open_store, store_arg
from lamina.cli.ui import UI


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "images", help="list the images in the store",
        description="Print the store's refs: name, manifest digest, platform, layer count "
                    "and compressed size.")
    store_arg(p)
    p.add_argument("--json", action="store_true", help="print a JSON list on stdout")
    p.set_defaults(run=run)


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
