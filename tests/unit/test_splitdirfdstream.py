"""splitdirfdstream codec: exact round trips, every rejection, reference resolution, import."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.errors import CorruptLayerError, NotFoundError, UnsafeLayerError
from lamina.layer.tarstream import TarEntry
from lamina.stream import splitdirfdstream as sds
from lamina.stream.splitdirfdstream import (
    FILE,
    INLINE,
    METADATA,
    Chunk,
    DataReader,
    StreamWriter,
    from_tar,
    import_file,
    open_ref,
    read_chunks,
    write_tar,
)
from lamina.testing.layers import BLOCK, RawEntry, TarBuilder


def _sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run reference resolution through openat2 and through the O_NOFOLLOW walk."""
    monkeypatch.setattr(sds, "use_openat2", request.param == "openat2")
    return str(request.param)


@pytest.fixture
def objdir(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    d = tmp_path / "objects"
    d.mkdir()
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield d, fd
    finally:
        os.close(fd)


def _sample_tar(fmt: str = "pax") -> bytes:
    t = TarBuilder(fmt, pad_record=True)
    t.add_dir("etc")
    t.add_file("etc/empty", b"")
    t.add_file("etc/one", b"x")
    t.add_file("etc/block", b"b" * BLOCK)
    t.add_file("etc/block+1", b"c" * (BLOCK + 1))
    t.add_file("big", os.urandom(300_000), xattrs={"user.k": b"\xff\x00v"})
    t.add_file("d/" + "n" * 150 + "/long", b"long name\n")
    t.add_symlink("etc/link", "one")
    t.add_hardlink("etc/hard", "etc/one")
    t.add_fifo("fifo")
    t.add_file("dup", b"same")
    t.add_file("dup2", b"same")
    return t.build()


def _placer(objdir: Path) -> sds.PlaceFile:
    """Store file data content-addressed under objdir, as the store does."""

    def place(entry: TarEntry, read: DataReader) -> tuple[int, str] | None:
        if entry.size < 2:       # tiny files stay inline
            return None
        data = b""
        while b := read(4096):
            data += b
        hexd = hashlib.sha256(data).hexdigest()
        (objdir / hexd[:2]).mkdir(exist_ok=True)
        (objdir / hexd[:2] / hexd[2:]).write_bytes(data)
        return 0, f"{hexd[:2]}/{hexd[2:]}"

    return place


# -- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["pax", "gnu", "ustar"])
def test_round_trip_with_refs(fmt: str, objdir: tuple[Path, int], resolver: str) -> None:
    d, dfd = objdir
    tar = _sample_tar(fmt)
    buf = io.BytesIO()
    w = StreamWriter(buf)
    digest = from_tar(io.BytesIO(tar), w, _placer(d))
    assert digest == _sha(tar)
    assert w.tar_size == len(tar)
    chunks = list(read_chunks(io.BytesIO(buf.getvalue())))
    kinds = {c.kind for c in chunks}
    assert kinds == {METADATA, INLINE, FILE}
    # file data is not in the stream, only referenced
    assert len(buf.getvalue()) < len(tar) - 300_000
    out = io.BytesIO()
    assert write_tar(chunks, [dfd], out) == _sha(tar)
    assert out.getvalue() == tar


def test_round_trip_all_inline() -> None:
    tar = _sample_tar()
    buf = io.BytesIO()
    from_tar(io.BytesIO(tar), StreamWriter(buf))
    chunks = list(read_chunks(io.BytesIO(buf.getvalue())))
    assert FILE not in {c.kind for c in chunks}
    out = io.BytesIO()
    assert write_tar(chunks, [], out) == _sha(tar)
    assert out.getvalue() == tar


def test_nonzero_padding_and_trailing_bytes_survive(objdir: tuple[Path, int]) -> None:
    d, dfd = objdir
    t = TarBuilder()
    t.add_file("a", b"hello world")
    tar = bytearray(t.build())
    tar[BLOCK + 11:BLOCK + 20] = b"GARBAGE!!"      # padding after a's data
    tar += b"after the end marker"
    buf = io.BytesIO()
    assert from_tar(io.BytesIO(bytes(tar)), StreamWriter(buf), _placer(d)) == _sha(bytes(tar))
    out = io.BytesIO()
    write_tar(read_chunks(io.BytesIO(buf.getvalue())), [dfd], out)
    assert out.getvalue() == bytes(tar)


def test_place_file_must_consume_or_decline(objdir: tuple[Path, int]) -> None:
    t = TarBuilder()
    t.add_file("a", b"hello")

    def half(entry: TarEntry, read: DataReader) -> tuple[int, str] | None:
        read(2)
        return 0, "x"

    with pytest.raises(RuntimeError):
        from_tar(io.BytesIO(t.build()), StreamWriter(io.BytesIO()), half)


def test_writer_coalesces_metadata_and_splits_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sds, "MAX_CHUNK", 10)
    buf = io.BytesIO()
    with StreamWriter(buf) as w:
        for _ in range(5):
            w.metadata(b"m" * 3)
        w.inline(b"i" * 25)
        w.inline(b"")
        w.file_ref(7, 2, "ab/cd")
        w.metadata(b"tail")
    raw = buf.getvalue()
    assert raw[:5] == b"\x00" + struct.pack("<I", 10)
    chunks = list(read_chunks(io.BytesIO(raw)))
    assert [(c.kind, c.size) for c in chunks] == [
        (METADATA, 10), (METADATA, 5), (INLINE, 10), (INLINE, 10), (INLINE, 5), (FILE, 7),
        (METADATA, 4)]
    assert chunks[5] == Chunk(FILE, None, 7, 2, b"ab/cd")
    assert w.tar_size == 15 + 25 + 7 + 4


def test_exact_byte_layout() -> None:
    buf = io.BytesIO()
    with StreamWriter(buf) as w:
        w.metadata(b"hd")
        w.inline(b"xyz")
        w.file_ref(0x0102, 1, b"ab/c")
    assert buf.getvalue() == (
        b"\x00\x02\x00\x00\x00hd"
        b"\x01\x03\x00\x00\x00xyz"
        b"\x02\x02\x01\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x04\x00\x00\x00ab/c")


# -- rejections while decoding -----------------------------------------------------------------

def _file_chunk(name: bytes, size: int = 1, idx: int = 0) -> bytes:
    return b"\x02" + struct.pack("<QII", size, idx, len(name)) + name


@pytest.mark.parametrize("name", [b"..", b"../x", b"a/../../b", b"a/.."])
def test_reject_dotdot(name: bytes) -> None:
    with pytest.raises(UnsafeLayerError, match=r"'\.\.'") as ei:
        list(read_chunks(io.BytesIO(_file_chunk(name))))
    assert ei.value.hint


@pytest.mark.parametrize("name", [b"/etc/passwd", b"/"])
def test_reject_absolute(name: bytes) -> None:
    with pytest.raises(UnsafeLayerError, match="absolute"):
        list(read_chunks(io.BytesIO(_file_chunk(name))))


def test_reject_nul() -> None:
    with pytest.raises(UnsafeLayerError, match="NUL"):
        list(read_chunks(io.BytesIO(_file_chunk(b"ab\0cd"))))


@pytest.mark.parametrize("name", [b"a//b", b"./a", b"a/", b"a/./b"])
def test_reject_unnormalised(name: bytes) -> None:
    with pytest.raises(UnsafeLayerError, match="normalised"):
        list(read_chunks(io.BytesIO(_file_chunk(name))))


def test_writer_rejects_bad_names() -> None:
    w = StreamWriter(io.BytesIO())
    for bad in ["../x", "/x", "a\0b", ""]:
        with pytest.raises((UnsafeLayerError, CorruptLayerError)):
            w.file_ref(1, 0, bad)


@pytest.mark.parametrize("kind", [METADATA, INLINE])
def test_reject_oversized_chunk(kind: int) -> None:
    raw = bytes((kind,)) + struct.pack("<I", sds.MAX_CHUNK + 1)
    with pytest.raises(CorruptLayerError, match="over the"):
        list(read_chunks(io.BytesIO(raw)))


def test_reject_bad_name_length_and_type() -> None:
    with pytest.raises(CorruptLayerError, match="name length of 0"):
        list(read_chunks(io.BytesIO(b"\x02" + struct.pack("<QII", 1, 0, 0))))
    with pytest.raises(CorruptLayerError, match="name length"):
        list(read_chunks(io.BytesIO(b"\x02" + struct.pack("<QII", 1, 0, sds.MAX_NAME + 1))))
    with pytest.raises(CorruptLayerError, match="claims"):
        list(read_chunks(io.BytesIO(b"\x02" + struct.pack("<QII", 1 << 63, 0, 1) + b"a")))
    with pytest.raises(CorruptLayerError, match="dirfd index"):
        list(read_chunks(io.BytesIO(b"\x02" + struct.pack("<QII", 1, 1 << 20, 1) + b"a")))
    with pytest.raises(CorruptLayerError, match="unknown splitdirfdstream chunk type 0x03"):
        list(read_chunks(io.BytesIO(b"\x00\x01\x00\x00\x00a\x03")))


def test_truncated_at_every_offset() -> None:
    buf = io.BytesIO()
    with StreamWriter(buf) as w:
        w.metadata(b"header")
        w.inline(b"data")
        w.file_ref(3, 0, "ab/cd")
        w.metadata(b"end")
    raw = buf.getvalue()
    boundaries = {0}
    off = 0
    for c in read_chunks(io.BytesIO(raw)):
        off += 1 + (4 + c.size if c.kind != FILE else 16 + len(c.name or b""))
        boundaries.add(off)
    assert off == len(raw)
    for cut in range(len(raw) + 1):
        src = io.BytesIO(raw[:cut])
        if cut in boundaries:
            list(read_chunks(src))      # a whole number of chunks is a valid (shorter) stream
        else:
            with pytest.raises(CorruptLayerError, match="truncated") as ei:
                list(read_chunks(src))
            assert ei.value.hint


class _Dribble(io.RawIOBase):
    """A reader returning one byte per read, like a slow pipe."""

    def __init__(self, data: bytes) -> None:
        self._d = data
        self._p = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        if self._p >= len(self._d) or not len(b):
            return 0
        b[0] = self._d[self._p]
        self._p += 1
        return 1


def test_short_reads_are_not_truncation() -> None:
    buf = io.BytesIO()
    with StreamWriter(buf) as w:
        w.metadata(b"header")
        w.file_ref(3, 0, "ab/cd")
    chunks = list(read_chunks(_Dribble(buf.getvalue())))  # type: ignore[arg-type]
    assert [c.kind for c in chunks] == [METADATA, FILE]


# -- resolving references ----------------------------------------------------------------------

def _ref(name: str, size: int, idx: int = 0) -> Chunk:
    return Chunk(FILE, None, size, idx, name.encode())


def test_open_ref_ok(objdir: tuple[Path, int], resolver: str) -> None:
    d, dfd = objdir
    (d / "ab").mkdir()
    (d / "ab" / "cd").write_bytes(b"abc")
    fd = open_ref([dfd], _ref("ab/cd", 3))
    try:
        assert os.read(fd, 10) == b"abc"
    finally:
        os.close(fd)


def test_open_ref_symlink_at_name(objdir: tuple[Path, int], resolver: str) -> None:
    d, dfd = objdir
    (d / "real").write_bytes(b"abc")
    (d / "link").symlink_to("real")      # even a symlink that stays inside is refused
    with pytest.raises(UnsafeLayerError, match="symlink"):
        open_ref([dfd], _ref("link", 3))


def test_open_ref_symlink_in_parent(objdir: tuple[Path, int], tmp_path: Path,
                                    resolver: str) -> None:
    d, dfd = objdir
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"abc")
    (d / "ab").symlink_to(outside)
    with pytest.raises(UnsafeLayerError, match="symlink"):
        open_ref([dfd], _ref("ab/secret", 3))


@pytest.mark.parametrize("what", ["fifo", "dir"])
def test_open_ref_not_regular(objdir: tuple[Path, int], resolver: str, what: str) -> None:
    d, dfd = objdir
    if what == "fifo":
        os.mkfifo(d / "x")              # must not block waiting for a writer
    else:
        (d / "x").mkdir()
    with pytest.raises(UnsafeLayerError, match="not a regular file"):
        open_ref([dfd], _ref("x", 0))


def test_open_ref_size_mismatch(objdir: tuple[Path, int], resolver: str) -> None:
    d, dfd = objdir
    (d / "x").write_bytes(b"abcd")
    with pytest.raises(CorruptLayerError, match="4 bytes, the stream says 3"):
        open_ref([dfd], _ref("x", 3))


def test_open_ref_missing_and_bad_index(objdir: tuple[Path, int], resolver: str) -> None:
    d, dfd = objdir
    with pytest.raises(NotFoundError):
        open_ref([dfd], _ref("nope/x", 3))
    (d / "x").write_bytes(b"abc")
    with pytest.raises(CorruptLayerError, match="dirfd index 1"):
        open_ref([dfd], _ref("x", 3, idx=1))


def test_write_tar_closes_fds_on_error(objdir: tuple[Path, int]) -> None:
    d, dfd = objdir
    (d / "x").write_bytes(b"abc")
    before = len(os.listdir("/proc/self/fd"))
    chunks = [Chunk(METADATA, b"h", 1), _ref("x", 3), _ref("x", 4)]
    with pytest.raises(CorruptLayerError):
        write_tar(chunks, [dfd], io.BytesIO())
    assert len(os.listdir("/proc/self/fd")) == before


# -- importing ---------------------------------------------------------------------------------

def test_import_file_falls_back_to_copy(tmp_path: Path, objdir: tuple[Path, int]) -> None:
    d, dfd = objdir
    src = tmp_path / "src"
    data = os.urandom(200_000)
    src.write_bytes(data)
    sfd = os.open(src, os.O_RDONLY)
    try:
        # /tmp is ext4 or tmpfs here: FICLONE is refused and the copy path runs
        cloned = import_file(sfd, dfd, "obj", mode=0o444)
    finally:
        os.close(sfd)
    assert (d / "obj").read_bytes() == data
    assert (d / "obj").stat().st_mode & 0o777 == 0o444
    assert os.listdir(d) == ["obj"]
    if cloned:  # pragma: no cover - only on a reflink-capable tmp
        pytest.skip("tmp is reflink-capable; fallback not exercised here")


def test_import_file_read_write_fallback(tmp_path: Path, objdir: tuple[Path, int],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    d, dfd = objdir

    def no_clone(src: int, dst: int) -> bool:
        return False

    def no_cfr(*a: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(sds, "_ficlone", no_clone)
    monkeypatch.setattr(os, "copy_file_range", no_cfr)
    src = tmp_path / "src"
    data = os.urandom(3 << 20)
    src.write_bytes(data)
    sfd = os.open(src, os.O_RDONLY)
    try:
        assert import_file(sfd, dfd, "obj") is False
    finally:
        os.close(sfd)
    assert (d / "obj").read_bytes() == data


def test_import_file_leaves_nothing_on_error(tmp_path: Path, objdir: tuple[Path, int],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    d, dfd = objdir

    def boom(src: int, dst: int) -> bool:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(sds, "_ficlone", boom)
    src = tmp_path / "src"
    src.write_bytes(b"abc")
    sfd = os.open(src, os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            import_file(sfd, dfd, "obj")
    finally:
        os.close(sfd)
    assert os.listdir(d) == []


def test_entry_from_raw_name_with_dotdot_stays_inline(objdir: tuple[Path, int]) -> None:
    """Hostile tar member names are the unpacker's business; the codec keeps them verbatim."""
    d, dfd = objdir
    t = TarBuilder()
    t.add_raw(RawEntry("../evil", data=b"payload"))
    tar = t.build()
    buf = io.BytesIO()
    from_tar(io.BytesIO(tar), StreamWriter(buf), _placer(d))
    out = io.BytesIO()
    write_tar(read_chunks(io.BytesIO(buf.getvalue())), [dfd], out)
    assert out.getvalue() == tar
