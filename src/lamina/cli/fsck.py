"""``lamina fsck``: check the local store."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from lamina.cli.common import open_store, store_arg
from lamina.cli.ui import UI
from lamina.errors import CorruptLayerError


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "fsck", help="check the store for damage",
        description="Check every object and blob against its digest, every layer's "
                    "tar-split against its objects and diff_id (by rebuilding the tar), and "
                    "the index against the files both ways.  Exits 6 when something is "
                    "damaged.  Leftovers of interrupted commands are reported as garbage "
                    "(not damage); 'lamina gc' removes them.")
    store_arg(p)
    p.add_argument("--quick", action="store_true",
                   help="compare sizes instead of hashing content")
    p.add_argument("--repair", action="store_true",
                   help="delete damaged objects, blobs and the layers that need them (import "
                        "the affected images again afterwards)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--json", action="store_true", help="print the findings as JSON on stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ui: UI) -> int:
    with open_store(args.store) as store:
        res = store.fsck(quick=args.quick, repair=args.repair)
    code = 0 if res.ok else CorruptLayerError.code
    if args.json:
        ui.emit_json(res.to_json())
        return code
    for f in res.problems:
        ui.info(f"{f.kind}: {f.subject}" + (f" ({f.detail})" if f.detail else ""))
    for line in res.repaired:
        ui.info(f"repaired: {line}")
    checked = ", ".join(f"{n} {k}" for k, n in res.checked.items())
    junk = Counter(f.kind for f in res.garbage)
    if junk:
        ui.info("garbage ('lamina gc' removes it): "
                + ", ".join(f"{n} {k}" for k, n in sorted(junk.items())))
    if res.ok:
        ui.info(f"store {res.store} is consistent ({checked})")
        return 0
    hint = ("run 'lamina fsck --repair'" if not res.repaired else "")
    if res.affected_refs:
        hint += ("; then " if hint else "") + "import again: " + ", ".join(res.affected_refs)
    ui.error(CorruptLayerError(f"{len(res.problems)} problems in the store {res.store}",
                               hint=hint or None))
    return code
