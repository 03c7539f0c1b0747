"""``lamina copy`` and the store-backed ``lamina serve``: real CLI, real loop-mounted
reflink filesystems, real servers, hostile senders."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loopfs import loop_fs, shared_extents

from conftest import run_lamina
from lamina.errors import CorruptLayerError, DigestMismatchError, UnsafeLayerError, UsageError
from lamina.ipc.client import StoreClient
from lamina.oci.layout import OCILayout
from lamina.store import Store, StoreOptions
from lamina.store.receive import BlobInput, SourceIndex
from lamina.stream.splitdirfdstream import FILE, StreamWriter, from_tar
from lamina.testing.images import build_image, diff_id
from lamina.testing.layers import TarBuilder

LAMINA = [sys.executable, "-m", "lamina"]
MiB = 1 << 20


def _layers(big: int = 4 * MiB, n_big: int = 3) -> list[bytes]:
    a = TarBuilder()
    a.add_dir("etc")
    a.add_file("etc/hostname", b"box\n")
    for i in range(n_big):
        a.add_file(f"bin/big{i}", os.urandom(big), mode=0o755)
    a.add_symlink("bin/sh", "big0")
    a.add_file("empty", b"")
    b = TarBuilder("gnu")
    b.add_file("usr/share/" + "x" * 120 + "/doc", b"long name" * 100)
    b.add_file("usr/lib/blob", os.urandom(big))
    b.add_whiteout("etc/hostname")
    return [a.build(), b.build()]


def _json(args: list[str], rc: int = 0) -> Any:
    p = run_lamina([*args, "--json"])
    assert p.returncode == rc, p.stderr
    return json.loads(p.stdout) if rc == 0 else p


def _fsck_ok(store: Path) -> None:
    res = _json(["fsck", "--store", str(store)])
    assert res["ok"], res["problems"]


def _exports_match(store: Path, tars: list[bytes]) -> None:
    with Store.open(str(store), create=False) as s:
        for t in tars:
            out = io.BytesIO()
            assert s.export_layer(diff_id(t), out) == diff_id(t)
            assert out.getvalue() == t


# -- reflink filesystems ---------------------------------------------------------------------

@pytest.fixture(params=["btrfs", "xfs"])
def reflink_fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    with loop_fs(str(request.param), tmp_path) as mnt:
        yield mnt


def _free(path: Path) -> int:
    os.sync()
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


@pytest.mark.root
def test_store_to_store_copy_on_reflink_fs_moves_no_data(reflink_fs: Path,
                                                         tmp_path: Path) -> None:
    tars = _layers(big=8 * MiB)
    size = sum(len(t) for t in tars)
    build_image(str(tmp_path / "lay"), "v1", tars)
    a, b, c = reflink_fs / "a", reflink_fs / "b", reflink_fs / "c"
    _json(["import", f"{tmp_path / 'lay'}:v1", "app:v1", "--store", str(a)])
    # both destination stores exist first: their creation is not the copy's cost
    _json(["import", f"{tmp_path / 'lay'}:v1", "warm:v1", "--store", str(b)])
    before = _free(reflink_fs)
    res = _json(["copy", f"store:{a}:app:v1", f"store:{b}:app:v2"])
    used = before - _free(reflink_fs)
    # b already had everything from the warm import: all skipped, nothing written
    assert res["layers_skipped"] == 2 and used < 0.05 * size

    Store.open(str(c)).close()     # an empty store: its creation is not the copy's cost
    before = _free(reflink_fs)
    res = _json(["copy", f"store:{a}:app:v1", f"store:{c}"])
    used = before - _free(reflink_fs)
    assert res["layers_copied"] == 2 and not res["verified"]
    big = sum(len(t) for t in tars) - 2 * MiB      # metadata and small files, generously
    # objects (immutable, ours, same filesystem) are hardlinked: no inode, no extents
    assert res["linked_bytes"] >= big and res["copied_bytes"] < 64 << 10
    assert res["reflinked_bytes"] == 0
    assert all(x["blob_transfer"] == "reflinked" and x["split_cloned"] for x in res["layers"])
    assert used < 0.05 * size, f"{used} new bytes for a {size}-byte image"

    with Store.open(str(c), create=False) as s, Store.open(str(a), create=False) as sa:
        img = s.image("app:v1")
        objs = [o for ly in img.layers for o in s.layer_objects(ly.diff_id)]
        assert len(objs) >= 4 and all(
            os.stat(s.object_path(o)).st_ino == os.stat(sa.object_path(o)).st_ino
            for o in objs)
        assert all(shared_extents(Path(s.blob_path(ly.desc.digest))) for ly in img.layers)
        for ly in img.layers:   # the stored (compressed) tar-split itself was cloned
            split = Path(s.tar_split_path(ly.diff_id))
            assert split.read_bytes() == Path(sa.tar_split_path(ly.diff_id)).read_bytes()
            # a few kB of zstd can sit inline in btrfs metadata: then there is no extent
            assert split.stat().st_size <= 4096 or shared_extents(split)
    with Store.open(str(a), create=False) as s:
        assert s.image("app:v1").manifest.digest == img.manifest.digest
    _fsck_ok(a)
    _fsck_ok(c)
    _exports_match(c, tars)

    # --verify rehashes everything and still clones
    res = _json(["copy", "--verify", f"store:{a}:app:v1", f"store:{reflink_fs / 'd'}"])
    assert res["verified"] and res["reflinked_bytes"] >= big
    _fsck_ok(reflink_fs / "d")
    _exports_match(reflink_fs / "d", tars)


def _layer_rows(store: Path) -> list[tuple[object, ...]]:
    """What the index records of each layer and its objects (not times)."""
    with Store.open(str(store), create=False) as s:
        rows = s.db.query("SELECT diff_id, blob, media_type, blob_size, tar_size, files, state "
                          "FROM layers ORDER BY diff_id")
        rows += s.db.query("SELECT * FROM layer_objects ORDER BY diff_id, object")
        rows += s.db.query("SELECT * FROM objects ORDER BY digest")
        return rows


@pytest.mark.root
@pytest.mark.parametrize("compiled", [True, False])
def test_trusted_copy_records_what_a_verified_one_does(tmp_path: Path, compiled: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The trusted copy takes a layer's objects and sizes from the source index
    instead of scanning its tar-split; the index it writes must be the one a full
    verification writes, with the compiled linker and without it.  A source
    objects directory others may write to is not linked unchecked: every object
    is stat'ed (still linked: ours, same fs)."""
    monkeypatch.setenv("LAMINA_NO_FASTPATH", "0" if compiled else "1")
    tars = _layers(big=MiB, n_big=2)
    build_image(str(tmp_path / "lay"), "v1", tars)
    a = tmp_path / "a"
    _json(["import", f"{tmp_path / 'lay'}:v1", "app:v1", "--store", str(a)])
    trusted = _json(["copy", f"store:{a}:app:v1", f"store:{tmp_path / 'b'}"])
    verified = _json(["copy", "--verify", f"store:{a}:app:v1", f"store:{tmp_path / 'c'}"])
    assert not trusted["verified"] and verified["verified"]
    assert trusted["linked_bytes"] >= 2 * MiB and trusted["copied_bytes"] < 64 << 10
    assert _layer_rows(tmp_path / "b") == _layer_rows(tmp_path / "c") == _layer_rows(a)
    os.chmod(a / "objects", 0o770)     # group-writable: objects checked one by one
    res = _json(["copy", f"store:{a}:app:v1", f"store:{tmp_path / 'd'}"])
    assert res["linked_bytes"] >= 2 * MiB and res["copied_bytes"] < 64 << 10
    assert _layer_rows(tmp_path / "d") == _layer_rows(a)
    for d in "bcd":
        _fsck_ok(tmp_path / d)
    _exports_match(tmp_path / "d", tars)


@pytest.mark.root
@pytest.mark.parametrize("attachable", [True, False])
def test_trusted_rows_from_the_source_index(tmp_path: Path, attachable: bool) -> None:
    """A trusted local copy whose tar-split was cloned copies the layer's rows from
    the attached source index in SQL; when that index cannot be attached it asks
    for the rows instead.  Either way the destination records what the source does."""
    tars = _layers(big=MiB, n_big=2)
    build_image(str(tmp_path / "lay"), "v1", tars)
    with loop_fs("xfs", tmp_path) as mnt, \
            Store.open(str(mnt / "a"), options=StoreOptions(fsync=False)) as s, \
            Store.open(str(mnt / "b"), options=StoreOptions(fsync=False)) as dst:
        s.import_image(str(tmp_path / "lay"), "v1", "app:v1")
        _receive_with_index(s, dst, tars, tmp_path, attachable)


def _receive_with_index(s: Store, dst: Store, tars: list[bytes], tmp_path: Path,
                        attachable: bool) -> None:
    asked: list[str] = []
    for ly in s.image("app:v1").layers:
        def rows(did: str = ly.diff_id) -> dict[str, int]:
            asked.append(did)
            return s.layer_object_sizes(did)

        info = s.layer(ly.diff_id)
        assert info is not None
        index = SourceIndex(s.db.path if attachable else str(tmp_path / "no.db"),
                            info.tar_size, info.files, rows)
        bfd = os.open(s.blob_path(ly.desc.digest), os.O_RDONLY)
        try:
            with open(s.tar_split_path(ly.diff_id), "rb") as f:
                _desc, _did, stats = dst.receive_layer(
                    f, [s.objects_fd], diff_id=ly.diff_id, blob=BlobInput(bfd, ly.desc),
                    trust_source=True, local_source=True, source_index=index)
        finally:
            os.close(bfd)
        assert stats.split_cloned and stats.copied_bytes == 0
        assert dst.layer_object_sizes(ly.diff_id) == s.layer_object_sizes(ly.diff_id)
        got = dst.layer(ly.diff_id)
        assert got is not None and (got.tar_size, got.files) == (info.tar_size, info.files)
    assert asked == ([] if attachable else [ly.diff_id for ly in s.image("app:v1").layers])
    assert not (tmp_path / "no.db").exists()
    assert [r[1] for r in dst.db.query("PRAGMA database_list")] == ["main"]
    for t in tars:
        out = io.BytesIO()
        dst.export_layer(diff_id(t), out)
        assert out.getvalue() == t
    assert dst.fsck().ok


def test_an_image_listing_one_layer_twice(tmp_path: Path) -> None:
    """Layers are copied side by side, each diff_id once: a repeated layer is
    reported skipped and the copy is the same image."""
    a_tar, b_tar = _layers(big=MiB, n_big=1)[:2]
    tars = [a_tar, b_tar, a_tar]
    build_image(str(tmp_path / "lay"), "v1", tars)
    a = tmp_path / "a"
    _json(["import", f"{tmp_path / 'lay'}:v1", "app:v1", "--store", str(a)])
    for dst in (f"store:{tmp_path / 'b'}", f"oci:{tmp_path / 'out'}:v1"):
        res = _json(["copy", f"store:{a}:app:v1", dst])
        assert [x["action"] for x in res["layers"]] == ["copied", "copied", "skipped"]
        assert [x["diff_id"] for x in res["layers"]] == [diff_id(t) for t in tars]
    res = _json(["copy", f"oci:{tmp_path / 'out'}:v1", f"store:{tmp_path / 'c'}:app:v1"])
    assert res["layers_copied"] == 2 and res["layers_skipped"] == 1
    with Store.open(str(a), create=False) as s:
        want = s.image("app:v1").manifest.digest
    for d in "bc":
        with Store.open(str(tmp_path / d), create=False) as s:
            assert s.image("app:v1").manifest.digest == want
        _fsck_ok(tmp_path / d)
        _exports_match(tmp_path / d, tars)


# -- stores and layouts ------------------------------------------------------------------------

def test_store_and_layout_both_ways(tmp_path: Path) -> None:
    tars = _layers(big=MiB, n_big=2)
    build_image(str(tmp_path / "lay"), "v1", tars)
    src = OCILayout.open(str(tmp_path / "lay"))
    digest = src.resolve("v1").digest

    res = _json(["copy", f"oci:{tmp_path / 'lay'}:v1", f"store:{tmp_path / 's'}:app:v1"])
    assert res["manifest"] == digest and res["verified"] and res["layers_copied"] == 2
    _fsck_ok(tmp_path / "s")
    _exports_match(tmp_path / "s", tars)

    res = _json(["copy", f"store:{tmp_path / 's'}:app:v1", f"{tmp_path / 'out'}:v9"])
    assert res["manifest"] == digest
    out = OCILayout.open(str(tmp_path / "out"))
    m = out.resolve("v9")
    assert m.digest == digest
    for d in m.layers:
        assert Path(out.blob_path(d.digest)).read_bytes() == Path(
            src.blob_path(d.digest)).read_bytes()

    # again: everything is there already
    res = _json(["copy", f"store:{tmp_path / 's'}:app:v1", f"oci:{tmp_path / 'out'}:v9"])
    assert res["layers_skipped"] == 2

    # a store name defaults to the layout directory's name and the tag
    _json(["copy", f"{tmp_path / 'out'}:v9", f"store:{tmp_path / 's2'}"])
    with Store.open(str(tmp_path / "s2"), create=False) as s:
        assert s.image("out:v9").manifest.digest == digest

    p = _json(["copy", f"store:{tmp_path / 's'}:nope:v1", f"store:{tmp_path / 's3'}"], rc=3)
    assert "nope:v1 is not in the store" in p.stdout
    p = _json(["copy", f"store:{tmp_path / 's'}", f"store:{tmp_path / 's3'}"], rc=2)
    assert "names no image" in p.stdout
    assert not (tmp_path / "s3").exists()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    p = _json(["copy", f"store:{tmp_path / 's'}:app:v1", f"oci:{tmp_path / 'junk'}:v1"], rc=2)
    assert "not an OCI layout" in p.stdout
    assert os.listdir(tmp_path / "junk") == ["file"]


# -- servers --------------------------------------------------------------------------------------

class Server:
    def __init__(self, tmp: Path, name: str, store: Path) -> None:
        self.sock = str(tmp / f"{name}.sock")
        self.store = store
        self.proc = subprocess.Popen([*LAMINA, "serve", "--socket", self.sock, "--store",
                                      str(store)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"lamina serve did not start: "
                                     f"{self.proc.communicate()[1]!r}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        assert self.proc.returncode == 0, err


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, list[bytes]]]:
    tmp = tmp_path_factory.mktemp("served")
    tars = _layers(big=MiB, n_big=2)
    build_image(str(tmp / "lay"), "v1", tars)
    _json(["import", f"{tmp / 'lay'}:v1", "app:v1", "--store", str(tmp / "src")])
    s = Server(tmp, "src", tmp / "src")
    try:
        yield s, tars
    finally:
        s.stop()


@pytest.fixture
def empty(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path, "dst", tmp_path / "dst")
    try:
        yield s
    finally:
        s.stop()


def test_copy_between_two_store_servers(served: tuple[Server, list[bytes]], empty: Server,
                                        tmp_path: Path) -> None:
    src, tars = served
    res = _json(["copy", f"varlink:{src.sock}:app:v1", f"varlink:{empty.sock}:app:v1"])
    assert res["layers_copied"] == 2
    with Store.open(str(src.store), create=False) as s:
        want = s.image("app:v1")
    _fsck_ok(empty.store)
    _exports_match(empty.store, tars)
    with Store.open(str(empty.store), create=False) as s:
        got = s.image("app:v1")
        # the blobs went over as descriptors and were kept
        assert [x.desc.digest for x in got.layers] == [x.desc.digest for x in want.layers]
        assert got.config.diff_ids == want.config.diff_ids
    # a server to a local store and back to another server's image name
    res = _json(["copy", f"varlink:{src.sock}:app:v1", f"store:{tmp_path / 'local'}"])
    assert res["layers_copied"] == 2
    _fsck_ok(tmp_path / "local")
    _exports_match(tmp_path / "local", tars)
    res = _json(["copy", f"store:{tmp_path / 'local'}:app:v1", f"varlink:{empty.sock}:b:v1"])
    assert res["layers_skipped"] == 2


def test_fifty_concurrent_clients_pull_from_a_store(served: tuple[Server, list[bytes]]) -> None:
    src, tars = served
    want = {diff_id(t): t for t in tars}

    async def one(i: int) -> int:
        did = list(want)[i % len(want)]
        async with await StoreClient.connect(src.sock) as c:
            out = io.BytesIO()
            assert await c.fetch_layer(did, out) == did
            assert out.getvalue() == want[did]
            return len(out.getvalue())

    async def all_of_them() -> list[int]:
        return list(await asyncio.gather(*(one(i) for i in range(50))))

    sizes = asyncio.run(all_of_them())
    assert len(sizes) == 50 and sum(sizes) == 25 * sum(len(t) for t in tars)


def _file_chunk(name: bytes, size: int) -> bytes:
    return bytes((FILE,)) + struct.pack("<QII", size, 0, len(name)) + name


def test_malicious_put_layer_leaves_the_store_clean(empty: Server, tmp_path: Path) -> None:
    tar = _layers(big=MiB, n_big=1)[0]
    outside = tmp_path / "secret"
    outside.write_bytes(b"s" * 4096)
    d = tmp_path / "dir"
    d.mkdir()
    (d / "link").symlink_to(outside)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)

    async def go() -> None:
        async with await StoreClient.connect(empty.sock) as c:
            # a reference out of its directory, written past the writer's own checks
            def dotdot(sw: StreamWriter) -> None:
                sw._f.write(_file_chunk(b"../secret", 4096))
            with pytest.raises(UnsafeLayerError):
                await c.put_layer(dotdot, [dfd], diff_id=diff_id(tar))

            def via_symlink(sw: StreamWriter) -> None:
                sw.file_ref(4096, 0, "link")
            with pytest.raises(UnsafeLayerError):
                await c.put_layer(via_symlink, [dfd], diff_id=diff_id(tar))

            # the right tar under the wrong diff_id
            with pytest.raises(DigestMismatchError):
                await c.put_tar(io.BytesIO(tar), diff_id="sha256:" + "0" * 64)

            # a truncated stream
            def cut(sw: StreamWriter) -> None:
                from_tar(io.BytesIO(tar[:5000]), sw)
            with pytest.raises(CorruptLayerError):
                await c.put_layer(cut, diff_id=diff_id(tar))

            # a blob that does not match its descriptor
            from lamina.oci.model import Descriptor
            from lamina.store.receive import BlobInput
            fake = tmp_path / "fake.blob"
            fake.write_bytes(b"not gzip")
            bfd = os.open(fake, os.O_RDONLY)
            r, w = os.pipe()
            try:
                def produce() -> None:
                    with os.fdopen(w, "wb") as f:
                        from_tar(io.BytesIO(tar), StreamWriter(f))
                t = asyncio.ensure_future(asyncio.to_thread(produce))
                with pytest.raises(DigestMismatchError):
                    await c.put_layer_fds(r, [], diff_id=diff_id(tar), blob=BlobInput(
                        bfd, Descriptor("application/vnd.oci.image.layer.v1.tar+gzip",
                                        "sha256:" + hashlib.sha256(b"x").hexdigest(), 8)))
                await t
            finally:
                os.close(r)
                os.close(bfd)
            assert not await c.has_layer(diff_id(tar))
            # and the server still works
            rec = await c.put_tar(io.BytesIO(tar), diff_id=diff_id(tar))
            assert rec.diff_id == diff_id(tar)

    try:
        asyncio.run(go())
    finally:
        os.close(dfd)
    res = _json(["fsck", "--store", str(empty.store)])
    assert res["ok"], res["problems"]
    assert not any("secret" in json.dumps(g) for g in res["garbage"])
    with Store.open(str(empty.store), create=False) as s:
        assert [x.diff_id for x in s.layers()] == [diff_id(tar)]
        for o in s.layer_objects(diff_id(tar)):
            assert Path(s.object_path(o)).read_bytes() != outside.read_bytes()


def test_socket_flag_errors(tmp_path: Path) -> None:
    p = run_lamina(["serve", "--socket", str(tmp_path / "s"), "--store", str(tmp_path / "a"),
                    "--layout", str(tmp_path / "b")])
    assert p.returncode == 2 and "exclude" in p.stderr
    with socket.socket(socket.AF_UNIX) as s:
        assert s.connect_ex(str(tmp_path / "s")) != 0


def test_unpack_from_a_store_server(served: tuple[Server, list[bytes]], tmp_path: Path) -> None:
    src, _ = served
    from lamina.drivers.manage import release_bundle
    from lamina.ipc.client import SyncStoreClient
    bundle = tmp_path / "bundle"
    rootfs = bundle / "rootfs"
    try:
        with SyncStoreClient(src.sock) as c:
            c.unpack("app:v1", str(bundle))
            with pytest.raises(UsageError):     # a layout on the server is not the client's
                c.unpack(f"{src.store.parent / 'lay'}:v1", str(tmp_path / "b2"))
        assert not (tmp_path / "b2").exists()
        assert (rootfs / "bin" / "big0").stat().st_size == MiB
        assert os.readlink(rootfs / "bin" / "sh") == "big0"
        assert not (rootfs / "etc" / "hostname").exists()     # whited out by layer 2
        assert json.loads((bundle / "config.json").read_text())["ociVersion"]
    finally:
        if bundle.exists():
            release_bundle(str(bundle))     # the store's driver may have mounted it
    assert not os.path.ismount(rootfs)


def test_server_already_holding_a_layer_under_another_blob(
        served: tuple[Server, list[bytes]], empty: Server) -> None:
    src, tars = served

    async def put_zstd() -> None:
        async with await StoreClient.connect(empty.sock) as c:
            rec = await c.put_tar(io.BytesIO(tars[0]), diff_id=diff_id(tars[0]),
                                  compression="zstd")
            assert rec.descriptor.media_type.endswith("+zstd")

    asyncio.run(put_zstd())
    res = _json(["copy", f"varlink:{src.sock}:app:v1", f"varlink:{empty.sock}:app:v1"])
    assert [x["action"] for x in res["layers"]] == ["skipped", "copied"]
    with Store.open(str(empty.store), create=False) as s:
        img = s.image("app:v1")
        assert img.layers[0].desc.media_type.endswith("+zstd")
        assert [x.diff_id for x in img.layers] == [diff_id(t) for t in tars]
    _fsck_ok(empty.store)
    _exports_match(empty.store, tars)


def test_hold_keeps_put_layers_from_gc_until_the_pipe_closes(empty: Server) -> None:
    from lamina.ipc.client import StoreBusyError, SyncStoreClient
    tar = _layers(big=MiB, n_big=1)[1]
    with SyncStoreClient(empty.sock) as c:
        lease = c.hold()
        rec = c.put_tar(io.BytesIO(tar), diff_id=diff_id(tar))
        with pytest.raises(StoreBusyError):
            c.gc()
        assert c.has_layer(rec.diff_id)
        os.close(lease)
        for _ in range(100):
            try:
                res = c.gc()
                break
            except StoreBusyError:
                time.sleep(0.05)
        else:
            pytest.fail("the hold was not released after its pipe closed")
        # no tag reached the layer: gc collected it once the hold was gone
        assert not c.has_layer(rec.diff_id)
        assert res
    _fsck_ok(empty.store)


def test_sigkill_mid_copy_then_rerun(tmp_path: Path) -> None:
    tars = []
    for k in range(3):
        t = TarBuilder()
        for i in range(400):
            t.add_file(f"d{k}/f{i}", os.urandom(32 << 10))
        tars.append(t.build())
    build_image(str(tmp_path / "lay"), "v1", tars)
    dst = tmp_path / "dst"
    proc = subprocess.Popen([*LAMINA, "copy", f"{tmp_path / 'lay'}:v1", f"store:{dst}:app:v1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    # kill it once it has started storing layers
    while not list((dst / "objects").glob("*/*")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.kill()
    assert proc.wait() == -9        # killed while storing the first of three layers
    res = _json(["fsck", "--store", str(dst)])
    assert res["ok"], res["problems"]
    with Store.open(str(dst), create=False) as s:
        assert s.images() == []     # the tag is written last
    res = _json(["copy", f"{tmp_path / 'lay'}:v1", f"store:{dst}:app:v1"])
    assert res["layers_copied"] + res["layers_skipped"] == 3
    _fsck_ok(dst)
    _exports_match(dst, tars)
