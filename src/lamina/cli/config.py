"""``lamina config``: change an image's config or manifest annotations (like
``umoci config``), writing a new config and manifest and moving the tag."""

from __future__ import annotations

import argparse
from typing import Any

from lamina.cli.common import image_args
from lamina.cli.repack import source_date_epoch_env
from lamina.cli.ui import UI
from lamina.oci.edit import CLEARABLE, ConfigOptions, edit_config, parse_kv
from lamina.oci.layout import ImageRef
from lamina.oci.model import Platform


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "config", help="change an image's config (env, cmd, labels, ...) and tag the result",
        description="Write a new config and manifest for LAYOUT:TAG with the given changes "
                    "and point TAG (or --tag NEWTAG) at it.  --clear is applied first; "
                    "repeatable options add to (--config.env, --config.label, ...) or "
                    "replace (--config.entrypoint, --config.cmd) what the image has.  A "
                    "history entry with empty_layer is added unless --no-history.  Values "
                    "starting with '-' need the --opt=VALUE form.")
    image_args(p, new_tag=True, platform=True)
    p.add_argument("--clear", action="append", default=[], choices=sorted(CLEARABLE),
                   metavar="FIELD", help="remove a field first (repeatable): "
                                         + ", ".join(sorted(CLEARABLE)))
    p.add_argument("--config.user", dest="user", metavar="USER[:GROUP]")
    p.add_argument("--config.env", dest="env", action="append", default=[], metavar="K=V",
                   help="set an environment variable (repeatable)")
    p.add_argument("--config.entrypoint", dest="entrypoint", action="append", metavar="ARG",
                   help="the entrypoint, one argument per use (replaces the old one)")
    p.add_argument("--config.cmd", dest="cmd", action="append", metavar="ARG",
                   help="the command, one argument per use (replaces the old one)")
    p.add_argument("--config.workingdir", dest="working_dir", metavar="DIR")
    p.add_argument("--config.label", dest="labels", action="append", default=[],
                   metavar="K=V", help="set a label (repeatable)")
    p.add_argument("--config.exposedports", dest="exposed_ports", action="append",
                   default=[], metavar="PORT[/PROTO]", help="expose a port (repeatable)")
    p.add_argument("--config.volume", dest="volumes", action="append", default=[],
                   metavar="PATH", help="declare a volume (repeatable)")
    p.add_argument("--config.stopsignal", dest="stop_signal", metavar="SIGNAL")
    p.add_argument("--manifest.annotation", dest="annotations", action="append", default=[],
                   metavar="K=V", help="set a manifest annotation (repeatable)")
    p.add_argument("--author", metavar="TEXT", help="the image's author")
    p.add_argument("--created", metavar="RFC3339", help="the image's creation time")
    p.add_argument("--architecture", metavar="ARCH")
    p.add_argument("--os", metavar="OS")
    p.add_argument("--variant", metavar="VARIANT")
    p.add_argument("--history.created_by", dest="created_by", metavar="TEXT",
                   help="history entry's created_by (default: the options given)")
    p.add_argument("--history.author", dest="history_author", metavar="TEXT")
    p.add_argument("--history.comment", dest="history_comment", metavar="TEXT")
    p.add_argument("--history.created", dest="history_created", metavar="RFC3339")
    p.add_argument("--no-history", action="store_true", help="add no history entry")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ui: UI) -> int:
    opts = ConfigOptions(
        image=ImageRef.parse(args.image), new_tag=args.new_tag,
        platform=Platform.parse(args.platform) if args.platform else None,
        clear=tuple(args.clear), user=args.user,
        env=tuple(parse_kv(e, "--config.env") for e in args.env),
        entrypoint=tuple(args.entrypoint) if args.entrypoint is not None else None,
        cmd=tuple(args.cmd) if args.cmd is not None else None,
        working_dir=args.working_dir,
        labels=tuple(parse_kv(v, "--config.label") for v in args.labels),
        annotations=tuple(parse_kv(v, "--manifest.annotation") for v in args.annotations),
        exposed_ports=tuple(args.exposed_ports), volumes=tuple(args.volumes),
        stop_signal=args.stop_signal, author=args.author, created=args.created,
        architecture=args.architecture, os=args.os, variant=args.variant,
        history=not args.no_history, created_by=args.created_by,
        history_author=args.history_author, history_comment=args.history_comment,
        history_created=args.history_created, source_date_epoch=source_date_epoch_env())
    res = edit_config(opts)
    for w in res.warnings:
        ui.warn(w)
    if args.json:
        ui.emit_json(res.to_json())
    else:
        ui.info(f"{res.layout}:{res.tag} -> {res.manifest.digest[:19]} "
                f"(config {res.config[:19]})")
    return 0
