"""``lamina new``: create an empty image (no layers) in a layout, creating the layout."""

from __future__ import annotations

import argparse
from typing import Any

from lamina.cli.repack import source_date_epoch_env
from lamina.cli.ui import UI
from lamina.oci.edit import NewOptions, new_image
from lamina.oci.layout import ImageRef
from lamina.oci.model import Platform


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "new", help="create an empty image (and the layout if it does not exist)",
        description="Create LAYOUT (if missing) and tag in it an empty image: a config for "
                    "this machine's platform with no layers, like 'umoci new'.")
    p.add_argument("--image", required=True, metavar="LAYOUT[:TAG]",
                   help="layout and the new tag (default tag: latest)")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="the image's platform (default: this machine)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ui: UI) -> int:
    opts = NewOptions(image=ImageRef.parse(args.image),
                      platform=Platform.parse(args.platform) if args.platform else None,
                      source_date_epoch=source_date_epoch_env())
    res = new_image(opts)
    if args.json:
        ui.emit_json(res.to_json())
    else:
        ui.info(f"created empty image {opts.image} -> {res.manifest.digest[:19]}")
    return 0
