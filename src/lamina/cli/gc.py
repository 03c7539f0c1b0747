"""``lamina gc``: remove what no tag reaches, from a layout (``--layout``) or the store."""

from __future__ import annotations

import argparse
from typing import Any

from lamina.cli.common import open_store, store_arg
from lamina.cli.ui import UI
from lamina.oci.gc import gc


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "gc", help="remove unreferenced content from the store or a layout",
        description="Without --layout: collect the local store: keep what its refs (and "
                    "extractions drivers mark in use) reach, remove every other manifest, "
                    "blob, layer, file object and extraction, and staging of killed "
                    "processes; it waits for running store commands and they wait for it.  "
                    "With --layout: delete every blob not reachable from LAYOUT's "
                    "index.json (through indexes, manifests, configs and layers) and "
                    "temporary files of interrupted writes older than an hour; do not run "
                    "that while another command writes to the layout.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--layout", metavar="LAYOUT", help="collect this OCI image layout")
    store_arg(where)  # type: ignore[arg-type]
    p.add_argument("-n", "--dry-run", action="store_true",
                   help="only report what would be removed")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ui: UI) -> int:
    if args.layout is None:
        return _run_store(args, ui)
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


def _run_store(args: argparse.Namespace, ui: UI) -> int:
    with open_store(args.store) as store:
        res = store.gc(dry_run=args.dry_run, removers=_removers())
    if args.json:
        ui.emit_json(res.to_json())
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for item in res.removed:
        ui.info(f"{verb} {item}")
    parts = [f"{n} {k}" for k, n in res.counts.items() if n and k != "locks"]
    ui.info(f"{verb} {', '.join(parts) or 'nothing'} ({res.total_freed / 1e6:.1f} MB); "
            f"kept {res.kept.get('refs', 0)} images, {res.kept.get('layers', 0)} layers, "
            f"{res.kept.get('objects', 0)} objects")
    return 0


def _removers() -> dict[str, Any]:
    """Built-in drivers that delete their extractions their own way (btrfs: one
    subvolume delete instead of a file-by-file walk); plugins are not loaded."""
    from lamina.drivers.registry import default_registry
    out: dict[str, Any] = {}
    for entry in default_registry():
        if entry.builtin:
            rm = getattr(entry.load(), "remover", None)
            if callable(rm):
                out[entry.name] = rm
    return out
