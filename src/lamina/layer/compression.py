"""Layer blob decoding: decompress and verify in a background thread.

:class:`LayerPipeline` runs one producer thread for a whole image: it reads
each layer blob, hashes the compressed bytes (the blob digest), decompresses
(isal for gzip, zstandard for zstd; both release the GIL), hashes the
uncompressed bytes (the diff_id) and hands chunks to the extracting thread
through a bounded queue.  So decompression and verification of layer N+1 run
while layer N is still being written to disk, and memory stays bounded by the
queue (``QUEUE_CHUNKS`` x ``CHUNK``), whatever the compression ratio.

Digest failures surface in the consumer as :class:`DigestMismatchError` at the
end of the affected layer, before that layer is reported as applied.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, cast

import zstandard
from isal import isal_zlib

from lamina.errors import CorruptLayerError, DigestMismatchError, LaminaError, UnsupportedError
from lamina.oci import mediatypes as mt
from lamina.oci.model import Descriptor

CHUNK = 1 << 20
QUEUE_CHUNKS = 16          # at most ~16 MiB of decoded data in flight
_MAX_OUT = CHUNK           # per decompress call: bounds memory on decompression bombs


class _Blob:
    """The raw blob as the decoders pull it: hashed, counted, size-checked, reported."""

    def __init__(self, f: Any, src: LayerSource, progress: Callable[[int], None] | None,
                 cancel: threading.Event) -> None:
        self._f = f
        self._src = src
        self._progress = progress
        self._cancel = cancel
        self.h = hashlib.sha256()
        self.n = 0

    def read(self, size: int = CHUNK) -> bytes:
        if self._cancel.is_set():
            return b""
        data: bytes = self._f.read(min(size, CHUNK) if size > 0 else CHUNK)
        if data:
            self.n += len(data)
            if self.n > self._src.desc.size:
                raise DigestMismatchError(
                    f"layer {self._src.desc.digest} is larger than its descriptor's "
                    f"{self._src.desc.size} bytes", hint="the layout is corrupt; re-pull the image")
            self.h.update(data)
            if self._progress is not None:
                self._progress(len(data))
        return data

    def check_rest(self) -> None:
        """Read to the end and check the digest: a damaged blob is better reported as a
        digest mismatch, if it is one."""
        while self.n <= self._src.desc.size and self.read(CHUNK):
            pass
        _check_blob(self._src, self.h, self.n)


# Decoders turn the pulled blob into decoded chunks of at most CHUNK bytes, one at a
# time, so a decompression bomb never holds more than the queue's worth in memory.

def _identity(blob: _Blob) -> Iterator[bytes]:
    while data := blob.read(CHUNK):
        yield data


def _gzip(blob: _Blob) -> Iterator[bytes]:
    """Multi-member gzip (RFC 1952 allows concatenated members; pigz emits them)."""
    d: Any = isal_zlib.decompressobj(wbits=31)
    seen = False
    try:
        while data := blob.read(CHUNK):
            while True:
                if d.eof:
                    if not data.strip(b"\0"):
                        break  # zero padding after the last member, or nothing left
                    d = isal_zlib.decompressobj(wbits=31)
                chunk = d.decompress(data, _MAX_OUT)
                seen = True
                if chunk:
                    yield chunk
                data = d.unused_data if d.eof else d.unconsumed_tail
                # a full output buffer may leave output pending with no input left
                if not data and len(chunk) < _MAX_OUT:
                    break
    except isal_zlib.IsalError as e:  # type: ignore[misc]
        raise CorruptLayerError(f"corrupt gzip data: {e}",
                                hint="the layer blob is damaged") from None
    if not d.eof or not seen:
        raise CorruptLayerError("truncated gzip stream (no end of stream marker)",
                                hint="the layer blob is incomplete")


def _zstd(blob: _Blob) -> Iterator[bytes]:
    # stream_reader bounds each read's output (decompressobj returns all of it at
    # once); it does not flag a stream cut at a frame boundary or inside a frame, but
    # the blob digest and the diff_id, both checked at the end, do
    ctx = zstandard.ZstdDecompressor(max_window_size=1 << 31)
    try:
        reader = ctx.stream_reader(cast(IO[bytes], blob), read_size=CHUNK,
                                   read_across_frames=True)
        while chunk := reader.read(CHUNK):
            yield chunk
    except zstandard.ZstdError as e:
        raise CorruptLayerError(f"corrupt zstd data: {e}",
                                hint="the layer blob is damaged") from None
    if blob.n == 0:
        raise CorruptLayerError("empty zstd stream", hint="the layer blob is incomplete")


def decoder_for(media_type: str) -> Callable[[_Blob], Iterator[bytes]]:
    comp = mt.LAYER_COMPRESSION.get(media_type)
    if comp is None:
        raise UnsupportedError(f"unsupported layer media type {media_type!r}",
                               hint="supported: tar, tar+gzip, tar+zstd (and non-distributable)")
    return {"gzip": _gzip, "zstd": _zstd}.get(comp, _identity)


@dataclass(frozen=True)
class LayerSource:
    """One layer to decode: its descriptor, expected diff_id and a blob opener."""

    desc: Descriptor
    diff_id: str
    open: Callable[[], Any]   # returns a binary file object (raw, unverified)


_END = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class LayerStream:
    """The consumer side of one layer: a ``read(n)`` over decoded bytes."""

    def __init__(self, q: queue.Queue[object], cancel: threading.Event) -> None:
        self._q = q
        self._cancel = cancel
        self._buf = memoryview(b"")
        self._eof = False
        self.read_bytes = 0

    def read(self, n: int) -> bytes:
        if n <= 0:
            return b""
        while not self._buf:
            if self._eof:
                return b""
            item = self._q.get()
            if item is _END:
                self._eof = True
                return b""
            if isinstance(item, _Failure):
                self._eof = True
                raise item.exc
            assert isinstance(item, bytes)
            if len(item) <= n:  # the common case: hand the chunk over without a copy
                self.read_bytes += len(item)
                return item
            self._buf = memoryview(item)
        out = bytes(self._buf[:n])
        self._buf = self._buf[len(out):]
        self.read_bytes += len(out)
        return out

    def finish(self) -> None:
        """Drain to the end of the layer; raises if verification failed."""
        while self.read(CHUNK):
            pass


class LayerPipeline:
    """Decode layers in order on a background thread; see the module docstring."""

    def __init__(self, layers: Sequence[LayerSource],
                 on_progress: Callable[[int], None] | None = None) -> None:
        self._layers = list(layers)
        self._queues: list[queue.Queue[object]] = [queue.Queue(QUEUE_CHUNKS) for _ in layers]
        self._cancel = threading.Event()
        self._progress = on_progress
        self._thread = threading.Thread(target=self._run, name="lamina-decode", daemon=True)

    def __enter__(self) -> LayerPipeline:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stream(self, i: int) -> LayerStream:
        return LayerStream(self._queues[i], self._cancel)

    def close(self) -> None:
        self._cancel.set()
        for q in self._queues:  # unblock a producer waiting on a full queue
            try:
                while True:
                    q.get_nowait()
            except queue.Empty:
                pass
        self._thread.join(timeout=30)

    def _put(self, q: queue.Queue[object], item: object) -> bool:
        while not self._cancel.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        for src, q in zip(self._layers, self._queues, strict=True):
            try:
                self._decode_one(src, q)
            except LaminaError as e:
                self._put(q, _Failure(e))
                return
            except OSError as e:
                self._put(q, _Failure(CorruptLayerError(
                    f"reading layer {src.desc.digest}: {e}")))
                return
            except BaseException as e:
                self._put(q, _Failure(e))
                return
            if self._cancel.is_set():
                return

    def _decode_one(self, src: LayerSource, q: queue.Queue[object]) -> None:
        decode = decoder_for(src.desc.media_type)
        diff_h = hashlib.sha256()
        with src.open() as f:
            blob = _Blob(f, src, self._progress, self._cancel)
            try:
                for out in decode(blob):
                    diff_h.update(out)
                    if not self._put(q, out):
                        return
            except CorruptLayerError:
                blob.check_rest()
                raise
            if self._cancel.is_set():
                return
            blob.check_rest()   # the whole blob was read: digest first, then format
        got = "sha256:" + diff_h.hexdigest()
        if got != src.diff_id:
            raise DigestMismatchError(
                f"layer {src.desc.digest}: diff_id mismatch: config says {src.diff_id}, "
                f"uncompressed content is {got}",
                hint="the image config does not match its layers; the image is corrupt")
        self._put(q, _END)


def _check_blob(src: LayerSource, blob_h: Any, n: int) -> None:
    got = "sha256:" + blob_h.hexdigest()
    if n != src.desc.size or got != src.desc.digest:
        raise DigestMismatchError(
            f"layer blob digest mismatch: expected {src.desc.digest} ({src.desc.size} bytes), "
            f"got {got} ({n} bytes)", hint="the layout is corrupt; re-pull the image")
