"""Argument groups shared by several commands."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lamina.store import Store


def image_args(p: argparse.ArgumentParser, *, new_tag: bool = False,
               platform: bool = False) -> None:
    """``--image LAYOUT[:TAG]`` and, optionally, ``--tag NEWTAG`` and ``--platform``."""
    p.add_argument("--image", required=True, metavar="LAYOUT[:TAG]",
                   help="layout and tag (default tag: latest)")
    if new_tag:
        p.add_argument("--tag", dest="new_tag", metavar="NEWTAG",
                       help="tag the result NEWTAG instead of overwriting TAG")
    if platform:
        p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                       help="platform to pick when TAG is an image index (default: this machine)")


def store_arg(p: argparse.ArgumentParser) -> None:
    """``--store PATH``: the local store (default: :func:`default_store_path`)."""
    from lamina.store import default_store_path
    p.add_argument("--store", metavar="PATH",
                   help=f"the local store (default: {default_store_path()}; as root "
                        "/var/lib/lamina, else $XDG_DATA_HOME/lamina)")


def open_store(path: str | None, *, create: bool = False) -> Store:
    """Open the store a command's ``--store`` names (or the default one)."""
    from lamina.store import Store
    return Store.open(path, create=create)
