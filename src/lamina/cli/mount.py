"""``lamina mount --driver lazy IMAGE DIR`` and ``lamina lazy-index``.

IMAGE is ``LAYOUT[:TAG]`` or ``docker://REGISTRY/REPO[:TAG]`` (mounted from the
registry with the lazy index published next to the image).
"""

from __future__ import annotations

import argparse
from typing import Any

from lamina.cli.registry_args import add_registry_args
from lamina.cli.ui import UI


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "mount", help="mount an image's merged tree lazily (FUSE, contents fetched on read)",
        description="Mount IMAGE at DIR from per-layer indexes; each file's content is "
                    "fetched from its layer blob and verified when first read.  IMAGE is "
                    "LAYOUT[:TAG], or docker://REGISTRY/REPO[:TAG] to mount from a "
                    "registry: manifest, config and the image's lazy index artifact "
                    "(published by 'lamina push --lazy-index' or 'lamina lazy-index "
                    "--push') are fetched, then file data with HTTP range requests.  "
                    "Returns once the mount is usable; 'lamina umount DIR' (or SIGTERM to "
                    "the daemon) unmounts it.")
    p.add_argument("--driver", default="lazy", choices=["lazy"],
                   help="how to mount (only 'lazy' mounts without unpacking)")
    p.add_argument("--writable", metavar="STATE",
                   help="compose overlayfs on top: changes go to STATE/upper (STATE/lower "
                        "holds the lazy mount)")
    p.add_argument("--cache", metavar="DIR",
                   help="keep fetched contents (and a registry image's index) in DIR "
                        "(default: a private directory removed at unmount)")
    p.add_argument("--stats", metavar="FILE", help="write fetch counters (JSON) at unmount")
    p.add_argument("--no-index", action="store_true",
                   help="fail instead of building missing lazy indexes (layouts)")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="platform to pick from an image index (default: this machine)")
    p.add_argument("--hooks", action="append", default=[], metavar="FILE",
                   help="hooks file whose 'lookup' hooks are asked for each layer's data")
    p.add_argument("--index-digest", metavar="sha256:HEX",
                   help="registry images: use this lazy index artifact (as printed by the "
                        "publish) instead of looking it up among the image's referrers")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary")
    add_registry_args(p, transfers=False)
    p.add_argument("image", metavar="IMAGE", help="LAYOUT[:TAG] or docker://REGISTRY/REPO[:TAG]")
    p.add_argument("dir", metavar="DIR", help="mount point (an existing directory)")
    p.set_defaults(run=run)

    q: argparse.ArgumentParser = sub.add_parser(
        "lazy-index", help="build (and publish) the lazy-mount indexes of an image's layers",
        description="Read each layer blob of LAYOUT:TAG once, verify it, and store its member "
                    "list and seek index under LAYOUT/.lamina-lazy/ for 'lamina mount'.  "
                    "With --push REF, also publish them to REF's repository (which must "
                    "have the image) as an artifact referring to the image manifest, so "
                    "that 'lamina mount docker://REF DIR' works; with --push REF and no "
                    "LAYOUT, the image is read from the registry once (downloaded to a "
                    "temporary directory, then removed).")
    q.add_argument("--platform", metavar="OS/ARCH[/VARIANT]")
    q.add_argument("--push", metavar="REF",
                   help="publish the index to REGISTRY/REPO[:TAG] (docker:// optional)")
    q.add_argument("--workdir", default="/var/tmp", metavar="DIR",
                   help="where an image read from the registry is kept meanwhile "
                        "(default: /var/tmp)")
    q.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    q.add_argument("-q", "--quiet", action="store_true", help="no summary")
    add_registry_args(q, transfers=False)
    q.add_argument("image", metavar="LAYOUT[:TAG]", nargs="?")
    q.set_defaults(run=run_index)


def _plugins(files: list[str], image: str) -> tuple[Any, ...]:
    if not files:
        return ()
    from lamina.hooks import HookOptions, HookRunner
    from lamina.lazy.fetch import HookLookup
    runner = HookRunner.load(HookOptions(files=tuple(files)))
    return (HookLookup(runner, image),) if runner.configured("lookup") else ()


def _digest(text: str | None) -> str | None:
    if text is None:
        return None
    from lamina.errors import ImageFormatError, UsageError
    from lamina.oci.model import check_digest
    try:
        return check_digest(text, "--index-digest")
    except ImageFormatError as e:
        raise UsageError(e.message, hint="give sha256:<64 hex digits>") from None


def run(args: argparse.Namespace, ui: UI) -> int:
    from lamina.lazy.mount import LazyMountOptions, mount
    from lamina.lazy.remote import RemoteImage, is_remote
    from lamina.oci.layout import ImageRef
    from lamina.oci.model import Platform
    image: ImageRef | RemoteImage
    if is_remote(args.image):
        from lamina.cli.registry_args import registry_options
        image = RemoteImage.parse(args.image, registry_options(args), _digest(args.index_digest))
    else:
        if args.index_digest:
            from lamina.errors import UsageError
            raise UsageError("--index-digest is for registry images (docker://...)")
        image = ImageRef.parse(args.image)
    opts = LazyMountOptions(
        image=image, mountpoint=args.dir,
        platform=Platform.parse(args.platform) if args.platform else None,
        cache_dir=args.cache, writable=args.writable, build_index=not args.no_index,
        stats_file=args.stats, plugins=_plugins(args.hooks, args.image))
    res = mount(opts)
    if args.json:
        ui.emit_json(res.to_json())
    else:
        built = f", {res.indexes_built} indexes built" if res.indexes_built else ""
        ui.info(f"mounted {opts.image} lazily at {res.mountpoint} ({res.layers} layers, "
                f"{res.inodes} inodes{built}) in {res.seconds:.2f}s; daemon pid {res.pid}")
    return 0


def run_index(args: argparse.Namespace, ui: UI) -> int:
    import time

    from lamina.errors import UsageError
    from lamina.lazy.mount import index_image
    from lamina.oci.layout import ImageRef
    from lamina.oci.model import Platform
    platform = Platform.parse(args.platform) if args.platform else None
    if args.push is not None:
        return _publish(args, ui, platform)
    if args.image is None:
        raise UsageError("name an image: lamina lazy-index LAYOUT[:TAG] [--push REF], or "
                         "lamina lazy-index --push REF")
    t0 = time.monotonic()
    ref = ImageRef.parse(args.image)
    _tree, layers, _descs, built = index_image(ref, platform)
    secs = time.monotonic() - t0
    if args.json:
        ui.emit_json({"image": str(ref), "layers": len(layers), "built": built,
                      "seconds": round(secs, 4)})
    else:
        ui.info(f"{ref}: {len(layers)} layer indexes ({built} built) in {secs:.2f}s")
    return 0


def _publish(args: argparse.Namespace, ui: UI, platform: Any) -> int:
    from lamina.cli.registry_args import registry_options
    from lamina.lazy.artifact import (
        PublishOptions,
        RemotePublishOptions,
        publish,
        publish_remote,
    )
    from lamina.oci.layout import ImageRef
    from lamina.registry.reference import RegistryRef
    ref = RegistryRef.parse(args.push)
    registry = registry_options(args)
    if args.image is None:
        res = publish_remote(RemotePublishOptions(ref, platform, registry, args.workdir),
                             ui.transfer("reading"))
    else:
        res = publish(PublishOptions(ImageRef.parse(args.image), ref, platform, registry))
    if args.json:
        ui.emit_json(res.to_json())
    else:
        for a in res.artifacts:
            ui.info(f"published the lazy index of {res.ref}@{a.subject[:19]} as "
                    f"{a.digest} ({a.index_bytes / 1e6:.2f} MB of indexes, "
                    f"{a.uploaded / 1e6:.2f} MB sent; referrers: {a.referrers})")
        ui.info(f"{res.indexes_built} layer indexes built, {res.seconds:.2f}s")
    return 0
