"""``lamina repack``: write what changed in a bundle's rootfs as a new image layer."""

from __future__ import annotations

import argparse
import os
from typing import Any

from lamina.cli.hooks import hooks_arg
from lamina.cli.ui import UI
from lamina.errors import UsageError
from lamina.hooks import HookOptions
from lamina.oci.layout import ImageRef
from lamina.repack import RepackOptions, repack


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "repack", help="add the changes made in a bundle as a new layer and tag the result",
        description="Diff BUNDLE/rootfs against the unpack snapshot, write the changes as a "
                    "layer on top of the bundle's image and tag the new image LAYOUT:TAG.")
    p.add_argument("--image", required=True, metavar="LAYOUT[:TAG]|store:PATH:NAME[:TAG]",
                   help="layout (the one the bundle came from) and the new tag; or the "
                        "store the bundle came from and the new name: the layer is "
                        "streamed in, its files cloned where the filesystem allows")
    p.add_argument("--compress", choices=["gzip", "zstd", "none"], default="gzip",
                   help="layer compression (default gzip)")
    p.add_argument("--history.created_by", dest="created_by", metavar="TEXT",
                   help="history entry's created_by")
    p.add_argument("--history.author", dest="author", metavar="TEXT")
    p.add_argument("--history.comment", dest="comment", metavar="TEXT")
    p.add_argument("--no-history", action="store_true", help="add no history entry")
    p.add_argument("--refresh-bundle", action="store_true",
                   help="update the bundle so that it can be repacked again on top of the "
                        "new image")
    hooks_arg(p)
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("bundle", metavar="BUNDLE")
    p.set_defaults(run=run)


def source_date_epoch_env() -> int | None:
    v = os.environ.get("SOURCE_DATE_EPOCH")
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise UsageError(f"SOURCE_DATE_EPOCH={v!r} is not an integer") from None


def run(args: argparse.Namespace, ui: UI) -> int:
    store = name = None
    image = args.image
    if image.startswith("store:"):
        from lamina.store.ids import parse_ref
        store, _, name = image[len("store:"):].partition(":")
        if not store or not name:
            raise UsageError(f"--image {image}: give the store and the new name",
                             hint="--image store:PATH:NAME[:TAG]")
        name = parse_ref(name)
        image = os.path.join(store, "-")    # unused: the store takes the image
    opts = RepackOptions(
        image=ImageRef.parse(image), bundle=args.bundle, compression=args.compress,
        history=not args.no_history, created_by=args.created_by, author=args.author,
        comment=args.comment, refresh_bundle=args.refresh_bundle,
        source_date_epoch=source_date_epoch_env(), hooks=HookOptions(files=tuple(args.hooks)),
        store=store, name=name)
    res = repack(opts, ui.warn)
    target = f"store:{store}:{name}" if store else str(opts.image)
    if args.json:
        ui.emit_json(res.to_json())
    elif res.layer is None:
        ui.info(f"no changes: {target} points at the bundle's image {res.manifest[:19]}")
    else:
        ui.info(f"repacked {res.added} entries and {res.whiteouts} whiteouts into layer "
                f"{res.layer[:19]} ({res.size / 1e6:.1f} MB); {target} -> "
                f"{res.manifest[:19]} in {res.seconds:.2f}s")
    return 0
