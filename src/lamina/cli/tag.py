"""``lamina tag`` and ``lamina rm``: add or remove a tag in a layout's index."""

from __future__ import annotations

import argparse
from typing import Any

from lamina.cli.ui import UI
from lamina.oci.edit import remove_tag, tag_image
from lamina.oci.layout import ImageRef


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "tag", help="give an image another tag",
        description="Point NEWTAG at the manifest (or index) LAYOUT:TAG points at.")
    p.add_argument("--image", required=True, metavar="LAYOUT[:TAG]",
                   help="layout and the existing tag (default tag: latest)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("new_tag", metavar="NEWTAG")
    p.set_defaults(run=run_tag)

    r: argparse.ArgumentParser = sub.add_parser(
        "rm", help="remove a tag (its blobs stay until 'lamina gc')",
        description="Remove TAG from the layout's index.json; run 'lamina gc' to delete "
                    "the blobs nothing references any more.")
    r.add_argument("--image", required=True, metavar="LAYOUT[:TAG]",
                   help="layout and the tag to remove (default tag: latest)")
    r.add_argument("-q", "--quiet", action="store_true")
    r.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    r.set_defaults(run=run_rm)


def run_tag(args: argparse.Namespace, ui: UI) -> int:
    ref = ImageRef.parse(args.image)
    desc = tag_image(ref, args.new_tag)
    if args.json:
        ui.emit_json({"layout": ref.layout, "tag": args.new_tag, "from": ref.tag,
                      "digest": desc.digest, "mediaType": desc.media_type})
    else:
        ui.info(f"tagged {ref.layout}:{args.new_tag} -> {desc.digest[:19]}")
    return 0


def run_rm(args: argparse.Namespace, ui: UI) -> int:
    ref = ImageRef.parse(args.image)
    remove_tag(ref)
    if args.json:
        ui.emit_json({"layout": ref.layout, "removed": ref.tag})
    else:
        ui.info(f"removed tag {ref}")
    return 0
