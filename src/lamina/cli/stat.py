"""``lamina stat``: an image's history lined up with its layers (like ``umoci stat``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lamina.cli.ui import UI
from lamina.oci.edit import stat_image
from lamina.oci.layout import ImageRef
from lamina.oci.model import Platform

COLUMNS = ("LAYER", "CREATED", "CREATED BY", "SIZE", "COMMENT")


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "stat", help="show an image's history and layers",
        description="Print the history of LAYOUT:TAG, one row per history entry: the layer "
                    "it created (<none> for an empty_layer entry), when, by what command, "
                    "the layer's size and the comment.")
    p.add_argument("--image", required=True, metavar="LAYOUT[:TAG]",
                   help="layout and tag (default tag: latest)")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="platform to pick from an image index (default: this machine)")
    p.add_argument("--json", action="store_true",
                   help="print JSON on stdout (umoci stat's 'history' list, plus the "
                        "manifest, platform and runtime config)")
    p.set_defaults(run=run)


def human_size(n: int) -> str:
    """Decimal units with 4 significant digits, as umoci (go-units HumanSize) prints."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if size < 1000 or unit == "PB":
            return f"{size:.4g}{unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _one_line(v: object) -> str:
    return " ".join(str(v).split()) if v not in (None, "") else ""


def render(rows: list[tuple[str, ...]]) -> str:
    table = [COLUMNS, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    return "".join(" ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                   + "\n" for r in table)


def run(args: argparse.Namespace, ui: UI) -> int:
    st = stat_image(ImageRef.parse(args.image),
                    Platform.parse(args.platform) if args.platform else None)
    if args.json:
        ui.emit_json(st.to_json())
        return 0
    for w in st.warnings:
        ui.warn(w)
    rows: list[tuple[str, ...]] = []
    for r in st.rows:
        h = r.history
        rows.append((r.layer.digest if r.layer else "<none>", _one_line(h.get("created")),
                     _one_line(h.get("created_by")),
                     human_size(r.layer.size) if r.layer else "<none>",
                     _one_line(h.get("comment"))))
    sys.stdout.write(render(rows))
    sys.stdout.flush()
    return 0
