"""``lamina insert``: add a file or directory tree to an image as a new layer."""

from __future__ import annotations

import argparse
from typing import Any

from lamina.cli.common import image_args
from lamina.cli.repack import source_date_epoch_env
from lamina.cli.ui import UI
from lamina.errors import UsageError
from lamina.layer.idmap import IdMapping
from lamina.oci.edit import InsertOptions, insert
from lamina.oci.layout import ImageRef
from lamina.oci.model import Platform


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "insert", help="add a file or directory to an image as a new layer",
        usage="lamina insert --image LAYOUT[:TAG] [options] [--opaque] SOURCE TARGET\n"
              "       lamina insert --image LAYOUT[:TAG] [options] --whiteout TARGET",
        description="Add SOURCE (a file, symlink or directory tree on this machine) at path "
                    "TARGET inside the image as a new top layer, or with --whiteout a layer "
                    "that removes TARGET, and tag the result.  Files keep their modes, "
                    "times and xattrs; owners are the host's unless mapped.  A layer cannot "
                    "take secrets out of lower layers: see --config.volume instead.")
    image_args(p, new_tag=True, platform=True)
    p.add_argument("--opaque", action="store_true",
                   help="TARGET (a directory) hides everything lower layers have below it")
    p.add_argument("--whiteout", action="store_true", help="remove TARGET from the image")
    p.add_argument("--compress", choices=["gzip", "zstd", "none"], default="gzip",
                   help="layer compression (default gzip)")
    p.add_argument("--rootless", action="store_true",
                   help="owners from the user.rootlesscontainers xattr, else root")
    p.add_argument("--uid-map", action="append", default=[], metavar="CTR:HOST:SIZE",
                   help="map SOURCE's host uids to container uids (repeatable)")
    p.add_argument("--gid-map", action="append", default=[], metavar="CTR:HOST:SIZE",
                   help="map SOURCE's host gids to container gids (repeatable)")
    p.add_argument("--history.created_by", dest="created_by", metavar="TEXT",
                   help="history entry's created_by (default: 'lamina insert SOURCE TARGET')")
    p.add_argument("--history.author", dest="author", metavar="TEXT")
    p.add_argument("--history.comment", dest="comment", metavar="TEXT")
    p.add_argument("--no-history", action="store_true", help="add no history entry")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("paths", nargs="+", metavar="SOURCE TARGET")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ui: UI) -> int:
    want = 1 if args.whiteout else 2
    if len(args.paths) != want:
        raise UsageError("--whiteout takes one path, TARGET" if args.whiteout else
                         "insert takes two paths, SOURCE and TARGET",
                         hint="see 'lamina insert --help'")
    opts = InsertOptions(
        image=ImageRef.parse(args.image), target=args.paths[-1],
        source=None if args.whiteout else args.paths[0], new_tag=args.new_tag,
        platform=Platform.parse(args.platform) if args.platform else None,
        opaque=args.opaque, whiteout=args.whiteout, compression=args.compress,
        rootless=args.rootless, uid_map=tuple(IdMapping.parse(m) for m in args.uid_map),
        gid_map=tuple(IdMapping.parse(m) for m in args.gid_map),
        history=not args.no_history, created_by=args.created_by,
        history_author=args.author, history_comment=args.comment,
        source_date_epoch=source_date_epoch_env())
    res = insert(opts)
    for w in res.warnings:
        ui.warn(w)
    if args.json:
        ui.emit_json(res.to_json())
    else:
        assert res.layer is not None
        ui.info(f"inserted {res.entries} entries as layer {res.layer.digest[:19]} "
                f"({res.layer.size / 1e6:.1f} MB); {res.layout}:{res.tag} -> "
                f"{res.manifest.digest[:19]}")
    return 0
