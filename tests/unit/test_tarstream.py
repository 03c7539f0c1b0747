"""TarReader against Python's tarfile as the writer: formats, raw headers, errors."""

from __future__ import annotations

import io
import tarfile

import pytest

from lamina.errors import CorruptLayerError, UnsafeLayerError, UnsupportedError
from lamina.layer.tarstream import BLOCK, TarReader, parse_pax


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]],
         fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _info(name: str, type_: bytes = tarfile.REGTYPE, size: int = 0,
          **kw: object) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.size = size
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def _read_all(data: bytes) -> list[tuple[object, ...]]:
    src = io.BytesIO(data)
    r = TarReader(src.read)
    out = []
    for e in r:
        body = b""
        while chunk := r.read_data(7):
            body += chunk
        out.append((e.name, e.kind, e.mode, e.uid, e.gid, e.linkname, body, e.xattrs))
    r.drain()
    assert r.offset == len(data)
    return out


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_formats_and_long_names(fmt: int) -> None:
    long = "d/" + "x" * 150 + "/" + "y" * 90
    if fmt == tarfile.USTAR_FORMAT:
        long = "d/" + "x" * 90 + "/" + "y" * 90  # ustar: prefix+name split only
    data = _tar([
        (_info("d", tarfile.DIRTYPE, mode=0o755), None),
        (_info(long, size=5, mode=0o4755, uid=7, gid=8), b"hello"),
        (_info("d/ln", tarfile.SYMTYPE, linkname="../" + "t" * 120 if fmt != tarfile.USTAR_FORMAT
               else "../t"), None),
        (_info("d/hl", tarfile.LNKTYPE,
               linkname=long if fmt != tarfile.USTAR_FORMAT else "d/ln"), None),
        (_info("d/fifo", tarfile.FIFOTYPE), None),
    ], fmt)
    got = _read_all(data)
    assert [g[0] for g in got] == ["d/", long, "d/ln", "d/hl", "d/fifo"]
    assert got[1][1:7] == ("file", 0o4755, 7, 8, "", b"hello")
    assert got[2][1] == "symlink" and got[2][5].startswith("../")
    assert got[3][1] == "hardlink"
    assert got[3][5] == (long if fmt != tarfile.USTAR_FORMAT else "d/ln")
    assert got[4][1] == "fifo"


def test_raw_header_bytes_rebuild_the_stream() -> None:
    data = _tar([
        (_info("a" * 200, size=3, pax_headers={"SCHILY.xattr.user.k": "v"}), b"abc"),
        (_info("b", size=0), b""),
    ])
    src = io.BytesIO(data)
    r = TarReader(src.read)
    rebuilt = b""
    for e in r:
        rebuilt += e.raw_header
        body = r.read_data()
        rebuilt += body + bytes(-len(body) % BLOCK)
    assert data.startswith(rebuilt)
    assert data[len(rebuilt):].count(0) == len(data) - len(rebuilt)


def test_pax_xattrs_binary_and_global_header_ignored() -> None:
    raw = b"\x00\xff\x10\xef"
    records = b"SCHILY.xattr.user.bin=" + raw
    rec = f"{len(records) + 4} ".encode() + records + b"\n"
    assert len(rec) == int(rec.split(b" ")[0])
    assert parse_pax(rec) == {"SCHILY.xattr.user.bin": raw}
    g = _info("pax_global_header", tarfile.XGLTYPE)
    data = _tar([(_info("f", size=1), b"x")])
    # prepend a global header block by hand: 'g' type with a comment record
    body = b"20 comment=abcdefgh\n"
    ti = _info("pax_global_header", tarfile.XGLTYPE, size=len(body))
    hdr = ti.tobuf(tarfile.USTAR_FORMAT)
    data = hdr + body + bytes(-len(body) % BLOCK) + data
    got = _read_all(data)
    assert [x[0] for x in got] == ["f"]
    assert g.name == "pax_global_header"


def test_checksum_mismatch() -> None:
    data = bytearray(_tar([(_info("f", size=1), b"x")]))
    data[10] ^= 0x55
    with pytest.raises(CorruptLayerError, match="checksum"):
        _read_all(bytes(data))


@pytest.mark.parametrize("cut", [100, BLOCK + 1, BLOCK * 2 - 1])
def test_truncated(cut: int) -> None:
    data = _tar([(_info("f", size=600), b"y" * 600)], tarfile.USTAR_FORMAT)
    with pytest.raises(CorruptLayerError, match="truncated"):
        _read_all(data[:cut])


def test_huge_pax_header_is_refused_without_reading_it() -> None:
    ti = _info("x", tarfile.XHDTYPE, size=1 << 32)
    data = ti.tobuf(tarfile.USTAR_FORMAT)
    with pytest.raises(CorruptLayerError, match="exceeds"):
        _read_all(data)


def test_nul_in_pax_path_is_unsafe() -> None:
    rec = b"path=a\x00b"
    rec = f"{len(rec) + 4} ".encode() + rec + b"\n"
    ti = _info("x", tarfile.XHDTYPE, size=len(rec))
    data = ti.tobuf(tarfile.USTAR_FORMAT) + rec + bytes(-len(rec) % BLOCK)
    data += _info("f").tobuf(tarfile.USTAR_FORMAT) + bytes(1024)
    with pytest.raises(UnsafeLayerError, match="NUL"):
        _read_all(data)


def test_sparse_is_unsupported() -> None:
    ti = _info("s", b"S", size=0)
    data = ti.tobuf(tarfile.GNU_FORMAT) + bytes(1024)
    with pytest.raises(UnsupportedError):
        _read_all(data)


def test_base256_uid() -> None:
    ti = _info("f", uid=1 << 30, gid=3)
    data = _tar([(ti, b"")], tarfile.GNU_FORMAT)
    assert _read_all(data)[0][3] == 1 << 30
