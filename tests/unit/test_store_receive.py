"""Store.receive_layer: a splitdirfdstream into a store, verified or trusted."""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.errors import (
    CorruptLayerError,
    DigestMismatchError,
    NotFoundError,
    UnsafeLayerError,
    UsageError,
)
from lamina.oci.model import Descriptor
from lamina.store import Store, StoreOptions
from lamina.store.receive import BlobInput
from lamina.stream.splitdirfdstream import FILE, StreamWriter, from_tar, read_chunks
from lamina.stream.stored import open_stored
from lamina.testing.images import build_image, diff_id
from lamina.testing.layers import TarBuilder

OPTS = StoreOptions(fsync=False)


def _tars() -> list[bytes]:
    a = TarBuilder()
    a.add_dir("etc")
    a.add_file("etc/hostname", b"box\n")
    a.add_file("bin/big", os.urandom(300_000), mode=0o755)
    a.add_file("bin/same", b"x" * 5000)
    a.add_file("bin/same2", b"x" * 5000)        # one object for both
    a.add_file("empty", b"")
    a.add_hardlink("bin/link", "bin/big")
    b = TarBuilder("gnu")
    b.add_file("usr/" + "y" * 130 + "/doc", b"doc" * 1000)
    b.add_whiteout("etc/hostname")
    return [a.build(), b.build()]


@pytest.fixture
def src(tmp_path: Path) -> Iterator[tuple[Store, list[bytes]]]:
    tars = _tars()
    build_image(str(tmp_path / "lay"), "v1", tars)
    with Store.open(str(tmp_path / "src"), options=OPTS) as s:
        s.import_image(str(tmp_path / "lay"), "v1", "app:v1")
        yield s, tars


@pytest.fixture
def dst(tmp_path: Path) -> Iterator[Store]:
    with Store.open(str(tmp_path / "dst"), options=OPTS) as s:
        yield s


def _split(store: Store, did: str) -> bytes:
    """The stored tar-split's stream (stored compressed)."""
    path = store.tar_split_path(did)
    with open(path, "rb") as raw:
        assert raw.read(4) == b"\x28\xb5\x2f\xfd"
    with open_stored(path) as f:
        return f.read()


def _send(src: Store, dst: Store, *, trust: bool, local: bool = False) -> None:
    img = src.image("app:v1")
    for ly in img.layers:
        bfd = os.open(src.blob_path(ly.desc.digest), os.O_RDONLY)
        try:
            # a trusting receiver gets the stored file (it clones it); others the stream
            path = src.tar_split_path(ly.diff_id)
            with (open(path, "rb") if trust else open_stored(path)) as f:
                desc, did, stats = dst.receive_layer(f, [src.objects_fd], diff_id=ly.diff_id,
                                                     blob=BlobInput(bfd, ly.desc),
                                                     trust_source=trust, local_source=local)
        finally:
            os.close(bfd)
        assert (desc, did) == (ly.desc, ly.diff_id)
        assert (stats.present_bytes + stats.copied_bytes + stats.reflinked_bytes
                + stats.linked_bytes) > 0
    dst.put_image("app:v1", src.read_blob(img.manifest.digest),
                  src.read_blob(img.manifest.config.digest))


@pytest.mark.parametrize(("trust", "local"), [(False, False), (False, True), (True, False)])
def test_store_to_store_is_exact(src: tuple[Store, list[bytes]], dst: Store,
                                 trust: bool, local: bool) -> None:
    s, tars = src
    _send(s, dst, trust=trust, local=local)
    assert dst.image("app:v1").manifest.digest == s.image("app:v1").manifest.digest
    for t in tars:
        did = diff_id(t)
        assert _split(dst, did) == _split(s, did)
        assert dst.layer_objects(did) == s.layer_objects(did)
        out = io.BytesIO()
        dst.export_layer(did, out)
        assert out.getvalue() == t
    res = dst.fsck()
    assert res.ok and not res.garbage


def test_inline_stream_is_split_like_an_import(src: tuple[Store, list[bytes]],
                                               dst: Store) -> None:
    s, tars = src
    for t in tars:
        buf = io.BytesIO()
        from_tar(io.BytesIO(t), StreamWriter(buf))      # metadata and inline only
        buf.seek(0)
        desc, did, stats = dst.receive_layer(buf, [], diff_id=diff_id(t), compression="zstd")
        assert did == diff_id(t) and desc.media_type.endswith("+zstd")
        assert stats.blob == "regenerated" and stats.reflinked_bytes == 0
        assert _split(dst, did) == _split(s, did)
    assert dst.fsck().ok


def test_odd_chunking_still_gives_one_object_per_file(src: tuple[Store, list[bytes]],
                                                      dst: Store, tmp_path: Path) -> None:
    """A file chunk that is only part of a member's data, or spans two members, is
    read through: the store keeps its one-object-per-file invariant."""
    s, tars = src
    t = tars[0]
    pieces = tmp_path / "pieces"
    pieces.mkdir()
    # cut the tar into arbitrary 7000-byte file chunks
    buf = io.BytesIO()
    w = StreamWriter(buf)
    for i in range(0, len(t), 7000):
        (pieces / f"p{i}").write_bytes(t[i:i + 7000])
        w.file_ref(len(t[i:i + 7000]), 0, f"p{i}")
    w.flush()
    buf.seek(0)
    fd = os.open(pieces, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _desc, did, _stats = dst.receive_layer(buf, [fd], diff_id=diff_id(t))
    finally:
        os.close(fd)
    assert _split(dst, did) == _split(s, did)
    assert dst.layer_objects(did) == s.layer_objects(did)
    assert dst.fsck().ok


def test_a_lying_object_name_is_not_believed(src: tuple[Store, list[bytes]], dst: Store,
                                             tmp_path: Path) -> None:
    s, tars = src
    t = tars[0]
    # the sender names the real object but its directory holds other bytes of that size
    fake = tmp_path / "fake"
    for c in read_chunks(open_stored(s.tar_split_path(diff_id(t)))):
        if c.kind == FILE and c.name is not None:
            p = fake / c.name.decode()
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"\0" * c.size)
    fd = os.open(fake, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with open_stored(s.tar_split_path(diff_id(t))) as f, \
                pytest.raises(DigestMismatchError):
            dst.receive_layer(f, [fd], diff_id=diff_id(t))
    finally:
        os.close(fd)
    assert dst.layer(diff_id(t)) is None
    assert not os.path.exists(dst.tar_split_path(diff_id(t)))
    res = dst.fsck()
    assert res.ok
    # what was cloned is kept only as unreferenced objects, named by what they hold
    assert {g.kind for g in res.garbage} <= {"unreferenced-object"}


def test_hostile_streams(dst: Store, tmp_path: Path) -> None:
    t = _tars()[1]
    d = tmp_path / "d"
    d.mkdir()
    (tmp_path / "outside").write_bytes(b"o" * 100)
    (d / "link").symlink_to(tmp_path / "outside")
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buf = io.BytesIO()
        StreamWriter(buf).file_ref(100, 0, "link")
        with pytest.raises(UnsafeLayerError):
            dst.receive_layer(io.BytesIO(buf.getvalue()), [fd], diff_id=diff_id(t))
        buf = io.BytesIO()
        StreamWriter(buf).file_ref(100, 0, "missing")
        with pytest.raises(NotFoundError):
            dst.receive_layer(io.BytesIO(buf.getvalue()), [fd], diff_id=diff_id(t))
        buf = io.BytesIO()
        StreamWriter(buf).file_ref(100, 1, "x")
        with pytest.raises(CorruptLayerError):
            dst.receive_layer(io.BytesIO(buf.getvalue()), [fd], diff_id=diff_id(t))
        # trusted streams must name objects
        buf = io.BytesIO()
        StreamWriter(buf).file_ref(100, 0, "link")
        with pytest.raises(UsageError):
            dst.receive_layer(io.BytesIO(buf.getvalue()), [fd], diff_id=diff_id(t),
                              blob=BlobInput(fd, _fake_desc()), trust_source=True)
    finally:
        os.close(fd)
    with pytest.raises(CorruptLayerError):      # a metadata chunk cut short
        dst.receive_layer(io.BytesIO(b"\x00\x10\x00\x00\x00abc"), [], diff_id=diff_id(t))
    assert dst.layers() == []
    res = dst.fsck()
    assert res.ok and not res.garbage
    left = [n for d in os.listdir(dst.tmp_dir) if os.path.isdir(os.path.join(dst.tmp_dir, d))
            for n in os.listdir(os.path.join(dst.tmp_dir, d))]
    assert not [n for n in left if n.startswith(("recv-", "split-", "blob-", ".import-"))]


def _fake_desc() -> Descriptor:
    return Descriptor("application/vnd.oci.image.layer.v1.tar", "sha256:" + "0" * 64, 1)


def test_put_image_needs_its_layers(src: tuple[Store, list[bytes]], dst: Store) -> None:
    s, _ = src
    img = s.image("app:v1")
    with pytest.raises(NotFoundError):
        dst.put_image("app:v1", s.read_blob(img.manifest.digest),
                      s.read_blob(img.manifest.config.digest))
    with pytest.raises(DigestMismatchError):
        dst.put_image("app:v1", s.read_blob(img.manifest.digest), b"{}")
    assert dst.images() == []


def test_compiled_link_objects(tmp_path: Path) -> None:
    """The compiled linker: 0 linked, EEXIST present, ENOENT missing; bad digests refused."""
    _fastpath = pytest.importorskip("lamina._fastpath")
    src, dst = tmp_path / "src", tmp_path / "dst"
    have, gone = "ab" + "1" * 62, "cd" + "2" * 62
    (src / "ab").mkdir(parents=True)
    (src / "ab" / have[2:]).write_bytes(b"x")
    for i in range(256):
        (dst / f"{i:02x}").mkdir(parents=True)
    sfd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    fds = [os.open(dst / f"{i:02x}", os.O_RDONLY | os.O_DIRECTORY) for i in range(256)]
    try:
        assert _fastpath.link_objects(sfd, fds, [have, gone]) == [0, errno.ENOENT]
        assert os.stat(dst / "ab" / have[2:]).st_ino == os.stat(src / "ab" / have[2:]).st_ino
        assert _fastpath.link_objects(sfd, fds, [have]) == [errno.EEXIST]
        for bad in ("AB" + "1" * 62, "ab/" + "1" * 61, "ab" * 31):
            with pytest.raises(ValueError):
                _fastpath.link_objects(sfd, fds, [bad])
        with pytest.raises(ValueError):
            _fastpath.link_objects(sfd, fds[:255], [have])
    finally:
        for fd in [sfd, *fds]:
            os.close(fd)


def test_attached_index_is_read_without_its_write_lock(tmp_path: Path) -> None:
    """Only a store index of our schema version is attached; a deferred transaction
    reading it leaves it writable by its own store meanwhile."""
    with Store.open(str(tmp_path / "a"), options=OPTS) as a, \
            Store.open(str(tmp_path / "b"), options=OPTS) as b:
        (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
        with b.db.attached(str(tmp_path / "junk.db")) as alias:
            assert alias is None
        a.db.conn.execute("PRAGMA user_version = 99")
        with b.db.attached(a.db.path) as alias:
            assert alias is None
        a.db.conn.execute("PRAGMA user_version = 1")
        with b.db.attached(a.db.path) as alias:
            assert alias is not None
            with b.db.tx(deferred=True) as c:
                c.execute("DELETE FROM main.refs WHERE name = 'x'")
                c.execute(f"INSERT INTO main.blobs SELECT * FROM {alias}.blobs")
                a.db.conn.execute("PRAGMA busy_timeout = 100")
                with a.db.tx() as w:    # "database is locked" if b held a's write lock
                    w.execute("INSERT INTO blobs VALUES ('sha256:' || hex(randomblob(32)),"
                              " 'x', 1)")
        assert [r[1] for r in b.db.query("PRAGMA database_list")] == ["main"]
