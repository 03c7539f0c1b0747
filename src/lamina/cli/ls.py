"""``lamina ls``: the tags of a layout, one per line."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lamina.cli.ui import UI
from lamina.oci.edit import list_tags


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "ls", help="list the tags of a layout",
        description="Print the tags in LAYOUT's index.json, sorted, one per line.")
    p.add_argument("--layout", required=True, metavar="LAYOUT", help="OCI image layout")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {tag, digest, mediaType, size} on stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ui: UI) -> int:
    tags = list_tags(args.layout)
    if args.json:
        ui.emit_json([{"tag": t, "digest": d.digest, "mediaType": d.media_type,
                       "size": d.size} for t, d in tags])
    else:
        sys.stdout.write("".join(f"{t}\n" for t, _ in tags))
        sys.stdout.flush()
    return 0
