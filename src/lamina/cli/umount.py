"""``lamina umount DIR``: remove what ``lamina mount`` (or a mounting driver) mounted."""

from __future__ import annotations

import argparse
from typing import Any

from lamina.cli.ui import UI


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "umount", help="unmount a lamina mount",
        description="Unmount DIR: for a bundle a mounting driver prepared (lamina unpack "
                    "--driver overlay), its rootfs is unmounted and its changes kept (repack "
                    "still works); for a lazy mount, its daemon is stopped (its overlay, if "
                    "any, goes first) and its private cache removed.")
    p.add_argument("--store", metavar="PATH",
                   help="the bundle's store, if it moved since the unpack (default: the one "
                        "recorded in BUNDLE/lamina.json)")
    p.add_argument("dir", metavar="DIR", help="the bundle or mount point")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ui: UI) -> int:
    from lamina.drivers.manage import release_bundle
    from lamina.errors import NotFoundError
    from lamina.lazy.mount import is_lazy_mount, unmount
    # a lazy mount first: its record is outside DIR, which may be a dead FUSE mount
    if is_lazy_mount(args.dir) and unmount(args.dir):
        ui.info(f"unmounted {args.dir}")
        return 0
    if release_bundle(args.dir, store=args.store):  # a bundle a mounting driver (overlay) prepared
        ui.info(f"unmounted {args.dir}/rootfs (its changes stay in {args.dir}/upper)")
        return 0
    if unmount(args.dir):
        ui.info(f"unmounted {args.dir}")
        return 0
    raise NotFoundError(f"{args.dir} is not a lamina mount",
                        hint="lamina umount removes mounts made by 'lamina mount'")
