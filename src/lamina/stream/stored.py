"""Tar-splits at rest: a store keeps its splitdirfdstreams zstd-compressed.

A layer's tar-split is tar headers and zero padding between references to
objects, and compresses about 15x: 24 MiB become 1.6 MiB for the corpus's
``base``, ``py`` and ``app``, and 100,000 small files carry about 77 MiB of
headers and padding.  Streams on the wire stay plain (docs/splitdirfdstream.md).
A stored file says which it is by its first byte: 0x28 starts a zstd frame and
is no chunk type, so the plain tar-splits of older stores are read as they are.

Stored streams are the store's own (written by it, renamed into place when
complete), so they are trusted like its index; still, a damaged or cut-short
frame is a :class:`CorruptLayerError` (zstandard's own readers end quietly at a
truncated frame).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO, cast

import zstandard

from lamina.errors import CorruptLayerError
from lamina.stream.splitdirfdstream import StreamWriter

ZSTD_FIRST = b"\x28"        # a zstd frame's magic 28 B5 2F FD begins so; no chunk type does
_LEVEL = 3                  # about 1 GB/s of tar-split on one core, 15x smaller
_IN = 1 << 16               # compressed bytes fed per step (about 1 MiB out)
_IO = 1 << 20
_HINT = "the store is damaged: run 'lamina fsck --repair' and import the image again"


class _Unzstd(io.RawIOBase):
    """The decompressed bytes of the single zstd frame in *f*."""

    def __init__(self, f: BinaryIO, name: str) -> None:
        self._f = f
        self._name = name
        self._d = zstandard.ZstdDecompressor().decompressobj()
        self._out = memoryview(b"")
        self._end = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._out:
            if self._end:
                return 0
            data = self._f.read(_IN)
            if not data:
                if not self._d.eof:
                    raise CorruptLayerError(f"{self._name}: the compressed tar-split is cut "
                                            "short", hint=_HINT)
                self._end = True
                return 0
            if self._d.eof:
                raise CorruptLayerError(f"{self._name}: data after the compressed tar-split",
                                        hint=_HINT)
            try:
                self._out = memoryview(self._d.decompress(data))
            except zstandard.ZstdError as e:
                raise CorruptLayerError(f"{self._name}: the compressed tar-split is damaged: "
                                        f"{e}", hint=_HINT) from None
            if self._d.eof and self._d.unused_data:
                raise CorruptLayerError(f"{self._name}: data after the compressed tar-split",
                                        hint=_HINT)
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def is_compressed(f: BinaryIO) -> bool:
    """Whether the stream *f* (which must support ``peek``, as buffered files do) begins
    with a zstd frame; nothing is consumed."""
    peek = getattr(f, "peek", None)
    return peek is not None and bytes(peek(1)[:1]) == ZSTD_FIRST


def stored_reader(f: BinaryIO, name: str = "tar-split") -> BinaryIO:
    """The plain stream of an open stored tar-split: *f* itself or a decompressing reader
    (closing it closes *f*).  *f* must support ``peek``; others are taken as plain."""
    if is_compressed(f):
        return cast(BinaryIO, io.BufferedReader(_Unzstd(f, name), _IO))
    return f


def plain_size_within(path: str, limit: int) -> bool:
    """Whether the stored tar-split *path* expands to at most *limit* stream bytes (a
    compressed one is decompressed only that far)."""
    with open(path, "rb", buffering=_IO) as f:
        if not is_compressed(f):
            return os.fstat(f.fileno()).st_size <= limit
        return len(stored_reader(f, path).read(limit + 1)) <= limit


def open_stored(path: str, dir_fd: int | None = None) -> BinaryIO:
    """Open a stored tar-split (*path* relative to *dir_fd* when given) for reading its
    plain stream."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    return stored_reader(open(fd, "rb", buffering=_IO), path)


@contextmanager
def stored_writer(f: BinaryIO) -> Iterator[StreamWriter]:
    """A :class:`StreamWriter` whose stream goes zstd-compressed to *f*; the frame is
    finished when the block ends without an exception (*f* stays open)."""
    z = zstandard.ZstdCompressor(level=_LEVEL, write_checksum=True).stream_writer(
        f, closefd=False, write_size=_IO)
    w = StreamWriter(cast(BinaryIO, z))
    yield w
    w.flush()
    z.flush(zstandard.FLUSH_FRAME)
