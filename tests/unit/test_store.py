"""The content-addressed store: ids, objects, tar-split round trips, locking, gc, fsck."""

from __future__ import annotations

import hashlib
import io
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.errors import (
    CorruptLayerError,
    DigestMismatchError,
    EnvironmentError_,
    NotFoundError,
    UnsupportedError,
    UsageError,
)
from lamina.oci.layout import OCILayout
from lamina.store import Store, StoreOptions, chain_id, chain_ids, default_store_path, parse_ref
from lamina.store.objects import object_name
from lamina.stream.splitdirfdstream import FILE, read_chunks
from lamina.stream.stored import open_stored
from lamina.testing.images import build_image
from lamina.testing.layers import BLOCK, RawEntry, TarBuilder, header_block

OPTS = StoreOptions(fsync=False)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    st = Store.open(str(tmp_path / "store"), options=OPTS)
    yield st
    st.close()


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def export(st: Store, diff_id: str) -> bytes:
    buf = io.BytesIO()
    assert st.export_layer(diff_id, buf) == diff_id
    return buf.getvalue()


def rows(st: Store, sql: str) -> list[tuple[object, ...]]:
    return st.db.query(sql)


# -- identifiers ----------------------------------------------------------------------------

def test_chain_ids_follow_the_image_spec() -> None:
    # image-spec config.md: ChainID(L0) = DiffID(L0),
    # ChainID(L0|..|Ln) = Digest(ChainID(L0|..|Ln-1) + " " + DiffID(Ln))
    ab = sha(b"sha256:a sha256:b")
    abc = sha(ab.encode() + b" sha256:c")
    assert chain_ids(["sha256:a", "sha256:b", "sha256:c"]) == ["sha256:a", ab, abc]
    # pinned values, so a change of encoding (e.g. hashing bytes, not text) is caught
    assert ab == "sha256:970a948bffa8de94d6e22d747ba8c95030e6e546909f98f54e99a13005e173a8"
    assert abc == "sha256:dee159b33409cefa3f6eda71539f006014283e9d9130c18a1dea7bd8a33c9b1b"
    assert chain_id(None, "sha256:a") == "sha256:a"
    assert chain_ids([]) == []


def test_ref_names() -> None:
    assert parse_ref("app") == "app:latest"
    assert parse_ref("app:1.0") == "app:1.0"
    assert parse_ref("host:5000/lib/app") == "host:5000/lib/app:latest"
    assert parse_ref("host:5000/lib/app:v2") == "host:5000/lib/app:v2"
    for bad in ("", "app:", ":x", "a b", "app:t@g", "-app", "app:" + "t" * 200):
        with pytest.raises(UsageError):
            parse_ref(bad)


def test_default_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_store_path() == "/var/lib/lamina"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", "/data/u")
    assert default_store_path() == "/data/u/lamina"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", "/home/u")
    assert default_store_path() == "/home/u/.local/share/lamina"


# -- opening --------------------------------------------------------------------------------

def test_open_creates_the_tree_and_refuses_foreign_dirs(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with pytest.raises(NotFoundError):
        Store.open(str(p), create=False)
    with Store.open(str(p), options=OPTS) as st:
        assert st.db.version() == 1
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o700
    assert len(os.listdir(p / "objects")) == 256
    for d in ("blobs/sha256", "layers", "extract", "tmp", "locks"):
        assert (p / d).is_dir()
    jm = sqlite3.connect(p / "lamina.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert jm == "wal"
    with Store.open(str(p), create=False, options=OPTS):
        pass
    other = tmp_path / "home"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a lamina store"):
        Store.open(str(other))
    assert os.listdir(other) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError):
        Store.open(str(tmp_path / "file"))


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "s"
    Store.open(str(p), options=OPTS).close()
    con = sqlite3.connect(p / "lamina.db")
    con.execute("PRAGMA user_version = 99")
    con.commit()
    con.close()
    with pytest.raises(UnsupportedError, match="schema version 99"):
        Store.open(str(p), options=OPTS)


def test_damaged_index_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "s"
    p.mkdir()
    (p / "lamina.db").write_bytes(b"this is not an SQLite database" * 200)
    with pytest.raises(EnvironmentError_, match="not a database") as e:
        Store.open(str(p), options=OPTS)
    assert e.value.hint and "damaged" in e.value.hint


# -- tar-split round trips ------------------------------------------------------------------

def _layers() -> dict[str, bytes]:
    """Layers covering what a tar-split must keep byte for byte."""
    out: dict[str, bytes] = {}
    for fmt in ("pax", "gnu", "ustar"):
        t = TarBuilder(fmt)
        t.add_dir("etc").add_file("etc/empty", b"").add_file("etc/hosts", b"127.0.0.1 l\n")
        t.add_file("etc/same", b"127.0.0.1 l\n")            # duplicate content
        t.add_hardlink("etc/hosts.link", "etc/hosts").add_symlink("etc/sym", "/etc/hosts")
        t.add_char("dev/null", 1, 3).add_block("dev/sda", 8, 0).add_fifo("run/fifo")
        t.add_file("d/" + "n" * 90 + "/" + "m" * 60, b"long name\n")
        t.add_whiteout("old").add_opaque("var")
        if fmt != "ustar":
            t.add_file("x" * 200, b"very long name\n", uid=70000000, gid=3)
            t.add_symlink("l" * 10 + "/s", "t" * 150)
        if fmt == "pax":
            t.add_file("caps", b"\x7fELF", xattrs={"security.capability": b"\x01\x00\xff\x00",
                                                    "user.bin": b"\x00\xff"})
            t.add_file("h\u00e9llo/\u6587\u4ef6", b"utf-8 names\n")
            t.add_file("future", b"t", mtime=2 ** 40)
        out[fmt] = t.build()
    out["record-padded"] = (TarBuilder(pad_record=True).add_file("a", b"x" * 700)
                            .add_file("b", b"y").build())
    out["pax-global"] = (TarBuilder().add_pax_global({"comment": "git archive"})
                         .add_file("a", b"global\n").build())
    out["empty"] = TarBuilder().build()
    big = os.urandom(9 << 20)       # over objects.SMALL: the streaming path
    out["big"] = TarBuilder().add_file("big.bin", big).add_file("small", b"s").build()
    # non-zero padding after file data and junk after the end-of-archive marker survive
    data = b"data!"
    raw = (header_block(name="p", size=len(data)) + data + b"\xaa" * (BLOCK - len(data))
           + header_block(name="q", size=1) + b"q" + b"\0" * (BLOCK - 1) + bytes(2 * BLOCK)
           + b"trailing junk")
    out["dirty-padding"] = raw
    # a header-only type whose size field lies carries no data (as Go's archive/tar reads)
    out["lying-size"] = (TarBuilder().add_raw(RawEntry("lnk", b"2", linkname="t", size=0))
                         .add_file("f", b"after\n").build())
    return out


LAYERS = _layers()


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("compression", ["gzip", "zstd", "tar"])
def test_tar_split_rebuilds_the_exact_layer(tmp_path: Path, store: Store, name: str,
                                           compression: str) -> None:
    tar = LAYERS[name]
    build_image(str(tmp_path / "lay"), "t", [tar], compression=compression)
    res = store.import_image(str(tmp_path / "lay"), "t", "img")
    (li,) = res.layers
    assert li.ingested and li.diff_id == sha(tar) and li.stats.tar_size == len(tar)
    assert export(store, li.diff_id) == tar
    # every regular file with content became an object reference, and only those
    split = store.tar_split_path(li.diff_id)
    with open(split, "rb") as raw:      # kept zstd-compressed, and smaller than the stream
        assert raw.read(4) == b"\x28\xb5\x2f\xfd"
    with open_stored(split) as f:
        stream = f.read()
    assert os.path.getsize(split) < len(stream)
    refs = [c for c in read_chunks(io.BytesIO(stream)) if c.kind == FILE]
    assert len(refs) == li.stats.files
    assert all(c.dirfd_index == 0 for c in refs)
    for c in refs:
        assert c.name is not None
        p = os.path.join(store.objects_dir, c.name.decode())
        assert "sha256:" + c.name.decode().replace("/", "") == sha(Path(p).read_bytes())
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o444
    assert store.fsck().ok


def test_objects_are_deduplicated_across_layers_and_images(tmp_path: Path,
                                                           store: Store) -> None:
    shared = os.urandom(5000)
    a = TarBuilder().add_file("a1", shared).add_file("a2", shared).add_file("u", b"A").build()
    b = TarBuilder().add_file("b1", shared).add_file("u", b"B").build()
    build_image(str(tmp_path / "lay"), "a", [a])
    build_image(str(tmp_path / "lay"), "b", [b], compression="zstd")
    ra = store.import_image(str(tmp_path / "lay"), "a")
    rb = store.import_image(str(tmp_path / "lay"), "b")
    assert (ra.layers[0].stats.files, ra.layers[0].stats.new_objects) == (3, 2)
    assert (rb.layers[0].stats.files, rb.layers[0].stats.new_objects) == (2, 1)
    assert rb.layers[0].stats.new_bytes == 1
    objs = [os.path.join(r, f) for r, _d, fs in os.walk(store.objects_dir) for f in fs]
    assert len(objs) == 3
    assert rows(store, "SELECT COUNT(*) FROM objects") == [(3,)]
    assert store.object_path(sha(shared)) in objs
    assert export(store, sha(a)) == a and export(store, sha(b)) == b


def test_same_layer_other_compression_is_not_ingested_twice(tmp_path: Path,
                                                            store: Store) -> None:
    tar = TarBuilder().add_file("f", b"content\n").build()
    build_image(str(tmp_path / "lay"), "gz", [tar], compression="gzip")
    build_image(str(tmp_path / "lay"), "zst", [tar], compression="zstd")
    r1 = store.import_image(str(tmp_path / "lay"), "gz")
    r2 = store.import_image(str(tmp_path / "lay"), "zst")
    assert r1.layers[0].ingested and not r2.layers[0].ingested
    assert r1.layers[0].digest != r2.layers[0].digest
    assert store.has_blob(r1.layers[0].digest) and store.has_blob(r2.layers[0].digest)
    assert store.fsck().ok


def test_import_blob_verifies_before_publishing(tmp_path: Path, store: Store) -> None:
    tar = TarBuilder().add_file("f", b"blob").build()
    build_image(str(tmp_path / "lay"), "t", [tar])
    lay = OCILayout.open(str(tmp_path / "lay"))
    desc = lay.resolve("t").layers[0]
    assert store.import_blob(lay, desc).digest == desc.digest
    assert Path(store.blob_path(desc.digest)).read_bytes() == \
        Path(lay.blob_path(desc.digest)).read_bytes()
    assert rows(store, "SELECT digest FROM blobs") == [(desc.digest,)]
    cfg = lay.resolve("t").config
    liar = type(cfg)(cfg.media_type, desc.digest.replace("sha256:", "sha256:0", 1)[:71],
                     cfg.size)
    os.link(lay.blob_path(cfg.digest), lay.blob_path(liar.digest))
    with pytest.raises(DigestMismatchError):
        store.import_blob(lay, liar)
    assert not store.has_blob(liar.digest)
    assert os.listdir(store._staging.path) == []


def test_image_api_gives_layers_with_chain_ids(tmp_path: Path, store: Store) -> None:
    l1 = TarBuilder().add_file("a", b"1").build()
    l2 = TarBuilder().add_file("b", b"2").build()
    build_image(str(tmp_path / "lay"), "t", [l1, l2], config={"Cmd": ["/bin/sh"]})
    store.import_image(str(tmp_path / "lay"), "t", "app:v1")
    img = store.image("app:v1")
    assert [x.diff_id for x in img.layers] == [sha(l1), sha(l2)]
    assert [x.chain_id for x in img.layers] == chain_ids([sha(l1), sha(l2)])
    assert store.chain(img.layers[1].chain_id) == [sha(l1), sha(l2)]
    assert img.config.config["Cmd"] == ["/bin/sh"]
    # the store's blobs read like a layout
    lay = OCILayout(store.path)
    assert lay.read_json(img.manifest.config)["rootfs"]["diff_ids"] == [sha(l1), sha(l2)]
    assert [r.name for r in store.images()] == ["app:v1"]
    with pytest.raises(NotFoundError):
        store.image("nope")


# -- bad input ----------------------------------------------------------------------------

def _nothing_published(st: Store) -> None:
    for table in ("refs", "manifests", "layers", "layer_objects", "objects"):
        assert rows(st, f"SELECT COUNT(*) FROM {table}") == [(0,)], table
    assert os.listdir(st.layers_dir) == []
    assert os.listdir(st.blob_dir) == []


def test_corrupt_blob_publishes_nothing(tmp_path: Path, store: Store) -> None:
    tar = TarBuilder().add_file("f", b"x" * 4000).build()
    desc = build_image(str(tmp_path / "lay"), "t", [tar], compression="tar")
    lay = OCILayout.open(str(tmp_path / "lay"))
    layer = lay.resolve("t").layers[0]
    p = lay.blob_path(layer.digest)
    data = bytearray(Path(p).read_bytes())
    data[600] ^= 1      # inside the file's content: the tar still parses
    os.chmod(p, 0o644)
    Path(p).write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError):
        store.import_image(str(tmp_path / "lay"), "t")
    _nothing_published(store)
    assert desc.digest.startswith("sha256:")


def test_wrong_diff_id_and_truncated_layer(tmp_path: Path, store: Store) -> None:
    good = TarBuilder().add_file("f", b"hello").build()
    build_image(str(tmp_path / "a"), "t", [good],
                extra_config={"rootfs": {"type": "layers", "diff_ids": [sha(b"other")]}})
    with pytest.raises(DigestMismatchError, match="diff_id"):
        store.import_image(str(tmp_path / "a"), "t")
    _nothing_published(store)
    build_image(str(tmp_path / "b"), "t", [good[:700]])
    with pytest.raises(CorruptLayerError, match="truncated"):
        store.import_image(str(tmp_path / "b"), "t")
    _nothing_published(store)
    assert store.fsck().ok


def test_missing_layout_blob(tmp_path: Path, store: Store) -> None:
    build_image(str(tmp_path / "lay"), "t", [TarBuilder().add_file("f", b"1").build()])
    lay = OCILayout.open(str(tmp_path / "lay"))
    os.unlink(lay.blob_path(lay.resolve("t").layers[0].digest))
    with pytest.raises(NotFoundError, match="missing"):
        store.import_image(str(tmp_path / "lay"), "t")
    _nothing_published(store)


def test_hardlinks_only_blobs_we_own(tmp_path: Path) -> None:
    tar = TarBuilder().add_file("f", b"1").build()
    build_image(str(tmp_path / "lay"), "t", [tar])
    lay = OCILayout.open(str(tmp_path / "lay"))
    blob = lay.blob_path(lay.resolve("t").layers[0].digest)
    with Store.open(str(tmp_path / "s1"), options=OPTS) as st:
        st.import_image(lay, "t")
        assert os.stat(st.blob_path(lay.resolve("t").layers[0].digest)).st_ino == \
            os.stat(blob).st_ino
    with Store.open(str(tmp_path / "s2"), options=StoreOptions(fsync=False,
                                                               link_blobs=False)) as st:
        st.import_image(lay, "t")
        dst = st.blob_path(lay.resolve("t").layers[0].digest)
        assert os.stat(dst).st_ino != os.stat(blob).st_ino
        assert stat.S_IMODE(os.stat(dst).st_mode) == 0o444


# -- concurrency --------------------------------------------------------------------------

def test_second_ingest_waits_for_the_first_and_skips(tmp_path: Path) -> None:
    base = TarBuilder().add_file("base", os.urandom(100)).build()
    build_image(str(tmp_path / "lay"), "a", [base, TarBuilder().add_file("a", b"a").build()])
    build_image(str(tmp_path / "lay"), "b", [base, TarBuilder().add_file("b", b"b").build()])
    sp = str(tmp_path / "store")
    holder = Store.open(sp, options=OPTS)
    results: dict[str, object] = {}

    def run(tag: str) -> None:
        with Store.open(sp, options=OPTS) as st:
            try:
                results[tag] = st.import_image(str(tmp_path / "lay"), tag)
            except BaseException as e:  # surfaced by the assertions below
                results[tag] = e

    threads = [threading.Thread(target=run, args=(t,)) for t in ("a", "b")]
    with holder.layer_lock(sha(base)):
        for th in threads:
            th.start()
        time.sleep(0.5)
        assert all(th.is_alive() for th in threads), "imports did not wait for the lock"
        assert rows(holder, "SELECT COUNT(*) FROM layers") == [(0,)]
    for th in threads:
        th.join(30)
    ra, rb = results["a"], results["b"]
    from lamina.store import ImportResult
    assert isinstance(ra, ImportResult) and isinstance(rb, ImportResult)
    assert ra.layers[0].waited and rb.layers[0].waited
    assert ra.layers[0].ingested + rb.layers[0].ingested == 1     # done once
    assert ra.layers[1].ingested and rb.layers[1].ingested
    assert holder.fsck().ok
    holder.close()


def test_gc_waits_for_a_session_and_vice_versa(tmp_path: Path) -> None:
    sp = str(tmp_path / "store")
    a = Store.open(sp, options=OPTS)
    busy = Store.open(sp, options=StoreOptions(fsync=False, wait=False))
    with a.session():
        with pytest.raises(UsageError, match="busy"):
            busy.gc()
        with pytest.raises(UsageError, match="already locked by this process"):
            a.gc()
    assert busy.gc().counts["manifests"] == 0
    a.close()
    busy.close()


# -- killed processes -----------------------------------------------------------------------

def test_staging_of_dead_processes_is_reclaimed(tmp_path: Path) -> None:
    sp = tmp_path / "store"
    Store.open(str(sp), options=OPTS).close()
    pid = os.fork()
    if pid == 0:  # a "killed" writer: creates staging, then dies without cleaning up
        st = Store.open(str(sp), options=OPTS)
        with open(os.path.join(st._staging.path, "obj-1"), "wb") as f:
            f.write(b"half")
        os._exit(0)
    os.waitpid(pid, 0)
    assert len(os.listdir(sp / "tmp")) == 1
    with Store.open(str(sp), options=OPTS) as st:
        _ = st._staging.path      # ours, alive: must survive another open's reclaim
        assert len(os.listdir(sp / "tmp")) == 1
        with Store.open(str(sp), options=OPTS) as other:
            assert other.fsck().garbage == []
        assert os.listdir(sp / "tmp") == [os.path.basename(st._staging.path)]
    assert os.listdir(sp / "tmp") == []


# -- gc ---------------------------------------------------------------------------------------

def _two_images(tmp_path: Path, st: Store) -> tuple[bytes, bytes, bytes]:
    base = TarBuilder().add_file("shared", b"S" * 3000).add_file("b", b"base").build()
    a = TarBuilder().add_file("a", b"only in a").build()
    b = TarBuilder().add_file("b", b"only in b").add_file("s", b"S" * 3000).build()
    build_image(str(tmp_path / "lay"), "a", [base, a])
    build_image(str(tmp_path / "lay"), "b", [base, b])
    st.import_image(str(tmp_path / "lay"), "a")
    st.import_image(str(tmp_path / "lay"), "b")
    return base, a, b


def test_gc_keeps_what_refs_reach_and_removes_the_rest(tmp_path: Path, store: Store) -> None:
    base, a, b = _two_images(tmp_path, store)
    first = store.gc()
    assert first.removed == [] and first.counts["locks"] == 3    # one per ingested layer
    before = sorted(os.listdir(store.blob_dir))
    dry = store.gc(dry_run=True)
    assert dry.counts["manifests"] == 0
    store.remove_ref("lay:a")
    dry = store.gc(dry_run=True)
    assert dry.counts["manifests"] == 1 and dry.counts["layers"] == 1
    assert sorted(os.listdir(store.blob_dir)) == before        # dry run touched nothing
    assert store.layer(sha(a)) is not None
    res = store.gc()
    assert res.counts["manifests"] == 1 and res.counts["layers"] == 1
    assert res.counts["objects"] == 1                  # "only in a"; base's objects stay
    assert res.counts["blobs"] == 3                     # manifest, config, layer a
    assert res.total_freed > 0
    assert store.layer(sha(a)) is None and not os.path.exists(store.tar_split_path(sha(a)))
    assert not os.path.exists(store.object_path(sha(b"only in a")))
    assert os.path.exists(store.object_path(sha(b"S" * 3000)))
    assert export(store, sha(base)) == base and export(store, sha(b)) == b
    assert [r.name for r in store.images()] == ["lay:b"]
    f = store.fsck()
    assert f.ok and f.garbage == []
    store.remove_ref("lay:b")
    store.gc()
    assert rows(store, "SELECT COUNT(*) FROM objects") == [(0,)]
    assert [f for _r, _d, fs in os.walk(store.objects_dir) for f in fs] == []
    assert os.listdir(store.blob_dir) == [] and os.listdir(store.layers_dir) == []


def test_gc_removes_garbage_files_and_keeps_in_use_extractions(tmp_path: Path,
                                                               store: Store) -> None:
    base, a, _b = _two_images(tmp_path, store)
    img = store.image("lay:a")
    chain = img.layers[1].chain_id
    with store.extraction_lock("copy", chain), store.stage_extraction("copy", chain) as d:
        Path(d, "marker").write_text("built")
    ex = store.extraction("copy", chain)
    assert ex is not None and ex.state == "ready" and not ex.in_use
    assert Path(ex.path, "marker").read_text() == "built"
    store.set_in_use("copy", chain, True)
    # stray files: an object nobody references, a stray blob, an unregistered extraction
    Path(store.objects_dir, "ab", "c" * 62).write_bytes(b"stray")
    Path(store.blob_dir, "d" * 64).write_bytes(b"stray")
    os.makedirs(os.path.join(store.extract_dir, "copy", "e" * 64))
    junk = {f.kind for f in store.fsck().garbage}
    assert {"unreferenced-object", "unreferenced-blob", "unreferenced-extraction"} <= junk
    store.remove_ref("lay:a")
    res = store.gc()
    assert res.counts["objects"] == 1 and "extractions copy/" + "e" * 64 in res.removed
    # the in-use extraction keeps its whole chain (both layers) although no ref does
    assert os.path.isdir(ex.path)
    assert export(store, sha(a)) == a and export(store, sha(base)) == base
    assert store.fsck().ok
    store.set_in_use("copy", chain, False)
    res = store.gc()
    assert res.counts["extractions"] == 1 and not os.path.exists(ex.path)
    assert store.layer(sha(a)) is None and store.layer(sha(base)) is not None
    assert store.extractions() == []
    f = store.fsck()
    assert f.ok and f.garbage == []


# -- fsck ---------------------------------------------------------------------------------

def test_fsck_detects_a_corrupted_object(tmp_path: Path, store: Store) -> None:
    tar = TarBuilder().add_file("f", b"good content").build()
    build_image(str(tmp_path / "lay"), "t", [tar])
    store.import_image(str(tmp_path / "lay"), "t")
    p = store.object_path(sha(b"good content"))
    os.chmod(p, 0o644)
    Path(p).write_bytes(b"evil content")   # same size: only hashing notices
    assert store.fsck(quick=True).ok
    res = store.fsck()
    kinds = {f.kind for f in res.problems}
    assert "corrupt-object" in kinds and "bad-layer" in kinds
    assert res.affected_refs == ["lay:t"]
    with pytest.raises(DigestMismatchError):
        export(store, sha(tar))
    rep = store.fsck(repair=True)
    assert rep.repaired and not os.path.exists(p)
    assert store.layer(sha(tar)) is None
    after = store.fsck()
    assert {f.kind for f in after.problems} == {"missing-layer"}     # needs a re-import
    r = store.import_image(str(tmp_path / "lay"), "t")
    assert r.layers[0].ingested
    assert store.fsck().ok and export(store, sha(tar)) == tar


def test_fsck_detects_a_missing_object(tmp_path: Path, store: Store) -> None:
    tar = TarBuilder().add_file("f", b"will vanish").build()
    build_image(str(tmp_path / "lay"), "t", [tar])
    store.import_image(str(tmp_path / "lay"), "t")
    os.unlink(store.object_path(sha(b"will vanish")))
    for quick in (True, False):
        res = store.fsck(quick=quick)
        assert {f.kind for f in res.problems} >= {"missing-object", "bad-layer"}
        assert any(f.subject == sha(b"will vanish") for f in res.problems)


def test_fsck_detects_orphan_rows_and_missing_files(tmp_path: Path, store: Store) -> None:
    tar = TarBuilder().add_file("f", b"x").build()
    build_image(str(tmp_path / "lay"), "t", [tar])
    store.import_image(str(tmp_path / "lay"), "t")
    ghost = sha(b"no such layer")
    with store.db.tx() as c:
        c.execute("INSERT INTO layer_objects VALUES (?, ?)", (ghost, sha(b"x")))
    res = store.fsck()
    assert [(f.kind, f.subject) for f in res.problems] == [
        ("orphan-row", f"layer_objects {ghost}")]
    store.fsck(repair=True)
    assert store.fsck().ok
    os.unlink(store.tar_split_path(sha(tar)))
    res = store.fsck()
    assert [f.kind for f in res.problems] == ["missing-tar-split"]
    assert res.affected_refs == ["lay:t"]
    lay = store.image("lay:t")
    os.unlink(store.blob_path(lay.manifest.config.digest))
    assert "missing-blob" in {f.kind for f in store.fsck().problems}


def test_fsck_detects_an_unrecorded_object_reference(tmp_path: Path, store: Store) -> None:
    # gc trusts layer_objects: a tar-split reference missing there would be deleted
    tar = TarBuilder().add_file("f", b"needed").build()
    build_image(str(tmp_path / "lay"), "t", [tar])
    store.import_image(str(tmp_path / "lay"), "t")
    with store.db.tx() as c:
        c.execute("DELETE FROM layer_objects")
    for quick in (True, False):
        res = store.fsck(quick=quick)
        assert any(f.kind == "bad-layer" and "not recorded" in f.detail for f in res.problems)


def test_object_name_layout() -> None:
    h = hashlib.sha256(b"").hexdigest()
    assert object_name(h) == h[:2] + "/" + h[2:]
