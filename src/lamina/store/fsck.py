"""Check the store: rows against files both ways, files against their names.

*Problems* are damage: an object or blob whose content does not hash to its
name, a row whose file is missing, a ready layer whose tar-split references
an object that is missing or not recorded for it, or does not rebuild to its
diff_id, rows pointing at rows that do not exist.  *Garbage* is what an
interrupted command or a removed ref leaves (files without rows, rows nothing
references, staging of dead processes): harmless, and ``gc`` removes it.

``quick`` compares sizes instead of hashing.  ``repair`` (under the exclusive
lock) deletes damaged objects and blobs and every layer that needs them, and
orphan rows; the images that used them need a new ``lamina import``, which
re-ingests exactly what is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from lamina.errors import LaminaError
from lamina.store.locking import reclaim
from lamina.stream.splitdirfdstream import FILE, read_chunks, write_tar
from lamina.stream.stored import open_stored

if TYPE_CHECKING:
    from lamina.store.store import Store

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_OBJ_NAME = re.compile(rb"^([0-9a-f]{2})/([0-9a-f]{62})$")
_IO = 1 << 20


@dataclass(frozen=True)
class Finding:
    kind: str           # e.g. corrupt-object, missing-object, orphan-row, unreferenced-object
    subject: str        # a digest, a path or a row
    detail: str = ""


@dataclass
class FsckResult:
    store: str
    quick: bool = False
    problems: list[Finding] = field(default_factory=list)
    garbage: list[Finding] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    repaired: list[str] = field(default_factory=list)
    affected_refs: list[str] = field(default_factory=list)   # need a new import

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, kind: str, subject: str, detail: str = "") -> None:
        self.problems.append(Finding(kind, subject, detail))

    def junk(self, kind: str, subject: str, detail: str = "") -> None:
        self.garbage.append(Finding(kind, subject, detail))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


class _HashSink:
    def __init__(self) -> None:
        self.n = 0

    def write(self, b: bytes) -> int:
        self.n += len(b)
        return len(b)


def check(store: Store, *, quick: bool = False, repair: bool = False) -> FsckResult:
    res = FsckResult(store.path, quick)
    lock = (store.lock.exclusive(wait=store.options.wait) if repair
            else store.lock.shared(wait=store.options.wait))
    with lock:
        bad_objects, bad_layers, bad_blobs, orphans = _check(store, res, quick)
        if repair and (bad_objects or bad_layers or bad_blobs or orphans):
            _repair(store, res, bad_objects, bad_layers, bad_blobs, orphans)
    return res


def _hash_file(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while b := f.read(_IO):
            h.update(b)
            n += len(b)
    return h.hexdigest(), n


def _check(store: Store, res: FsckResult, quick: bool) -> tuple[
        set[str], set[str], set[str], list[tuple[str, tuple[str, ...]]]]:
    db = store.db
    with db.mu:     # one read transaction: a consistent snapshot of every table
        db.conn.execute("BEGIN")
        try:
            def q(sql: str) -> list[Any]:
                return db.conn.execute(sql).fetchall()
            refs = q("SELECT name, manifest FROM refs")
            manifests = {str(r[0]): str(r[1]) for r in q("SELECT digest, config FROM manifests")}
            mlayers = q("SELECT manifest, idx, blob, diff_id, chain_id FROM manifest_layers")
            layers = {str(r[0]): (str(r[1]), int(r[2])) for r in q(
                "SELECT diff_id, state, tar_size FROM layers")}
            chains = {str(r[0]): str(r[1]) for r in q("SELECT chain_id, diff_id FROM chains")}
            objects = {str(r[0])[7:]: int(r[1]) for r in q("SELECT digest, size FROM objects")}
            lobj: dict[str, set[str]] = {}
            for d, o in q("SELECT diff_id, object FROM layer_objects"):
                lobj.setdefault(str(d), set()).add(str(o)[7:])
            blobs = {str(r[0]): int(r[1]) for r in q("SELECT digest, size FROM blobs")}
            extractions = q("SELECT driver, chain_id, path FROM extractions")
        finally:
            db.conn.execute("COMMIT")

    bad_objects: set[str] = set()       # hex
    bad_layers: set[str] = set()        # diff_id
    bad_blobs: set[str] = set()         # digest
    orphans: list[tuple[str, tuple[str, ...]]] = []     # (table, key)

    # objects: every file against its name, rows against files -----------------------------
    present: dict[str, int] = {}
    for i in range(256):
        pfx = f"{i:02x}"
        d = os.path.join(store.objects_dir, pfx)
        for name in _listdir(d):
            p = os.path.join(d, name)
            hexd = pfx + name
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if len(name) != 62 or not _HEX64.match(hexd) or not os.path.isfile(p) \
                    or os.path.islink(p):
                res.junk("stray-file", p)
                continue
            present[hexd] = st.st_size
            if hexd not in objects:
                res.junk("unreferenced-object", f"sha256:{hexd}")
                continue
            if st.st_size != objects[hexd]:
                res.problem("corrupt-object", f"sha256:{hexd}",
                            f"{st.st_size} bytes, recorded {objects[hexd]}")
                bad_objects.add(hexd)
            elif not quick:
                got, _n = _hash_file(p)
                if got != hexd:
                    res.problem("corrupt-object", f"sha256:{hexd}", f"content is sha256:{got}")
                    bad_objects.add(hexd)
    res.checked["objects"] = len(present)
    referenced = set().union(*lobj.values()) if lobj else set()
    for hexd in objects:
        if hexd not in present:
            res.problem("missing-object", f"sha256:{hexd}", "row without a file")
            bad_objects.add(hexd)
        elif hexd not in referenced:
            res.junk("unreferenced-object-row", f"sha256:{hexd}")
    for diff_id, objs in lobj.items():
        if diff_id not in layers:
            orphans.append(("layer_objects", (diff_id,)))
            res.problem("orphan-row", f"layer_objects {diff_id}", "no such layer")
        for hexd in objs:
            if hexd not in objects:
                res.problem("orphan-row", f"layer_objects {diff_id} sha256:{hexd}",
                            "no such object row")
                bad_layers.add(diff_id)
    # layers: tar-split present, references recorded, rebuilds to the diff_id ---------------
    for diff_id, (state, tar_size) in sorted(layers.items()):
        if state != "ready":
            continue
        path = store.tar_split_path(diff_id)
        if not os.path.exists(path):
            res.problem("missing-tar-split", diff_id)
            bad_layers.add(diff_id)
            continue
        try:
            err = _check_layer(store, path, diff_id, tar_size, lobj.get(diff_id, set()),
                               present, quick)
        except LaminaError as e:
            err = e.message
        if err:
            res.problem("bad-layer", diff_id, err)
            bad_layers.add(diff_id)
    res.checked["layers"] = len(layers)
    for name in _listdir(store.layers_dir):
        hexd = name.removesuffix(".tar-split")
        if not (name.endswith(".tar-split") and f"sha256:{hexd}" in layers):
            res.junk("unreferenced-tar-split", os.path.join(store.layers_dir, name))
    # blobs ----------------------------------------------------------------------------------
    files = set(_listdir(store.blob_dir))
    for digest, size in sorted(blobs.items()):
        hexd = digest[7:]
        p = os.path.join(store.blob_dir, hexd)
        if hexd not in files:
            res.problem("missing-blob", digest, "row without a file")
            bad_blobs.add(digest)
            continue
        n = os.lstat(p).st_size
        if n != size:
            res.problem("corrupt-blob", digest, f"{n} bytes, recorded {size}")
            bad_blobs.add(digest)
        elif not quick and _hash_file(p)[0] != hexd:
            res.problem("corrupt-blob", digest, "content does not match the digest")
            bad_blobs.add(digest)
    for name in sorted(files):
        if f"sha256:{name}" not in blobs:
            res.junk("unreferenced-blob", f"sha256:{name}")
    res.checked["blobs"] = len(blobs)
    # manifests, refs, chains, extractions: rows against rows ----------------------------------
    for name, manifest in refs:
        if manifest not in manifests:
            res.problem("dangling-ref", str(name), f"manifest {manifest} is not in the store")
    for digest, config in manifests.items():
        for b in (digest, config):
            if b not in blobs:
                res.problem("missing-blob", b, f"needed by manifest {digest}")
    for manifest, idx, blob, diff_id, chain in mlayers:
        where = f"manifest {manifest} layer {idx}"
        if manifest not in manifests:
            res.problem("orphan-row", f"manifest_layers {manifest} {idx}", "no such manifest")
            orphans.append(("manifest_layers", (str(manifest),)))
            continue
        if blob not in blobs:
            res.problem("missing-blob", str(blob), f"needed by {where}")
        if layers.get(diff_id, ("", 0))[0] != "ready":
            res.problem("missing-layer", str(diff_id), f"needed by {where}")
        if chain not in chains:
            res.problem("orphan-row", f"manifest_layers {manifest} {idx}",
                        f"chain {chain} is not recorded")
    for chain, diff_id in chains.items():
        if diff_id not in layers:
            res.junk("unreferenced-chain", chain, f"layer {diff_id} is not in the store")
    for driver, chain, path in extractions:
        if chain not in chains:
            res.problem("orphan-row", f"extractions {driver} {chain}", "no such chain")
            orphans.append(("extractions", (str(driver), str(chain))))
        elif not os.path.lexists(path):
            res.problem("missing-extraction", f"{driver} {chain}", f"{path} does not exist")
            orphans.append(("extractions", (str(driver), str(chain))))
    known_ex = {str(p) for _d, _c, p in extractions}
    for driver in _listdir(store.extract_dir):
        for name in _listdir(os.path.join(store.extract_dir, driver)):
            p = os.path.join(store.extract_dir, driver, name)
            if p not in known_ex:
                res.junk("unreferenced-extraction", p)
    for name, _size in reclaim(store.tmp_dir, dry_run=True):
        res.junk("stale-tmp", os.path.join(store.tmp_dir, name))
    # which images need a new import -------------------------------------------------------
    broken = set(bad_layers)
    for hexd in bad_objects:
        broken.update(d for d, objs in lobj.items() if hexd in objs)
    need = {str(m) for m, _i, b, d, _c in mlayers if d in broken or b in bad_blobs}
    need.update(m for m, c in manifests.items() if m in bad_blobs or c in bad_blobs)
    res.affected_refs = sorted(str(n) for n, m in refs if m in need)
    return bad_objects, broken, bad_blobs, orphans


def _check_layer(store: Store, path: str, diff_id: str, tar_size: int, recorded: set[str],
                 present: dict[str, int], quick: bool) -> str:
    with open_stored(path) as f:
        if quick:
            total = 0
            for ch in read_chunks(f):
                total += ch.size
                if ch.kind != FILE:
                    continue
                m = _OBJ_NAME.match(ch.name or b"")
                if ch.dirfd_index != 0 or m is None:
                    return f"file chunk {ch.name!r} does not name an object"
                hexd = (m.group(1) + m.group(2)).decode()
                if hexd not in recorded:
                    return f"references sha256:{hexd}, which is not recorded for the layer"
                if present.get(hexd) != ch.size:
                    return f"object sha256:{hexd} is missing or not {ch.size} bytes"
            if total != tar_size:
                return f"expands to {total} bytes, recorded {tar_size}"
            return ""
        names: set[str] = set()

        def chunks() -> Iterator[Any]:
            for ch in read_chunks(f):
                if ch.kind == FILE:
                    m = _OBJ_NAME.match(ch.name or b"")
                    if m is not None:
                        names.add((m.group(1) + m.group(2)).decode())
                yield ch

        sink = _HashSink()
        digest = write_tar(chunks(), [store.objects_fd], sink)  # type: ignore[arg-type]
    if digest != diff_id:
        return f"rebuilds to {digest} ({sink.n} bytes)"
    missing = names - recorded
    if missing:
        return f"references sha256:{sorted(missing)[0]}, which is not recorded for the layer"
    return ""


def _repair(store: Store, res: FsckResult, bad_objects: set[str], bad_layers: set[str],
            bad_blobs: set[str], orphans: list[tuple[str, tuple[str, ...]]]) -> None:
    """Delete what is damaged (rows first, then files); re-import brings it back."""
    with store.db.tx() as c:
        for diff_id in sorted(bad_layers):
            c.execute("DELETE FROM layers WHERE diff_id = ?", (diff_id,))
            c.execute("DELETE FROM layer_objects WHERE diff_id = ?", (diff_id,))
            res.repaired.append(f"dropped layer {diff_id}")
        for hexd in sorted(bad_objects):
            c.execute("DELETE FROM objects WHERE digest = ?", (f"sha256:{hexd}",))
            res.repaired.append(f"dropped object sha256:{hexd}")
        for digest in sorted(bad_blobs):
            c.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
            res.repaired.append(f"dropped blob {digest}")
        for table, key in orphans:
            if table == "layer_objects":
                c.execute("DELETE FROM layer_objects WHERE diff_id = ?", key)
            elif table == "manifest_layers":
                c.execute("DELETE FROM manifest_layers WHERE manifest = ?", key)
            elif table == "extractions":
                c.execute("DELETE FROM extractions WHERE driver = ? AND chain_id = ?", key)
            res.repaired.append(f"deleted orphan {table} row {' '.join(key)}")
    for diff_id in bad_layers:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(store.tar_split_path(diff_id))
    for hexd in bad_objects:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(store.object_path(f"sha256:{hexd}"))
    for digest in bad_blobs:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(store.blob_path(digest))


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []
