"""``lamina gc``: remove the blobs of a layout that no tag reaches."""

from __future__ import annotations

import argparse
from typing import Any

from lamina.cli.ui import UI
from lamina.oci.gc import gc


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "gc", help="remove unreferenced blobs from a layout",
        description="Delete every blob not reachable from LAYOUT's index.json (through "
                    "indexes, manifests, configs and layers) and temporary files of "
                    "interrupted writes older than an hour.  Do not run it while another "
                    "command writes to the layout.")
    p.add_argument("--layout", required=True, metavar="LAYOUT", help="OCI image layout")
    p.add_argument("-n", "--dry-run", action="store_true",
                   help="only report what would be removed")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ui: UI) -> int:
    res = gc(args.layout, dry_run=args.dry_run)
    if args.json:
        ui.emit_json(res.to_json())
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for digest, size in res.removed:
        ui.info(f"{verb} {digest} ({size} bytes)")
    for name in res.removed_tmp:
        ui.info(f"{verb} stale {name}")
    ui.info(f"{verb} {len(res.removed)} blobs and {len(res.removed_tmp)} temporary files "
            f"({res.freed / 1e6:.1f} MB); kept {res.kept} blobs")
    return 0
