"""Argument groups shared by several commands."""

from __future__ import annotations

import argparse


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
