"""``lamina copy``: an image between stores, layouts and io.lamina.Store servers."""

from __future__ import annotations

import argparse
from typing import Any

from lamina.cli.ui import UI


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "copy", help="copy an image between stores, layouts and lamina servers",
        description="Copy one image from SRC to DST.  SRC and DST are store:PATH[:NAME[:TAG]] "
                    "(a local store), oci:LAYOUT[:TAG] or LAYOUT[:TAG] (an OCI layout) or "
                    "varlink:SOCKET[:NAME[:TAG]] (a 'lamina serve' socket).  Layers travel "
                    "as splitdirfdstream with their files and blob passed as open "
                    "descriptors: between stores on one reflink filesystem (btrfs, xfs) the "
                    "destination clones them and no file data is written.  Layers DST "
                    "already has are skipped.  DST's name defaults to SRC's.")
    p.add_argument("source", metavar="SRC")
    p.add_argument("destination", metavar="DST")
    p.add_argument("--verify", action="store_true",
                   help="between two local stores, also rehash every layer (otherwise the "
                        "source store's verified, content-addressed data is trusted)")
    p.add_argument("--compression", choices=("gzip", "zstd", "none"), default="gzip",
                   help="for blobs that must be made again (a source without blobs)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ui: UI) -> int:
    from lamina.copy import CopyOptions, copy_image, summary_line

    res = copy_image(CopyOptions(args.source, args.destination, verify=args.verify,
                                 compression=args.compression))
    if args.json:
        ui.emit_json(res.to_json())
    else:
        ui.info(summary_line(res))
    return 0
