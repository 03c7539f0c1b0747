"""``lamina share IMAGE``: stored layers as read-only lower directories for other users."""

from __future__ import annotations

import argparse
from typing import Any

from lamina.cli.common import open_store, store_arg
from lamina.cli.ui import UI


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "share", help="prepare a stored image's layers as lower dirs other users can mount",
        description="Write each layer of IMAGE (from the store) as a world-readable directory "
                    "keeping the image's owner and mode in the user.containers.override_stat "
                    "xattr, and print the lowerdir= list (top first) for fuse-overlayfs "
                    "-o xattr_permissions=2.")
    store_arg(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary")
    p.add_argument("image", metavar="NAME[:TAG]|CHAIN_ID",
                   help="an image in the store, or one layer by its ChainID (sha256:...)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ui: UI) -> int:
    from lamina.lazy.share import share_image
    with open_store(args.store) as store:
        res = share_image(store, args.image)
    if args.json:
        ui.emit_json(res.to_json())
    else:
        ui.info(f"shared {res.image}: {len(res.lowers)} layers ({res.made} written now); "
                f"lowerdir={res.lowerdir}")
    return 0
