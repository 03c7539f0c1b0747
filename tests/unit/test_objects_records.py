"""Tree records of the objects driver: a replayed tree is the tree the layers made.

A record is taken from the disk after the layer-by-layer writer built a
chain's rootfs and replayed in C by later unpacks (see
lamina.drivers.materialize).  Every test compares a replayed rootfs with one
built layer by layer (or by the copy driver's writer) field by field:
types, modes, owners, mtimes, xattrs, hardlink groups, content hashes.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from lamina.drivers import materialize, objects
from lamina.drivers.base import ChainLayer, ClaimRequest
from lamina.drivers.materialize import (
    StoreRootfsWriter,
    TreeRecord,
    apply_split,
    decode_record,
    encode_record,
    record_tree,
    records_enabled,
)
from lamina.drivers.objects import TREES, ObjectsDriver
from lamina.drivers.objects import factory as objects_factory
from lamina.layer.extract import ExtractOptions, LayerStats
from lamina.layer.snapshot import read_snapshot, take_snapshot
from lamina.layer.tarstream import TarEntry
from lamina.store import Store, StoreOptions
from lamina.testing.extract import apply_layers
from lamina.testing.images import build_image
from lamina.testing.layers import TarBuilder
from lamina.testing.tree import diff_manifests, tree_manifest

pytestmark = pytest.mark.skipif(not records_enabled(), reason="fast path not built here")

ROOT = os.geteuid() == 0


@pytest.fixture(autouse=True)
def record_every_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    # these layers are small: record them anyway (one test checks the threshold)
    monkeypatch.setattr(objects, "RECORD_MIN", 0)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(str(tmp_path / "store"), options=StoreOptions(fsync=False)) as st:
        yield st


def _layers(devices: bool) -> list[bytes]:
    lower = (TarBuilder()
             .add_dir("usr", 0o755, mtime=10).add_dir("usr/lib", 0o751, mtime=20)
             .add_symlink("lib", "usr/lib", uid=3, gid=4, mtime=30)
             .add_dir("etc", 0o755, mtime=100)
             .add_file("etc/a", b"alpha", 0o640, uid=1000, gid=1000, mtime=40)
             .add_file("etc/b", b"beta" * 3000)
             .add_file("etc/suid", b"s", 0o4755)
             .add_dir("o", 0o700, mtime=200).add_file("o/x", b"x").add_file("o/y", b"y")
             .add_hardlink("etc/a-link", "etc/a")
             .add_symlink("etc/s", "a")
             .add_hardlink("etc/s-link", "etc/s")            # a hardlink to a symlink
             .add_file("empty", b"").add_hardlink("empty-link", "empty")
             .add_file("xa", b"xattr", xattrs={"user.k": b"v", "user.z": b"\0\1"})
             .add_dir("xd", 0o711, xattrs={"user.d": b"dir"})
             .add_dir("ro", 0o555, mtime=300).add_file("ro/f", b"f")
             .add_dir("sg", 0o2775, mtime=350).add_file("sg/f", b"g")
             # the umask takes group write, a sticky bit: made 0700, their mode set last
             .add_dir("gw", 0o775, mtime=360).add_file("gw/f", b"w")
             .add_dir("tmp", 0o1777, mtime=370)
             .add_fifo("run-fifo", 0o620, uid=5, gid=6)
             .add_dir("deep/er/still", 0o700, mtime=400))    # implicit parents
    if devices:
        lower.add_char("null", 1, 3, 0o666).add_block("blk", 7, 200, 0o660, uid=6)
    upper = (TarBuilder()
             .add_whiteout("etc/b")
             .add_opaque("o")
             .add_file("o/z", b"z")
             .add_file("ro/g", b"written below a read-only directory")
             .add_file("etc/a", b"replaced", 0o600, mtime=50)
             .add_file("lib/through-link", b"via the lib symlink")
             .add_dir("", 0o750, uid=0, gid=0, mtime=500)       # the root itself
             .build())
    return [lower.build(), upper]


def _build(root: Path, opts: ExtractOptions, store: Store, placement: str,
           farms: list[str]) -> tuple[StoreRootfsWriter, dict[str, tuple[object, ...]],
                                      list[materialize.RecordEntry] | None]:
    """The chain layer by layer; returns the writer (finished, closed), the rows
    taken before finish and the record made from them, as the driver makes it."""
    root.mkdir()
    w = StoreRootfsWriter(str(root), opts, store.objects_fd, placement)  # type: ignore[arg-type]
    try:
        for i, la in enumerate(store.image("img:t").layers):
            if placement == "link":
                w.set_farm(farms[i])
            apply_split(w, store.tar_split_path(la.diff_id), LayerStats())
            w.set_farm(None)
        rows = take_snapshot(str(root), w.hashes)
        entries = record_tree(w, rows, farms if placement == "link" else [])
        w.finish()
    finally:
        w.close()
    return w, rows, entries


def _manifest(root: Path) -> dict[str, dict[str, object]]:
    m = tree_manifest(str(root), mtime=True)
    # implicit parents get the time they were made: not comparable between two trees
    for p in ("deep", "deep/er", "app"):
        if p in m:
            m[p].pop("mtime_ns", None)
    return m


@pytest.mark.parametrize("placement", ["clone", "copy", "link"])
@pytest.mark.parametrize("rootless", [True, False], ids=["rootless", "root"])
def test_replayed_record_equals_the_built_tree(tmp_path: Path, store: Store, placement: str,
                                               rootless: bool) -> None:
    if not rootless and not ROOT:
        pytest.skip("needs root")
    layers = _layers(devices=not rootless)
    build_image(str(tmp_path / "lay"), "t", layers)
    store.import_image(str(tmp_path / "lay"), "t", "img:t")
    opts = ExtractOptions(rootless=rootless)
    farms = []
    for i in range(2):
        (tmp_path / f"farm{i}").mkdir()
        farms.append(str(tmp_path / f"farm{i}"))
    built, rows, entries = _build(tmp_path / "built", opts, store, placement, farms)
    assert entries is not None
    kinds = {e[0] for e in entries}
    assert {"d", "f", "h", "l", "p"} <= kinds
    # through the file format and back
    chain = store.image("img:t").layers[-1].chain_id
    data = encode_record(TreeRecord(entries, LayerStats(7, 3)), chain, "k")
    rec = decode_record(data, chain, "k")
    assert rec is not None and rec.entries == entries and rec.stats.entries == 7

    root = tmp_path / "replayed"
    root.mkdir()
    w = StoreRootfsWriter(str(root), opts, store.objects_fd, placement)  # type: ignore[arg-type]
    fds = [os.open(f, os.O_RDONLY | os.O_DIRECTORY) for f in farms]
    try:
        w.replay(rec.entries, fds if placement == "link" else [])
        # (the builder also keeps hashes of paths later layers removed)
        assert w.hashes == {p: h for p, h in built.hashes.items()
                            if p in rows and rows[p][1] == "f"}
        assert w.dir_meta == built.dir_meta
        # as root, directories are final once replayed (but setgid ones, which would
        # give what later layers add their group): finish() leaves them alone
        final = {p for p, (mode, mtime) in w.dir_meta.items()
                 if p and stat.S_IMODE(os.lstat(root / p).st_mode) == mode
                 and (mtime < 0 or os.lstat(root / p).st_mtime_ns == mtime)}
        touched = w.finish(take_snapshot(str(root), w.hashes))
        if rootless:
            assert not final and set(touched) == set(w.dir_meta)
        else:
            assert final == set(w.dir_meta) - {"", "sg"}
            assert set(touched) == {"", "sg"}
    finally:
        w.close()
        for fd in fds:
            os.close(fd)
    assert diff_manifests(_manifest(tmp_path / "built"), _manifest(root),
                          names=("built", "replayed"), ignore_root=False) == []
    # and both are what the plain unpacker makes of the layers
    apply_layers(tmp_path / "want", *layers, rootless=rootless)
    assert diff_manifests(_manifest(tmp_path / "want"), _manifest(root),
                          ignore_fields={"link_group"} if placement == "link" else (),
                          names=("unpack", "replayed"), ignore_root=False) == []
    n_files = sum(1 for e in entries if e[0] == "f" and e[8] > 0)
    if placement == "link":
        assert w.place.linked == n_files and w.place.cloned == w.place.copied == 0
        assert os.stat(root / "etc/a").st_ino == os.stat(tmp_path / "built/etc/a").st_ino
    else:
        assert w.place.cloned + w.place.copied == n_files
        assert placement == "clone" or w.place.cloned == 0


def test_damaged_and_foreign_records_are_refused(store: Store) -> None:
    rec = TreeRecord([("d", "a", 0o755, 0, 0, 1, (), None, 0, None)])
    data = encode_record(rec, "sha256:" + "1" * 64, "k")
    assert decode_record(data, "sha256:" + "1" * 64, "k") is not None
    assert decode_record(data, "sha256:" + "2" * 64, "k") is None     # another chain
    assert decode_record(data, "sha256:" + "1" * 64, "other") is None  # other options
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    assert decode_record(bytes(flipped), "sha256:" + "1" * 64, "k") is None
    assert decode_record(data[:30], "sha256:" + "1" * 64, "k") is None
    # a format 1 record (zlib) is not read: it is made again
    import hashlib
    import marshal
    import zlib
    head = {"format": 1, "marshal": marshal.version, "chain": "sha256:" + "1" * 64, "key": "k",
            "stats": [0, 0, 0, 0, 0], "warnings": []}
    body = zlib.compress(marshal.dumps((head, rec.entries)), 1)
    old = b"LMTREE1\n" + hashlib.sha256(body).digest() + body
    assert decode_record(old, "sha256:" + "1" * 64, "k") is None
    # nor a zlib body under the new magic (a damaged one)
    assert decode_record(materialize.RECORD_MAGIC + old[8:], "sha256:" + "1" * 64, "k") is None


@pytest.mark.parametrize("entry", [
    ("d", "../up", 0o755, 0, 0, 0, (), None, 0, None),
    ("d", "/abs", 0o755, 0, 0, 0, (), None, 0, None),
    ("d", "a//b", 0o755, 0, 0, 0, (), None, 0, None),
    ("f", "a/./b", 0o644, 0, 0, 0, (), None, 0, None),
    ("f", "f", 0o644, 0, 0, 0, (), None, 5, None),           # content but no digest
    ("f", "f", 0o644, 0, 0, 0, (), (3, b"x" * 32), 5, None),  # no such farm
    ("h", "h", 0, 0, 0, 0, (), "../x", 0, None),
    ("x", "f", 0o644, 0, 0, 0, (), None, 0, None),
], ids=["dotdot", "absolute", "empty-component", "dot", "no-digest", "farm", "link-up",
        "kind"])
def test_replay_refuses_malformed_entries(tmp_path: Path, entry: tuple[object, ...]) -> None:
    root = tmp_path / "r"
    root.mkdir()
    w = StoreRootfsWriter(str(root), ExtractOptions(rootless=True), os.open(tmp_path, os.O_RDONLY))
    try:
        with pytest.raises(ValueError, match="malformed"):
            w.replay([entry], [])  # type: ignore[list-item]
    finally:
        os.close(w.objects_fd)
        w.close()
    assert os.listdir(root) == []


# -- through the driver ----------------------------------------------------------------------

def _images(tmp_path: Path, store: Store) -> list[bytes]:
    lower, upper = _layers(devices=False)
    top_a = TarBuilder().add_file("app/a", b"a" * 10000).add_whiteout("xa").build()
    top_b = TarBuilder().add_file("app/b", b"b" * 10000).add_opaque("usr").build()
    build_image(str(tmp_path / "lay"), "a", [lower, upper, top_a])
    build_image(str(tmp_path / "lay"), "b", [lower, upper, top_b])
    store.import_image(str(tmp_path / "lay"), "a", "img:a")
    store.import_image(str(tmp_path / "lay"), "b", "img:b")
    return [lower, upper, top_a, top_b]


def _prepare(store: Store, name: str, bundle: Path, read_only: bool = False,
             rootless: bool = True) -> ObjectsDriver:
    img = store.image(name)
    chain = tuple(ChainLayer(x.desc, x.diff_id, x.chain_id) for x in img.layers)
    req = ClaimRequest(img.manifest, img.config, chain, str(bundle), read_only=read_only,
                       rootless=rootless, store=store, image=name)
    drv = objects_factory.claim(req)
    assert isinstance(drv, ObjectsDriver)
    drv.prepare()
    return drv


@pytest.mark.parametrize("read_only", [False, True], ids=["clone", "link"])
def test_driver_replays_the_longest_recorded_prefix(tmp_path: Path, store: Store,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    read_only: bool) -> None:
    lower, upper, top_a, top_b = _images(tmp_path, store)
    apply_layers(tmp_path / "want-a", lower, upper, top_a)
    apply_layers(tmp_path / "want-b", lower, upper, top_b)
    ignore = {"link_group"} if read_only else set()

    def check(bundle: str, want: str) -> None:
        assert diff_manifests(_manifest(tmp_path / want), _manifest(tmp_path / bundle / "rootfs"),
                              ignore_fields=ignore, names=(want, bundle), ignore_root=True) == []

    first = _prepare(store, "img:a", tmp_path / "a1", read_only)
    assert first.reused == 0
    check("a1", "want-a")
    chains = [x.chain_id for x in store.image("img:a").layers]
    assert all(store.extraction(TREES, c) is not None for c in chains)   # one per prefix
    again = _prepare(store, "img:a", tmp_path / "a2", read_only)
    assert again.reused == 3            # the whole chain replayed
    check("a2", "want-a")
    # the replay places the final tree's files only (layer by layer, overwritten and
    # whited-out files were placed too)
    meta = [json.loads((tmp_path / b / "lamina.json").read_text())["objects"]
            for b in ("a1", "a2")]
    placed = [m["cloned"] + m["copied"] + m["linked"] for m in meta]
    assert meta[0]["placement"] == meta[1]["placement"]
    assert 5 < placed[1] < placed[0]
    sibling = _prepare(store, "img:b", tmp_path / "b1", read_only)
    assert sibling.reused == 2          # lower + upper replayed, its top applied
    check("b1", "want-b")
    # without the compiled path: layer by layer, same tree
    monkeypatch.setenv("LAMINA_NO_FASTPATH", "1")
    slow = _prepare(store, "img:b", tmp_path / "b2", read_only)
    assert slow.reused == (3 if read_only else 0)   # link farms, never records
    check("b2", "want-b")


def test_failed_replay_starts_over_layer_by_layer(tmp_path: Path, store: Store,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    lower, upper, top_a, _ = _images(tmp_path, store)
    apply_layers(tmp_path / "want", lower, upper, top_a)
    _prepare(store, "img:a", tmp_path / "a1")
    real = StoreRootfsWriter.replay

    def half_then_fail(self: StoreRootfsWriter, entries: list[materialize.RecordEntry],
                       fds: list[int], dropped: object = ()) -> None:
        real(self, entries[:5], fds)
        raise OSError(5, "injected")

    monkeypatch.setattr(StoreRootfsWriter, "replay", half_then_fail)
    drv = _prepare(store, "img:a", tmp_path / "a2")
    assert drv.reused == 0
    assert diff_manifests(_manifest(tmp_path / "want"), _manifest(tmp_path / "a2/rootfs"),
                          ignore_root=True) == []


def test_damaged_record_file_is_made_again(tmp_path: Path, store: Store) -> None:
    _images(tmp_path, store)
    _prepare(store, "img:a", tmp_path / "a1")
    top = store.image("img:a").layers[-1].chain_id
    ex = store.extraction(TREES, top)
    assert ex is not None
    (rec,) = [Path(ex.path) / n for n in os.listdir(ex.path)]
    good = rec.read_bytes()
    rec.write_bytes(good[: len(good) // 2])       # torn by a crash
    drv = _prepare(store, "img:a", tmp_path / "a2")
    assert drv.reused == 2                        # the next shorter prefix
    assert rec.read_bytes() != good[: len(good) // 2]
    assert _prepare(store, "img:a", tmp_path / "a3").reused == 3
    # records go with their chains
    assert store.fsck().problems == []
    store.remove_ref("img:a")
    store.remove_ref("img:b")
    store.gc()
    assert store.extraction(TREES, top) is None and not os.path.exists(ex.path)


def test_small_layers_on_a_recorded_prefix_are_not_recorded(tmp_path: Path, store: Store,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    _images(tmp_path, store)
    monkeypatch.setattr(objects, "RECORD_MIN", 20)   # lower: 25 entries, the rest: a few each
    _prepare(store, "img:a", tmp_path / "a1")
    chains = [x.chain_id for x in store.image("img:a").layers]
    assert [store.extraction(TREES, c) is not None for c in chains] == [True, False, False]
    again = _prepare(store, "img:a", tmp_path / "a2")
    assert again.reused == 1            # the lower layer's record; the rest applied again
    assert diff_manifests(_manifest(tmp_path / "a1/rootfs"), _manifest(tmp_path / "a2/rootfs"),
                          ignore_root=True) == []


# -- what the layer above a replay hides ------------------------------------------------------

def _e(kind: str, path: str, src: object = None, size: int = 0,
       xattrs: tuple[tuple[bytes, bytes], ...] = ()) -> materialize.RecordEntry:
    return (kind, path, 0o755, 0, 0, 0, xattrs, src, size, None)


def _layer(*members: tuple[str, str]) -> list[TarEntry]:
    return [TarEntry(name, kind, 0o644, 0, 0, 0, 0, linkname="x" if kind == "hardlink" else "")
            for kind, name in members]


_FARM = (0, b"\0" * 32)
_RECORD = [_e("d", "a"), _e("d", "a/o"), _e("d", "a/o/d"), _e("d", "a/keep"), _e("d", "a/o!"),
           _e("f", "a/o/f", _FARM, 3), _e("f", "a/o/d/g", _FARM, 3), _e("l", "a/o/s", "f"),
           _e("f", "a/o!/f", _FARM, 3), _e("f", "a/w", _FARM, 3), _e("f", "a/wx", _FARM, 3),
           _e("h", "a/o/h", "a/o/f")]


def test_prune_drops_what_whiteouts_hide_and_nothing_else() -> None:
    layer = _layer(("dir", "a/o/"), ("file", "a/o/.wh..wh..opq"), ("file", "a/.wh.w"),
                   ("file", "a/o/new"))
    got = materialize.prune_hidden(_RECORD, layer, False)
    assert got is not None
    kept, dropped = got
    assert sorted(e[1] for e in dropped) == ["a/o/d", "a/o/d/g", "a/o/f", "a/o/h", "a/o/s",
                                            "a/w"]
    assert kept + dropped == sorted(_RECORD, key=lambda e: e[1] in {x[1] for x in dropped})
    # a directory the layer writes below keeps its lower metadata: never dropped
    kept, dropped = materialize.prune_hidden(
        _RECORD, [*layer, *_layer(("file", "a/o/d/new"))], False) or ([], [])
    assert "a/o/d" in {e[1] for e in kept} and "a/o/d/g" in {e[1] for e in dropped}
    # content cloned or copied from an object, or empty, is dropped too (the replay
    # counts it as it would have placed it)
    kept, dropped = materialize.prune_hidden(
        [*_RECORD, _e("f", "a/o/c", None, 3), _e("f", "a/o/e"), _e("f", "a/c", None, 3)],
        layer, False) or ([], [])
    assert {"a/o/c", "a/o/e"} <= {e[1] for e in dropped} and "a/c" in {e[1] for e in kept}


@pytest.mark.parametrize("case", ["hardlink", "record-symlink", "layer-symlink", "xattrs",
                                  "linked-from-kept", "dirlinks", "nothing"])
def test_prune_declines_what_it_cannot_be_sure_of(case: str) -> None:
    record = list(_RECORD)
    layer = _layer(("file", "a/o/.wh..wh..opq"))
    if case == "hardlink":
        layer += _layer(("hardlink", "a/o/x"))
    elif case == "record-symlink":      # a/o/s/x resolves through the record's symlink
        layer += _layer(("file", "a/o/s/x"))
    elif case == "layer-symlink":
        layer += _layer(("symlink", "b"), ("file", "b/x"))
    elif case == "xattrs":              # a refused xattr is warned about
        record.append(_e("f", "a/o/x", _FARM, 3, xattrs=((b"user.k", b"v"),)))
    elif case == "linked-from-kept":
        record.append(_e("h", "a/keep/h", "a/o/f"))
    elif case == "nothing":
        layer = _layer(("file", "a/new"), ("file", "a/.wh.missing"))
    assert materialize.prune_hidden(record, layer, case == "dirlinks") is None


@pytest.mark.skipif(not ROOT, reason="link farms with owners need root")
@pytest.mark.parametrize("read_only", [True, False], ids=["link", "clone"])
def test_replay_under_an_opaque_layer_makes_the_same_bundle(tmp_path: Path, store: Store,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           read_only: bool) -> None:
    lower = TarBuilder().add_dir("keep", 0o750, mtime=5).add_file("keep/f", b"k")
    for i in range(30):
        lower.add_file(f"o/d{i % 3}/f{i}", bytes([i]) * (i + 1), uid=i)
    lower.add_hardlink("o/d0/h", "o/d0/f0").add_symlink("o/s", "d1").add_file("o/e", b"")
    top = (TarBuilder().add_dir("o", 0o711, mtime=7).add_opaque("o").add_file("o/new", b"n")
           .add_whiteout("keep/f").build())
    build_image(str(tmp_path / "lay"), "t", [lower.build(), top])
    store.import_image(str(tmp_path / "lay"), "t", "img:t")
    dropped: list[int] = []
    real = StoreRootfsWriter.replay

    def spy(self: StoreRootfsWriter, entries: list[materialize.RecordEntry], fds: list[int],
            hidden: Sequence[materialize.RecordEntry] = ()) -> None:
        dropped.append(len(hidden))
        real(self, entries, fds, hidden)

    monkeypatch.setattr(StoreRootfsWriter, "replay", spy)

    def bundle(name: str) -> tuple[dict[str, object], list[tuple[object, ...]]]:
        drv = _prepare(store, "img:t", tmp_path / name, read_only=read_only,
                       rootless=read_only)     # (rootless owners are xattrs: not dropped)
        # the lower layer's record (and the top layer's farm)
        assert drv.reused == (2 if read_only else 1)
        meta = json.loads((tmp_path / name / "lamina.json").read_text())["objects"]
        with open(tmp_path / name / "lamina.snapshot", "rb") as f:
            # not ctime, inode, nor the root's mtime (when it was made: no layer sets it)
            rows = [r[:7] + r[9:] for r in read_snapshot(f) if r[0]]
        return meta, rows

    # the first unpack records the lower layer (not the top: too few entries); the next
    # ones replay it, pruned or not
    monkeypatch.setattr(objects, "RECORD_MIN", 10)
    _prepare(store, "img:t", tmp_path / "first", read_only=read_only, rootless=read_only)
    dropped.clear()
    pruned = bundle("pruned")
    assert dropped == [37]          # in o: 3 dirs, 30 files, link, symlink, empty file; keep/f
    monkeypatch.setattr(objects, "prune_hidden", lambda *a: None)
    whole = bundle("whole")
    assert dropped[-1] == 0
    assert pruned == whole      # lamina.json's counts too: linked, cloned or copied
    placed: dict[str, int] = pruned[0]  # type: ignore[assignment]
    n = placed["linked"] if read_only else placed["cloned"] + placed["copied"]
    assert n == (33 if read_only else 32)   # keep/f, o's 30 files, o/new (, o/d0/h)
    assert diff_manifests(_manifest(tmp_path / "whole/rootfs"),
                          _manifest(tmp_path / "pruned/rootfs"), ignore_root=True) == []


def test_prepare_pauses_the_collector_and_restores_it(tmp_path: Path, store: Store,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import gc
    _images(tmp_path, store)
    seen: list[bool] = []
    real = StoreRootfsWriter.finish

    def spy(self: StoreRootfsWriter, rows: object = None) -> dict[str, os.stat_result]:
        seen.append(gc.isenabled())
        return real(self, rows)  # type: ignore[arg-type]

    monkeypatch.setattr(StoreRootfsWriter, "finish", spy)
    assert gc.isenabled()
    _prepare(store, "img:a", tmp_path / "a1")
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:
        _prepare(store, "img:a", tmp_path / "a2")
        assert not gc.isenabled()       # a caller's choice is left as it was
    finally:
        gc.enable()


@pytest.mark.parametrize("read_only", [False, True], ids=["clone", "link"])
def test_replay_of_wide_and_deep_directories(tmp_path: Path, store: Store, read_only: bool
                                             ) -> None:
    # levels wide enough to be made on two threads, each level after its parents
    tb = TarBuilder().add_dir("p0", 0o755, mtime=1).add_dir("p1", 0o750, mtime=2)
    for i in range(40):
        tb.add_dir(f"p{i % 2}/d{i:02}", 0o700 + i % 8 * 0o10, mtime=1000 + i)
        tb.add_file(f"p{i % 2}/d{i:02}/f", bytes([i]) * 5)
        for k in range(1, i % 5 + 2):
            tb.add_dir(f"p{i % 2}/d{i:02}/" + "/".join("x" * k), 0o755, mtime=7 + k)
    layer = tb.build()
    build_image(str(tmp_path / "lay"), "w", [layer])
    store.import_image(str(tmp_path / "lay"), "w", "img:w")
    apply_layers(tmp_path / "want", layer)
    first = _prepare(store, "img:w", tmp_path / "w1", read_only)
    again = _prepare(store, "img:w", tmp_path / "w2", read_only)
    assert (first.reused, again.reused) == (0, 1)
    ignore = {"link_group"} if read_only else set()
    for b in ("w1", "w2"):
        assert diff_manifests(_manifest(tmp_path / "want"), _manifest(tmp_path / b / "rootfs"),
                              ignore_fields=ignore, names=("want", b), ignore_root=True) == []


@pytest.mark.parametrize("where", [0.0, 0.5, 1.0], ids=["first", "middle", "last"])
def test_replay_failure_on_either_thread_names_the_entry(tmp_path: Path, store: Store,
                                                          where: float) -> None:
    # the files are shared by two threads from either end: whichever meets the missing
    # object stops both and the replay reports that entry
    tb = TarBuilder()
    for i in range(300):
        tb.add_file(f"d{i % 30:02}/f{i:03}", b"%d" % i * 50, mtime=i)
    build_image(str(tmp_path / "lay"), "m", [tb.build()])
    store.import_image(str(tmp_path / "lay"), "m", "img:m")
    opts = ExtractOptions(rootless=True)
    (tmp_path / "built").mkdir()
    w = StoreRootfsWriter(str(tmp_path / "built"), opts, store.objects_fd)
    try:
        apply_split(w, store.tar_split_path(store.image("img:m").layers[0].diff_id),
                    LayerStats())
        entries = record_tree(w, take_snapshot(str(tmp_path / "built"), w.hashes))
    finally:
        w.close()
    assert entries is not None
    files = [i for i, e in enumerate(entries) if e[0] == "f"]
    k = files[round(where * (len(files) - 1))]
    bad = entries[k]
    entries[k] = (*bad[:9], b"\xee" * 32)       # an object the store does not have
    (tmp_path / "replayed").mkdir()
    r = StoreRootfsWriter(str(tmp_path / "replayed"), opts, store.objects_fd)
    try:
        with pytest.raises(FileNotFoundError) as exc:
            r.replay(entries, [])
        assert exc.value.filename == bad[1]
    finally:
        r.close()
