"""Garbage collection of the store.

Roots are the refs, plus the extractions drivers marked in use (a mounted
container keeps its chain of layers alive even after its image is removed).
From the refs: manifests -> config and layer blobs, diff_ids, ChainIDs; from
a chain: its parents and their diff_ids; from the kept layers: the objects
their tar-splits reference (``layer_objects``).  Everything else goes:
manifests, blobs, layers and tar-splits, chains, objects, extractions no kept
chain needs, staging left by dead processes, and work-lock files.

It runs under the exclusive store lock, so no import is half-way through
(an import holds the shared lock from its first blob to its ref).  Rows are
deleted in one transaction that commits *before* any file is unlinked: a
crash in between leaves unreferenced files, which the next run removes.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lamina.store.locking import reclaim, rmtree_all, tree_size

if TYPE_CHECKING:
    from lamina.store.store import Store

KINDS = ("manifests", "blobs", "layers", "chains", "objects", "extractions", "tmp", "locks")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX62 = re.compile(r"^[0-9a-f]{62}$")


@dataclass
class StoreGCResult:
    store: str
    dry_run: bool = False
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    freed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    removed: list[str] = field(default_factory=list)    # "kind id", all but objects/locks
    kept: dict[str, int] = field(default_factory=dict)

    @property
    def total_freed(self) -> int:
        return sum(self.freed.values())

    def add(self, kind: str, ident: str, size: int, *, listed: bool = True) -> None:
        self.counts[kind] += 1
        self.freed[kind] += size
        if listed:
            self.removed.append(f"{kind} {ident}")

    def to_json(self) -> dict[str, Any]:
        return {"store": self.store, "dry_run": self.dry_run, "counts": self.counts,
                "freed": self.freed, "total_freed": self.total_freed,
                "removed": self.removed, "kept": self.kept}


def _size(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except FileNotFoundError:
        return 0


def collect(store: Store, *, dry_run: bool = False,
            removers: dict[str, Callable[[str], None]], wait: bool = True) -> StoreGCResult:
    res = StoreGCResult(store.path, dry_run)
    with store.lock.exclusive(wait=wait):
        try:
            with store.db.tx() as c:
                doomed = _plan(store, c, res, removers)
                if dry_run:
                    raise _DryRun  # roll the row deletions back
        except _DryRun:
            pass
        # rows are committed; only now unlink files, still under the exclusive lock
        # (a crash here leaves unreferenced files, removed by the next run)
        for kind, ident, path, size in doomed:
            res.add(kind, ident, size, listed=kind != "objects")
            if dry_run:
                continue
            if kind == "extractions":
                removers.get(ident.split("/", 1)[0], rmtree_all)(path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        for name, size in reclaim(store.tmp_dir, dry_run=dry_run):
            res.add("tmp", name, size)
        if not dry_run:
            for name in _listdir(store.locks_dir):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(store.locks_dir, name))
                res.add("locks", name, 0, listed=False)
    return res


class _DryRun(Exception):
    pass


def _plan(store: Store, c: sqlite3.Connection, res: StoreGCResult,
          removers: dict[str, Callable[[str], None]]) -> list[tuple[str, str, str, int]]:
    """Delete the rows nothing reaches; return the files to remove (kind, id, path, size)."""
    def q(sql: str) -> list[Any]:
        return c.execute(sql).fetchall()

    roots = {str(r[0]) for r in q("SELECT manifest FROM refs")}
    keep_blobs: set[str] = set()
    keep_layers: set[str] = set()
    keep_chains: set[str] = set()
    for digest, config in q("SELECT digest, config FROM manifests"):
        if digest in roots:
            keep_blobs.update((digest, config))
    for manifest, blob, diff_id, chain in q(
            "SELECT manifest, blob, diff_id, chain_id FROM manifest_layers"):
        if manifest in roots:
            keep_blobs.add(blob)
            keep_layers.add(diff_id)
            keep_chains.add(chain)
    chains = {str(r[0]): (r[1], str(r[2]))
              for r in q("SELECT chain_id, parent, diff_id FROM chains")}
    extractions = q("SELECT driver, chain_id, path, in_use FROM extractions")
    for _driver, chain, _path, in_use in extractions:
        cur = chain if in_use else None
        while cur is not None and cur in chains:   # an in-use chain keeps its ancestry
            keep_chains.add(cur)
            parent, diff_id = chains[cur]
            keep_layers.add(diff_id)
            cur = parent
    # rows ------------------------------------------------------------------------------
    drop_ex = [(d, ch, p) for d, ch, p, u in extractions if not u and ch not in keep_chains]
    for d, ch, _p in drop_ex:
        c.execute("DELETE FROM extractions WHERE driver = ? AND chain_id = ?", (d, ch))
    for (m,) in q("SELECT digest FROM manifests"):
        if m not in roots:
            c.execute("DELETE FROM manifests WHERE digest = ?", (m,))
            c.execute("DELETE FROM manifest_layers WHERE manifest = ?", (m,))
            res.add("manifests", m, 0)
    for ch in chains:
        if ch not in keep_chains:
            c.execute("DELETE FROM chains WHERE chain_id = ?", (ch,))
            res.add("chains", ch, 0)
    for (d,) in q("SELECT diff_id FROM layers"):
        if d not in keep_layers:
            c.execute("DELETE FROM layers WHERE diff_id = ?", (d,))
    c.execute("DELETE FROM layer_objects WHERE diff_id NOT IN (SELECT diff_id FROM layers)")
    for (b,) in q("SELECT digest FROM blobs"):
        if b not in keep_blobs:
            c.execute("DELETE FROM blobs WHERE digest = ?", (b,))
    c.execute("DELETE FROM objects WHERE digest NOT IN (SELECT object FROM layer_objects)")
    kept_layers = {str(r[0]) for r in q("SELECT diff_id FROM layers")}
    kept_ex = {str(r[0]) for r in q("SELECT path FROM extractions")}
    res.kept = {"refs": len(roots), "layers": len(kept_layers), "blobs": len(keep_blobs),
                "objects": int(q("SELECT COUNT(*) FROM objects")[0][0]),
                "extractions": len(kept_ex)}
    # files -----------------------------------------------------------------------------
    doomed: list[tuple[str, str, str, int]] = []
    for name in _listdir(store.blob_dir):
        p = os.path.join(store.blob_dir, name)
        if not (_HEX64.match(name) and f"sha256:{name}" in keep_blobs):
            doomed.append(("blobs", f"sha256:{name}", p, _size(p)))
    for name in _listdir(store.layers_dir):
        p = os.path.join(store.layers_dir, name)
        hexd = name.removesuffix(".tar-split")
        if not (name.endswith(".tar-split") and f"sha256:{hexd}" in kept_layers):
            doomed.append(("layers", f"sha256:{hexd}", p, _size(p)))
    for i in range(256):    # one directory and one index range at a time: bounded memory
        pfx = f"{i:02x}"
        d = os.path.join(store.objects_dir, pfx)
        names = _listdir(d)
        if not names:
            continue
        lo = f"sha256:{pfx}"
        used = {str(r[0])[7:] for r in c.execute(
            "SELECT digest FROM objects WHERE digest >= ? AND digest < ?",
            (lo, lo + "g")).fetchall()}
        for name in names:
            if not (_HEX62.match(name) and pfx + name in used):
                p = os.path.join(d, name)
                doomed.append(("objects", f"sha256:{pfx}{name}", p, _size(p)))
    for driver in _listdir(store.extract_dir):
        ddir = os.path.join(store.extract_dir, driver)
        for name in _listdir(ddir):
            p = os.path.join(ddir, name)
            if p not in kept_ex:
                doomed.append(("extractions", f"{driver}/{name}", p, tree_size(p)))
    extract_root = store.extract_dir + os.sep
    for d, ch, p in drop_ex:
        if not p.startswith(extract_root) and d in removers:
            doomed.append(("extractions", f"{d}/{ch}", p, 0))  # the driver's own place
    return doomed


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []
