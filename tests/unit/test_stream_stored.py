"""Stored tar-splits: zstd at rest, plain on the wire, older plain splits still read."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from lamina.errors import CorruptLayerError
from lamina.store import Store, StoreOptions
from lamina.stream.splitdirfdstream import FILE, StreamWriter, read_chunks
from lamina.stream.stored import (
    open_stored,
    plain_size_within,
    stored_reader,
    stored_writer,
)
from lamina.testing.images import build_image
from lamina.testing.layers import TarBuilder

MAGIC = b"\x28\xb5\x2f\xfd"


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def _plain_stream() -> bytes:
    buf = io.BytesIO()
    w = StreamWriter(buf)
    for i in range(300):
        w.metadata(b"h" * 512 + bytes(300))     # header and padding, as tars have
        w.file_ref(4096 + i, 0, f"{i % 256:02x}/{i:062x}")
    w.inline(b"inline data")
    w.metadata(bytes(1024))
    w.flush()
    return buf.getvalue()


def _compressed(tmp_path: Path, stream: bytes) -> Path:
    p = tmp_path / "split"
    with open(p, "wb") as f, stored_writer(f) as w:
        for c in read_chunks(io.BytesIO(stream)):
            if c.kind == FILE:
                assert c.name is not None
                w.file_ref(c.size, c.dirfd_index, c.name)
            else:
                assert c.data is not None
                (w.metadata if c.kind == 0 else w.inline)(c.data)
    return p


def test_written_compressed_and_read_back_as_the_same_stream(tmp_path: Path) -> None:
    stream = _plain_stream()
    p = _compressed(tmp_path, stream)
    raw = p.read_bytes()
    assert raw[:4] == MAGIC and len(raw) * 10 < len(stream)
    with open_stored(str(p)) as f:
        assert f.read() == stream
    assert plain_size_within(str(p), len(stream))
    assert not plain_size_within(str(p), len(stream) - 1)


def test_a_plain_split_of_an_older_store_is_read_as_it_is(tmp_path: Path) -> None:
    stream = _plain_stream()
    p = tmp_path / "old"
    p.write_bytes(stream)
    with open_stored(str(p)) as f:
        assert f.read() == stream
    assert plain_size_within(str(p), len(stream))
    assert not plain_size_within(str(p), len(stream) - 1)


@pytest.mark.parametrize("damage", ["cut", "cut-at-frame-end", "flipped", "trailing"])
def test_a_damaged_compressed_split_is_an_error_not_a_short_stream(tmp_path: Path,
                                                                   damage: str) -> None:
    stream = _plain_stream()
    p = _compressed(tmp_path, stream)
    raw = bytearray(p.read_bytes())
    if damage == "cut":
        raw = raw[:len(raw) // 2]
    elif damage == "cut-at-frame-end":
        raw = raw[:-4]                          # only the checksum is missing
    elif damage == "flipped":
        raw[len(raw) // 2] ^= 0xFF
    else:
        raw += b"\0" * 8
    p.write_bytes(bytes(raw))
    with open_stored(str(p)) as f, pytest.raises(CorruptLayerError) as e:
        while f.read(1 << 16):
            pass
    assert "fsck" in (e.value.hint or "")


def test_the_wire_stays_plain(tmp_path: Path) -> None:
    # an untrusted stream is never decompressed: a zstd frame is an unknown chunk
    raw = _compressed(tmp_path, _plain_stream()).read_bytes()
    with pytest.raises(CorruptLayerError, match="chunk type 0x28"):
        list(read_chunks(io.BytesIO(raw)))
    # and a reader without peek() is taken as plain
    assert stored_reader(io.BytesIO(b"\x00")).read() == b"\x00"


def test_a_store_whose_split_is_plain_still_exports_and_checks(tmp_path: Path) -> None:
    tar = (TarBuilder().add_dir("d").add_file("d/a", os.urandom(9000))
           .add_file("d/b", b"x" * 100).build())
    build_image(str(tmp_path / "lay"), "t", [tar])
    with Store.open(str(tmp_path / "store"), options=StoreOptions(fsync=False)) as st:
        st.import_image(str(tmp_path / "lay"), "t", "img")
        split = st.tar_split_path(sha(tar))
        with open_stored(split) as f:
            plain = f.read()
        os.chmod(split, 0o644)
        Path(split).write_bytes(plain)          # as a store written before compression
        out = io.BytesIO()
        assert st.export_layer(sha(tar), out) == sha(tar)
        assert out.getvalue() == tar
        assert st.fsck().ok
