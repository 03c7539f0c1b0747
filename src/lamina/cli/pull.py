"""``lamina pull``: copy an image from a registry into an OCI layout."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from lamina.cli.common import store_arg
from lamina.cli.registry_args import add_registry_args
from lamina.cli.ui import UI

if TYPE_CHECKING:
    from lamina.registry.pull import PullOptions
    from lamina.registry.reference import RegistryRef


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "pull", help="pull an image from a registry into a layout or the store",
        description="Download REF (REGISTRY/REPO[:TAG][@DIGEST]) into the OCI layout "
                    "LAYOUT (created if missing) and tag it TAG (default: REF's tag), or "
                    "with --into-store into the local store as NAME[:TAG] (default: the "
                    "repository's last component and REF's tag).  Blobs the destination "
                    "has (for the store: layers it has ingested) are not downloaded "
                    "again; an interrupted pull resumes where it stopped when run again.")
    p.add_argument("ref", metavar="REF", help="REGISTRY/REPO[:TAG][@sha256:DIGEST]")
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--layout", metavar="LAYOUT[:TAG]", help="destination layout and tag")
    dest.add_argument("--into-store", nargs="?", const="", metavar="NAME[:TAG]",
                      help="pull into the local store (see --store) under NAME[:TAG]")
    store_arg(p)
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="platform to pick from an image index (default: this machine)")
    p.add_argument("--all-platforms", action="store_true",
                   help="keep the image index and pull every platform's image")
    add_registry_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ui: UI) -> int:
    # imported here: httpx is not needed by the other commands' start-up
    from lamina.errors import UsageError
    from lamina.oci.layout import ImageRef
    from lamina.registry.pull import pull
    from lamina.registry.reference import RegistryRef
    from lamina.registry.sink import LayoutSink

    ref = RegistryRef.parse(args.ref)
    if args.layout is None:
        return _run_store(args, ui, ref)
    dest = ImageRef.parse(args.layout, default_tag="")
    tag = dest.tag or ref.tag
    if not tag:
        raise UsageError(f"{ref} has no tag to give the image in {dest.layout}",
                         hint=f"name one: --layout {dest.layout}:TAG")
    sink = LayoutSink.init(dest.layout)
    opts = _options(args, ref, tag)
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


def _options(args: argparse.Namespace, ref: RegistryRef, tag: str) -> PullOptions:
    from lamina.cli.registry_args import registry_options
    from lamina.errors import UsageError
    from lamina.oci.model import Platform
    from lamina.registry.pull import PullOptions

    if args.platform and args.all_platforms:
        raise UsageError("--platform and --all-platforms exclude each other")
    return PullOptions(ref=ref, tag=tag,
                       platform=Platform.parse(args.platform) if args.platform else None,
                       all_platforms=args.all_platforms, jobs=args.jobs,
                       registry=registry_options(args))


def _run_store(args: argparse.Namespace, ui: UI, ref: RegistryRef) -> int:
    from lamina.cli.common import open_store
    from lamina.errors import UsageError
    from lamina.registry.pull import pull
    from lamina.registry.sink import StoreSink

    if args.all_platforms:
        raise UsageError("--all-platforms needs --layout: the store keeps one platform's image")
    name = args.into_store or ""
    repo_name = ref.repository.rsplit("/", 1)[-1]
    if not name:
        if not ref.tag:
            raise UsageError(f"{ref} has no tag to name the image by",
                             hint="name it: --into-store NAME:TAG")
        name = f"{repo_name}:{ref.tag}"
    elif ":" not in name.rsplit("/", 1)[-1]:
        name = f"{name}:{ref.tag or 'latest'}"
    with open_store(args.store, create=True) as store:
        sink = StoreSink.for_pull(store, str(ref))
        res = pull(_options(args, ref, "pulled"), sink, ui.transfer("pulling"))
        imp = sink.finish("pulled", name)
    if args.json:
        out = res.to_json()
        out["store"] = store.path
        out["name"] = name
        out["layers_ingested"] = sum(1 for li in imp.layers if li.ingested)
        ui.emit_json(out)
    else:
        ui.info(f"pulled {ref} -> store {store.path} as {name} ({res.digest[:19]}): "
                f"{res.downloaded} blobs downloaded ({res.bytes_downloaded / 1e6:.1f} MB), "
                f"{res.skipped} already present, in {res.seconds:.2f}s")
    return 0
