"""``lamina mount --driver lazy LAYOUT:TAG DIR`` and ``lamina lazy-index LAYOUT:TAG``."""

from __future__ import annotations

import argparse
from typing import Any

from lamina.cli.ui import UI


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "mount", help="mount an image's merged tree lazily (FUSE, contents fetched on read)",
        description="Mount LAYOUT:TAG at DIR from per-layer indexes; each file's content is "
                    "fetched from its layer blob and verified when first read.  Returns once "
                    "the mount is usable; 'lamina umount DIR' (or SIGTERM to the daemon) "
                    "unmounts it.")
    p.add_argument("--driver", default="lazy", choices=["lazy"],
                   help="how to mount (only 'lazy' mounts without unpacking)")
    p.add_argument("--writable", metavar="STATE",
                   help="compose overlayfs on top: changes go to STATE/upper (STATE/lower "
                        "holds the lazy mount)")
    p.add_argument("--cache", metavar="DIR",
                   help="keep fetched contents in DIR (default: a private directory removed "
                        "at unmount)")
    p.add_argument("--stats", metavar="FILE", help="write fetch counters (JSON) at unmount")
    p.add_argument("--no-index", action="store_true",
                   help="fail instead of building missing lazy indexes")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="platform to pick from an image index (default: this machine)")
    p.add_argument("--hooks", action="append", default=[], metavar="FILE",
                   help="hooks file whose 'lookup' hooks are asked for each layer's data")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary")
    p.add_argument("image", metavar="LAYOUT[:TAG]")
    p.add_argument("dir", metavar="DIR", help="mount point (an existing directory)")
    p.set_defaults(run=run)

    q: argparse.ArgumentParser = sub.add_parser(
        "lazy-index", help="build the lazy-mount indexes of an image's layers",
        description="Read each layer blob of LAYOUT:TAG once, verify it, and store its member "
                    "list and seek index under LAYOUT/.lamina-lazy/ for 'lamina mount'.")
    q.add_argument("--platform", metavar="OS/ARCH[/VARIANT]")
    q.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    q.add_argument("-q", "--quiet", action="store_true", help="no summary")
    q.add_argument("image", metavar="LAYOUT[:TAG]")
    q.set_defaults(run=run_index)


def _plugins(files: list[str], image: str) -> tuple[Any, ...]:
    if not files:
        return ()
    from lamina.hooks import HookOptions, HookRunner
    from lamina.lazy.fetch import HookLookup
    runner = HookRunner.load(HookOptions(files=tuple(files)))
    return (HookLookup(runner, image),) if runner.configured("lookup") else ()


def run(args: argparse.Namespace, ui: UI) -> int:
    from lamina.lazy.mount import LazyMountOptions, mount
    from lamina.oci.layout import ImageRef
    from lamina.oci.model import Platform
    opts = LazyMountOptions(
        image=ImageRef.parse(args.image), mountpoint=args.dir,
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

    from lamina.lazy.mount import index_image
    from lamina.oci.layout import ImageRef
    from lamina.oci.model import Platform
    t0 = time.monotonic()
    ref = ImageRef.parse(args.image)
    _tree, layers, _descs, built = index_image(
        ref, Platform.parse(args.platform) if args.platform else None)
    secs = time.monotonic() - t0
    if args.json:
        ui.emit_json({"image": str(ref), "layers": len(layers), "built": built,
                      "seconds": round(secs, 4)})
    else:
        ui.info(f"{ref}: {len(layers)} layer indexes ({built} built) in {secs:.2f}s")
    return 0
