"""``lamina pull``: copy an image from a registry into an OCI layout."""

from __future__ import annotations

import argparse
from typing import Any

from lamina.cli.registry_args import add_registry_args
from lamina.cli.ui import UI


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "pull", help="pull an image from a registry into a layout",
        description="Download REF (REGISTRY/REPO[:TAG][@DIGEST]) into the OCI layout "
                    "LAYOUT (created if missing) and tag it TAG (default: REF's tag).  "
                    "Blobs the layout has are not downloaded again; an interrupted pull "
                    "resumes where it stopped when run again.")
    p.add_argument("ref", metavar="REF", help="REGISTRY/REPO[:TAG][@sha256:DIGEST]")
    p.add_argument("--layout", required=True, metavar="LAYOUT[:TAG]",
                   help="destination layout and tag")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="platform to pick from an image index (default: this machine)")
    p.add_argument("--all-platforms", action="store_true",
                   help="keep the image index and pull every platform's image")
    add_registry_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ui: UI) -> int:
    # imported here: httpx is not needed by the other commands' start-up
    from lamina.cli.registry_args import registry_options
    from lamina.errors import UsageError
    from lamina.oci.layout import ImageRef
    from lamina.oci.model import Platform
    from lamina.registry.pull import PullOptions, pull
    from lamina.registry.reference import RegistryRef
    from lamina.registry.sink import LayoutSink

    ref = RegistryRef.parse(args.ref)
    dest = ImageRef.parse(args.layout, default_tag="")
    tag = dest.tag or ref.tag
    if not tag:
        raise UsageError(f"{ref} has no tag to give the image in {dest.layout}",
                         hint=f"name one: --layout {dest.layout}:TAG")
    if args.platform and args.all_platforms:
        raise UsageError("--platform and --all-platforms exclude each other")
    opts = PullOptions(
        ref=ref, tag=tag,
        platform=Platform.parse(args.platform) if args.platform else None,
        all_platforms=args.all_platforms,
        jobs=args.jobs,
        registry=registry_options(args),
    )
    sink = LayoutSink.init(dest.layout)
    res = pull(opts, sink, ui.transfer("pulling"))
    if args.json:
        out = res.to_json()
        out["layout"] = sink.layout.path
        ui.emit_json(out)
    else:
        resumed = f", {res.resumed} resumed" if res.resumed else ""
        ui.info(f"pulled {ref} -> {dest.layout}:{tag} ({res.digest[:19]}): "
                f"{res.downloaded} blobs downloaded ({res.bytes_downloaded / 1e6:.1f} MB"
                f"{resumed}), {res.skipped} already present, in {res.seconds:.2f}s")
    return 0
