"""``lamina import``: copy an image from an OCI layout into the local store."""

from __future__ import annotations

import argparse
from typing import Any

from lamina.cli.common import open_store, store_arg
from lamina.cli.ui import UI
from lamina.oci.layout import ImageRef
from lamina.oci.model import Platform


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "import", help="import an image from an OCI layout into the store",
        description="Copy LAYOUT:TAG into the local store: its blobs (hardlinked when the "
                    "layout is yours, reflinked or copied otherwise), every layer split into "
                    "content-addressed file objects plus its tar-split metadata (verified "
                    "against its digests), and a ref NAME[:TAG] (default: the layout "
                    "directory's name and TAG) that keeps it from 'lamina gc'.  Layers "
                    "already in the store are not read again; two imports sharing layers "
                    "ingest each shared layer once.")
    p.add_argument("image", metavar="LAYOUT[:TAG]", help="layout and tag (default tag: latest)")
    p.add_argument("name", nargs="?", metavar="NAME[:TAG]",
                   help="name in the store (default tag: latest)")
    store_arg(p)
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="platform to pick when TAG is an image index (default: this machine)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ui: UI) -> int:
    ref = ImageRef.parse(args.image)
    platform = Platform.parse(args.platform) if args.platform else None
    with open_store(args.store, create=True) as store:
        res = store.import_image(ref.layout, ref.tag, args.name, platform=platform,
                                 progress=ui.progress("import"))
    if args.json:
        ui.emit_json(res.to_json())
        return 0
    new = sum(x.stats.new_bytes for x in res.layers)
    ui.info(f"imported {res.name} ({res.manifest[:19]}): {len(res.layers)} layers, "
            f"{res.ingested} ingested, {len(res.layers) - res.ingested} already stored, "
            f"{new / 1e6:.1f} MB of new objects in {res.seconds:.1f}s")
    return 0
