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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import zstandard
from isal import isal_zlib

from lamina.errors import CorruptLayerError, DigestMismatchError, LaminaError, UnsupportedError
from lamina.oci import mediatypes as mt
from lamina.oci.model import Descriptor

CHUNK = 1 << 20
QUEUE_CHUNKS = 16          # at most ~16 MiB of decoded data in flight
_MAX_OUT = CHUNK           # per decompress call: bounds memory on decompression bombs


class _Decoder(Protocol):
    def feed(self, data: bytes) -> list[bytes]: ...
    def finish(self) -> list[bytes]: ...


class _Identity:
    def feed(self, data: bytes) -> list[bytes]:
        return [data]

    def finish(self) -> list[bytes]:
        return []


class _Gzip:
    """Multi-member gzip (RFC 1952 allows concatenated members; pigz emits them)."""

    def __init__(self) -> None:
        self._d: Any = isal_zlib.decompressobj(wbits=31)
        self._seen = False

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        try:
            while True:
                if self._d.eof:
                    if not data.strip(b"\0"):
                        return out  # zero padding after the last member, or nothing left
                    self._d = isal_zlib.decompressobj(wbits=31)
                chunk = self._d.decompress(data, _MAX_OUT)
                self._seen = True
                if chunk:
                    out.append(chunk)
                data = self._d.unused_data if self._d.eof else self._d.unconsumed_tail
                # a full output buffer may leave output pending with no input left
                if not data and len(chunk) < _MAX_OUT:
                    return out
        except isal_zlib.IsalError as e:  # type: ignore[misc]
            raise CorruptLayerError(f"corrupt gzip data: {e}",
                                    hint="the layer blob is damaged") from None

    def finish(self) -> list[bytes]:
        if not self._d.eof or not self._seen:
            raise CorruptLayerError("truncated gzip stream (no end of stream marker)",
                                    hint="the layer blob is incomplete")
        return []


class _Zstd:
    def __init__(self) -> None:
        self._ctx = zstandard.ZstdDecompressor(max_window_size=1 << 31)
        self._d: Any = self._ctx.decompressobj()
        self._seen = False

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        try:
            while data:
                if self._d.eof:
                    self._d = self._ctx.decompressobj()
                chunk = self._d.decompress(data)
                self._seen = True
                if chunk:
                    out.append(chunk)
                data = self._d.unused_data if self._d.eof else b""
        except zstandard.ZstdError as e:
            raise CorruptLayerError(f"corrupt zstd data: {e}",
                                    hint="the layer blob is damaged") from None
        return out

    def finish(self) -> list[bytes]:
        if not self._seen or not self._d.eof:
            raise CorruptLayerError("truncated zstd stream (frame not finished)",
                                    hint="the layer blob is incomplete")
        return []


def decoder_for(media_type: str) -> _Decoder:
    comp = mt.LAYER_COMPRESSION.get(media_type)
    if comp is None:
        raise UnsupportedError(f"unsupported layer media type {media_type!r}",
                               hint="supported: tar, tar+gzip, tar+zstd (and non-distributable)")
    if comp == "gzip":
        return _Gzip()
    if comp == "zstd":
        return _Zstd()
    return _Identity()


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

    @staticmethod
    def _check_rest(f: Any, src: LayerSource, blob_h: Any, n: int) -> None:
        while n <= src.desc.size:
            data = f.read(CHUNK)
            if not data:
                break
            blob_h.update(data)
            n += len(data)
        _check_blob(src, blob_h, n)

    def _decode_one(self, src: LayerSource, q: queue.Queue[object]) -> None:
        dec = decoder_for(src.desc.media_type)
        blob_h = hashlib.sha256()
        diff_h = hashlib.sha256()
        n = 0
        with src.open() as f:
            while not self._cancel.is_set():
                data = f.read(CHUNK)
                if not data:
                    break
                n += len(data)
                if n > src.desc.size:
                    raise DigestMismatchError(
                        f"layer {src.desc.digest} is larger than its descriptor's "
                        f"{src.desc.size} bytes", hint="the layout is corrupt; re-pull the image")
                blob_h.update(data)
                if self._progress is not None:
                    self._progress(len(data))
                try:
                    decoded = dec.feed(data)
                except CorruptLayerError:
                    # a damaged blob is better reported as a digest mismatch, if it is one
                    self._check_rest(f, src, blob_h, n)
                    raise
                for out in decoded:
                    diff_h.update(out)
                    if not self._put(q, out):
                        return
        if self._cancel.is_set():
            return
        _check_blob(src, blob_h, n)   # the whole blob was read: digest first, then format
        for out in dec.finish():
            diff_h.update(out)
            self._put(q, out)
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
