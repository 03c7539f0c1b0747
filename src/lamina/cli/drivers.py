"""``lamina drivers``: list storage drivers, their needs, and whether they run here."""

from __future__ import annotations

import argparse
from typing import Any

from lamina.cli.ui import UI


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "drivers", help="list storage drivers and whether they can run here",
        description="List every storage driver (built-in and from installed packages, in "
                    "the order they are asked to claim an image), what each needs, and "
                    "whether it can run on this host with the given store.")
    p.add_argument("--store", metavar="PATH",
                   help="judge store-dependent needs against this store (default: the "
                        "default store)")
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ui: UI) -> int:
    import os
    import sys

    from lamina.drivers.manage import describe_drivers
    from lamina.store import default_store_path
    # a store that does not exist yet is judged by the filesystem it would be made on
    store = os.path.abspath(args.store or default_store_path())
    rows = describe_drivers(store)
    if args.json:
        ui.emit_json({"store": store, "drivers": rows})
        return 0
    lines = []
    for r in rows:
        caps = r.get("capabilities") or {}
        needs = [k for k in ("needs_root", "needs_store", "mounts", "network") if caps.get(k)]
        needs += [f"fs:{'|'.join(caps['filesystems'])}"] if caps.get("filesystems") else []
        needs += [f"tool:{t}" for t in caps.get("tools", [])]
        state = "yes" if r["can_run"] else f"no: {r['reason']}"
        lines.append(f"{r['name']:<10} {r['origin']:<10} can run here: {state}")
        lines.append(f"{'':<10} {r['description']}")
        lines.append(f"{'':<10} needs: {', '.join(needs) or 'nothing special'}; rootless: "
                     f"{'yes' if caps.get('rootless_ok') else 'no'}; writes: "
                     f"{', '.join(caps.get('writes', []))}")
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()
    return 0
