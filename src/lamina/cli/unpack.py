"""``lamina unpack``: unpack an image from an OCI layout into a runtime bundle."""

from __future__ import annotations

import argparse
from typing import Any

from lamina.bundle import UnpackOptions, UnpackResult, unpack
from lamina.cli.hooks import hooks_arg
from lamina.cli.ui import UI
from lamina.hooks import HookOptions
from lamina.layer.idmap import IdMapping
from lamina.oci.layout import ImageRef
from lamina.oci.model import Platform


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "unpack", help="unpack an image into a runtime bundle (rootfs + config.json)",
        description="Unpack LAYOUT:TAG into BUNDLE/rootfs and write BUNDLE/config.json.")
    p.add_argument("--image", required=True, metavar="LAYOUT[:TAG]",
                   help="OCI image layout and tag (default tag: latest); with --store also "
                        "NAME[:TAG] of an image in the store")
    p.add_argument("--driver", metavar="NAME",
                   help="storage driver (see 'lamina drivers'; default: the first that "
                        "claims the image: plugins, then overlay, btrfs, objects, copy)")
    p.add_argument("--store", metavar="PATH",
                   help="serve the image from this store (a layout image is imported first)")
    p.add_argument("--annotation", action="append", default=[], metavar="KEY=VALUE",
                   help="annotation passed to the drivers with the image's own (repeatable)")
    p.add_argument("--read-only", action="store_true",
                   help="the rootfs will not be written (drivers may then share files)")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="platform to pick from an image index (default: this machine)")
    p.add_argument("--rootless", action="store_true",
                   help="unpack as an unprivileged user: files owned by the caller, image "
                        "ownership kept in the user.rootlesscontainers xattr")
    p.add_argument("--uid-map", action="append", default=[], metavar="CTR:HOST:SIZE",
                   help="map container uids to host uids (repeatable)")
    p.add_argument("--gid-map", action="append", default=[], metavar="CTR:HOST:SIZE",
                   help="map container gids to host gids (repeatable)")
    p.add_argument("--keep-dirlinks", action="store_true",
                   help="keep existing symlinks to directories when a layer has a directory "
                        "at that path (like tar --keep-directory-symlink)")
    hooks_arg(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or summary")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory to create")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ui: UI) -> int:
    if not (args.driver or args.store or args.annotation or args.read_only):
        return _run_plain(args, ui)
    from lamina.drivers.unpack import DriverUnpackOptions, unpack_with_driver
    from lamina.errors import UsageError
    annotations = []
    for a in args.annotation:
        k, sep, v = a.partition("=")
        if not sep or not k:
            raise UsageError(f"--annotation {a!r}: expected KEY=VALUE")
        annotations.append((k, v))
    dopts = DriverUnpackOptions(
        image=args.image, bundle=args.bundle, driver=args.driver, store=args.store,
        annotations=tuple(annotations), read_only=args.read_only,
        platform=Platform.parse(args.platform) if args.platform else None,
        rootless=args.rootless,
        uid_map=tuple(IdMapping.parse(m) for m in args.uid_map),
        gid_map=tuple(IdMapping.parse(m) for m in args.gid_map),
        keep_dirlinks=args.keep_dirlinks, hooks=HookOptions(files=tuple(args.hooks)))
    res = unpack_with_driver(dopts, ui.progress("unpacking"))
    _report(args, ui, args.image, res)
    return 0


def _run_plain(args: argparse.Namespace, ui: UI) -> int:
    # no store, no driver chosen: today's unpack from a layout, with nothing else loaded
    opts = UnpackOptions(
        image=ImageRef.parse(args.image),
        bundle=args.bundle,
        platform=Platform.parse(args.platform) if args.platform else None,
        rootless=args.rootless,
        uid_map=tuple(IdMapping.parse(m) for m in args.uid_map),
        gid_map=tuple(IdMapping.parse(m) for m in args.gid_map),
        keep_dirlinks=args.keep_dirlinks,
        hooks=HookOptions(files=tuple(args.hooks)),
    )
    res = unpack(opts, ui.progress("unpacking"))
    _report(args, ui, str(opts.image), res)
    return 0


def _report(args: argparse.Namespace, ui: UI, image: str, res: UnpackResult) -> None:
    if args.json:
        ui.emit_json(res.to_json())
        return
    via = f" with {res.driver}" if res.driver != "copy" else ""
    reused = f", {res.reused} reused from the store" if res.reused else ""
    ui.info(f"unpacked {image}{via} ({res.layers} layers{reused}, {res.entries} entries, "
            f"{res.bytes / 1e6:.1f} MB) into {res.bundle} in {res.seconds:.2f}s")
