"""Write a list of changes as a compressed layer blob in an OCI layout.

The tar stream is produced once and hashed twice on the way (diff_id over the
tar, blob digest over the compressed bytes); compression runs in parallel
threads (isal's threaded gzip writer, zstd's multi-threaded frames) and the
blob only appears in ``blobs/sha256`` once complete.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zstandard
from isal import igzip_threaded

from lamina.errors import BundleError, UsageError
from lamina.layer.diff import Change
from lamina.layer.tarwrite import END_OF_ARCHIVE, Header, header_bytes, padding
from lamina.oci import mediatypes as mt
from lamina.oci.layout import OCILayout
from lamina.oci.model import Descriptor
from lamina.stream.splitdirfdstream import StreamWriter


@dataclass
class GeneratedLayer:
    desc: Descriptor
    diff_id: str
    entries: int
    tar_size: int
    hashes: dict[str, bytes] = field(default_factory=dict)


class _Sink:
    """File-like end of the compressor: hashes and writes to the blob."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write

    def write(self, data: bytes) -> int:
        self._write(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    @property
    def closed(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


def _compressor(kind: str, sink: _Sink) -> Any:
    if kind == "gzip":
        return igzip_threaded.open(sink, "wb", compresslevel=3, threads=2)  # type: ignore[no-untyped-call]
    if kind == "zstd":
        return zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(
            sink, closefd=False)  # type: ignore[arg-type]
    if kind == "none":
        return sink
    raise UsageError(f"unknown compression {kind!r}", hint="use gzip, zstd or none")


def header_for(c: Change, clamp_ns: int | None) -> Header:
    st = c.st
    if c.kind in ("whiteout", "opaque"):
        return Header(c.path, "file", 0o644)
    assert st is not None
    mtime = st.st_mtime_ns
    if clamp_ns is not None and mtime > clamp_ns:
        mtime = clamp_ns
    name = "./" if c.path == "" else c.path + ("/" if c.kind == "dir" else "")
    h = Header(name, c.kind, stat.S_IMODE(st.st_mode),
               c.uid, c.gid, 0, mtime, c.linkname, xattrs=c.xattrs)
    if c.kind in ("char", "block"):
        h.devmajor, h.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    if c.kind == "file":
        h.size = st.st_size
    return h


def write_layer(layout: OCILayout, rootfs: str, changes: list[Change], *,
                compression: str = "gzip", source_date_epoch: int | None = None,
                on_bytes: Callable[[int], None] | None = None) -> GeneratedLayer:
    clamp = source_date_epoch * 1_000_000_000 if source_date_epoch is not None else None
    diff = hashlib.sha256()
    hashes: dict[str, bytes] = {}
    tar_size = 0
    with layout.blob_writer() as blob:
        comp = _compressor(compression, _Sink(blob.write))

        def emit(data: bytes) -> None:
            nonlocal tar_size
            diff.update(data)
            tar_size += len(data)
            comp.write(data)

        for c in changes:
            h = header_for(c, clamp)
            emit(header_bytes(h))
            if c.kind == "file":
                digest = _emit_file(os.path.join(rootfs, c.path), h.size, emit, on_bytes)
                hashes[c.path] = digest
        emit(END_OF_ARCHIVE)
        if compression != "none":
            comp.close()  # flushes the last block/frame into the sink
        desc = blob.commit(mt.COMPRESSION_LAYER_TYPE[compression])
    return GeneratedLayer(desc, "sha256:" + diff.hexdigest(), len(changes), tar_size, hashes)


def write_stream(changes: list[Change], out: StreamWriter, *,
                 source_date_epoch: int | None = None) -> None:
    """The layer :func:`write_layer` would write, as a splitdirfdstream: headers
    and padding as metadata, each file's content a reference to its path beneath
    dirfd 0 (the directory holding the changes: the rootfs, or a driver's upper
    dir).  The consumer reads, hashes and clones the files itself, so a bundle
    on a reflink filesystem becomes a stored layer without its data being
    copied."""
    clamp = source_date_epoch * 1_000_000_000 if source_date_epoch is not None else None
    for c in changes:
        h = header_for(c, clamp)
        out.metadata(header_bytes(h))
        if c.kind == "file":
            if h.size:
                out.file_ref(h.size, 0, c.path)
            out.metadata(padding(h.size))
    out.metadata(END_OF_ARCHIVE)
    out.flush()


def _emit_file(path: str, size: int, emit: Callable[[bytes], None],
               on_bytes: Callable[[int], None] | None) -> bytes:
    h = hashlib.sha256()
    n = 0
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while n < size:
            chunk = os.read(fd, min(1 << 20, size - n))
            if not chunk:
                break
            h.update(chunk)
            emit(chunk)
            n += len(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
        if n != size or os.read(fd, 1):
            raise BundleError(f"{path} changed size while it was being packed",
                              hint="do not modify the bundle during repack")
    finally:
        os.close(fd)
    emit(padding(size))
    return h.digest()
