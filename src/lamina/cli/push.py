"""``lamina push``: copy an image from an OCI layout to a registry."""

from __future__ import annotations

import argparse
from typing import Any

from lamina.cli.registry_args import add_registry_args
from lamina.cli.ui import UI

MIB = 1 << 20


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "push", help="push an image from a layout to a registry",
        description="Upload LAYOUT:TAG (an image or a whole image index) to REF "
                    "(REGISTRY/REPO[:TAG]; default tag: the layout's).  Blobs the "
                    "repository has are skipped; blobs of another repository of the same "
                    "registry are mounted instead of uploaded (--from-repo, or the "
                    "repository the image was pulled from).")
    p.add_argument("ref", metavar="REF", help="REGISTRY/REPO[:TAG]")
    p.add_argument("--layout", required=True, metavar="LAYOUT[:TAG]",
                   help="source layout and tag (default tag: latest)")
    p.add_argument("--from-repo", action="append", default=[], metavar="REPO",
                   help="mount blobs from this repository of the same registry "
                        "(repeatable)")
    p.add_argument("--chunk-size", type=int, metavar="MIB",
                   help="upload blobs larger than this in PATCH chunks of this many MiB "
                        "(default: one streamed PUT per blob)")
    p.add_argument("--lazy-index", action="store_true",
                   help="also publish the image's lazy index (built if missing: reads every "
                        "layer once) as an artifact referring to the image, for 'lamina "
                        "mount docker://REF DIR'; on registries without the referrers API "
                        "this adds the tag sha256-<manifest hex>")
    add_registry_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ui: UI) -> int:
    # imported here: httpx is not needed by the other commands' start-up
    from lamina.cli.registry_args import registry_options
    from lamina.errors import UsageError
    from lamina.oci.layout import ImageRef
    from lamina.registry.push import PushOptions, push
    from lamina.registry.reference import RegistryRef

    ref = RegistryRef.parse(args.ref)
    if args.chunk_size is not None and args.chunk_size < 1:
        raise UsageError(f"--chunk-size {args.chunk_size}: must be at least 1 (MiB)")
    opts = PushOptions(
        image=ImageRef.parse(args.layout),
        ref=ref,
        from_repos=tuple(RegistryRef.parse(f"{ref.registry}/{r}").repository
                         for r in args.from_repo),
        jobs=args.jobs,
        chunk_size=args.chunk_size * MIB if args.chunk_size else None,
        registry=registry_options(args),
    )
    res = push(opts, ui.transfer("pushing"))
    lazy = None
    if args.lazy_index:
        from lamina.lazy.artifact import PublishOptions, publish
        lazy = publish(PublishOptions(opts.image, ref, registry=opts.registry))
    if args.json:
        out = res.to_json()
        if lazy is not None:
            out["lazy_index"] = lazy.to_json()
        ui.emit_json(out)
    else:
        ui.info(f"pushed {opts.image} -> {res.ref} ({res.digest[:19]}): {res.uploaded} blobs "
                f"uploaded ({res.bytes_uploaded / 1e6:.1f} MB), {res.mounted} mounted, "
                f"{res.skipped} already there, in {res.seconds:.2f}s")
        for a in lazy.artifacts if lazy is not None else []:
            ui.info(f"lazy index of {a.subject[:19]}: {a.digest} ({a.index_bytes / 1e6:.2f} "
                    f"MB; referrers: {a.referrers})")
    return 0
