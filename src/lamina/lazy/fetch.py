"""Fetch a file's content on first read, verify it and keep it in a content cache.

A file is fetched whole: its range of the uncompressed layer is read from the
blob (gzip: inflated from the nearest checkpoint of the seek index; plain tar:
read in place; zstd: the whole layer decompressed once into the cache, see
:mod:`lamina.lazy.index`), its sha256 is checked against the one recorded in
the index, and it is stored in ``CACHE/<sha256>``.  Later reads, and every
other path with the same content, are served from that file.

:class:`FetchStats` counts what was read from blobs; the FUSE adapter serves it
as JSON in the ``user.lamina.lazy.stats`` xattr of the mount root.

Lookup plugins (:class:`LookupPlugin`) are asked first, once per layer, when a
layer's data is first needed: one may fetch the blob from elsewhere and answer
a path of an OCI layout holding it (the ``lookup`` hook of
:mod:`lamina.hooks` is adapted by :class:`HookLookup`).  A blob found in no
layout is read from the *remote* source when the mount has one
(:class:`lamina.lazy.remote.RemoteBlobs`: HTTP range requests to a registry);
before each read the fetcher tells the blob which compressed range the file
needs (:meth:`BlobFile.hint`), so a remote file costs one request.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from lamina.errors import CorruptLayerError, DigestMismatchError, LaminaError, NotFoundError
from lamina.lazy.index import SPACING, CountingFile, LayerIndex, removed_on_error
from lamina.lazy.model import Node

_CHUNK = 1 << 20
_GZ_READBUF = 64 << 10     # compressed bytes per read: small, so a small file costs little
# indexed_gzip's BufferedReader would otherwise inflate 4 MiB past every read
_GZ_BUFFER = 64 << 10
_ZSTD_READ = 128 << 10     # what zstandard's stream reader asks for at once


@dataclass
class FetchStats:
    blob_bytes_read: int = 0        # compressed bytes read from layer blobs (remote: received)
    files_fetched: int = 0          # distinct contents fetched and verified
    file_bytes_fetched: int = 0     # their uncompressed size
    cache_hits: int = 0             # opens served by an already fetched content
    range_requests: int = 0         # HTTP range requests to a registry (remote blobs)

    def to_json(self) -> dict[str, int]:
        return asdict(self)


class BlobFile(Protocol):
    """A layer blob opened for reading (a local file or a remote one)."""

    def read(self, n: int = -1) -> bytes: ...

    def seek(self, pos: int, whence: int = 0) -> int: ...

    def tell(self) -> int: ...

    def close(self) -> None: ...


class RemoteSource(Protocol):
    """Where blobs missing from every layout are read (see :mod:`lamina.lazy.remote`)."""

    def open(self, digest: str, size: int, stats: FetchStats) -> BlobFile: ...

    def close(self) -> None: ...


def _hint(f: BlobFile, start: int, end: int) -> None:
    """Tell a remote blob the compressed range about to be read (one request for it)."""
    hint: Callable[[int, int], None] | None = getattr(f, "hint", None)
    if hint is not None:
        hint(start, end)


def _read_exactly(f: BlobFile, size: int, blob: str) -> Iterator[bytes]:
    """*size* bytes of *f* (a blob or its gzip stream) from where it stands, in chunks;
    ending sooner means the layer *blob* is not what was indexed."""
    left = size
    while left:
        data = f.read(min(left, _CHUNK))
        if not data:
            raise CorruptLayerError(f"layer {blob} ends inside a file's data")
        left -= len(data)
        yield data


class LookupPlugin(Protocol):
    """Asked once per layer before its data is first read.

    Return the path of an OCI image layout holding the blob *digest* (the plugin
    may have just fetched it), or None to let lamina read the image's own
    layout.
    """

    def lookup(self, layer: dict[str, Any], index: int) -> str | None: ...


class HookLookup:
    """A :class:`LookupPlugin` running the ``lookup`` hooks of :mod:`lamina.hooks`."""

    def __init__(self, runner: Any, image: str) -> None:
        self._runner = runner
        self._image = image

    def lookup(self, layer: dict[str, Any], index: int) -> str | None:
        res = self._runner.run("lookup", {"image": self._image, "layer": layer,
                                          "index": index})
        if res.status == "handled":
            return bytes(res.stdout).decode().strip() or None
        return None


class Fetcher:
    def __init__(self, layers: list[LayerIndex], descs: list[dict[str, Any]], cache_dir: str,
                 plugins: tuple[LookupPlugin, ...] = (),
                 remote: RemoteSource | None = None) -> None:
        self.layers = layers
        self.descs = descs
        self.cache_dir = cache_dir
        self.plugins = plugins
        self.remote = remote
        self.stats = FetchStats()
        self._asked: set[int] = set()
        self._blob: dict[int, str] = {}
        self._gz: dict[int, Any] = {}
        self._gzf: dict[int, BlobFile] = {}      # the blob under each gzip reader
        self._points: dict[int, list[tuple[int, int]]] = {}
        self._zst: dict[int, str] = {}
        self._frames: dict[int, list[tuple[int, int]]] = {}
        self._lock = threading.Lock()
        os.makedirs(cache_dir, exist_ok=True)

    def _count(self, n: int) -> None:
        self.stats.blob_bytes_read += n

    def close(self) -> None:
        for layer in list(self._gz):
            self._drop_reader(layer)
        if self.remote is not None:
            self.remote.close()

    def _blob_path(self, layer: int) -> str:
        """The local blob of *layer* ("" when none exists and a remote source has it)."""
        if layer not in self._asked:
            self._asked.add(layer)
            path = self.layers[layer].blob_path
            for p in self.plugins:
                where = p.lookup(self.descs[layer], layer)
                if where:
                    hex_ = self.layers[layer].blob.split(":", 1)[1]
                    path = os.path.join(where, "blobs", "sha256", hex_)
                    break
            self._blob[layer] = path
        path = self._blob[layer]
        if path and os.path.exists(path):
            return path
        if self.remote is not None:
            return ""
        raise NotFoundError(f"layer blob {self.layers[layer].blob} is not available",
                            hint="no lookup plugin provided it and the layout lacks it")

    def _open(self, layer: int) -> BlobFile:
        path = self._blob_path(layer)
        if path:
            return CountingFile(path, self._count)
        assert self.remote is not None
        return self.remote.open(self.layers[layer].blob, int(self.descs[layer]["size"]),
                                self.stats)

    def cached(self, node: Node) -> str:
        """The cache path holding *node*'s verified content, fetching it if needed.

        Thread-safe: fetches are serialized (a layer's gzip reader has one position).
        """
        with self._lock:
            return self._cached(node)

    def _cached(self, node: Node) -> str:
        path = os.path.join(self.cache_dir, node.sha256)
        if os.path.exists(path):
            self.stats.cache_hits += 1
            return path
        h = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".fetch-")
        with removed_on_error(tmp):
            with os.fdopen(fd, "wb") as out:
                chunks = self._read_range(node.layer, node.offset, node.size)
                while (chunk := self._next(node.layer, chunks)) is not None:
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != node.sha256:
                raise DigestMismatchError(
                    f"content of a file in layer {self.layers[node.layer].blob} does not "
                    "match the lazy index", hint="the blob changed since it was indexed")
            os.rename(tmp, path)
        self.stats.files_fetched += 1
        self.stats.file_bytes_fetched += node.size
        return path

    def _next(self, layer: int, chunks: Iterator[bytes]) -> bytes | None:
        """The next chunk of a read; a failed read forgets the layer's gzip reader (its
        position is unknown) and decoder errors become :class:`CorruptLayerError`."""
        try:
            return next(chunks, None)
        except LaminaError:
            self._drop_reader(layer)
            raise
        except Exception as e:  # indexed_gzip's ZranError (an OSError) and the like
            self._drop_reader(layer)
            raise CorruptLayerError(
                f"layer {self.layers[layer].blob}: corrupt data: {type(e).__name__}: {e}",
                hint="the blob changed since it was indexed") from None

    def _drop_reader(self, layer: int) -> None:
        g = self._gz.pop(layer, None)
        f = self._gzf.pop(layer, None)
        for x in (g, f):
            if x is not None:
                try:
                    x.close()
                except Exception:
                    pass

    def _gzip(self, layer: int) -> Any:
        g = self._gz.get(layer)
        if g is None:
            import indexed_gzip
            li = self.layers[layer]
            f = self._open(layer)
            try:
                g = indexed_gzip.IndexedGzipFile(fileobj=f, drop_handles=False,
                                                 index_file=li.seek_path,
                                                 readbuf_size=_GZ_READBUF,
                                                 buffer_size=_GZ_BUFFER)
            except BaseException:
                f.close()
                raise
            self._gz[layer] = g
            self._gzf[layer] = f
            # (uncompressed, compressed) offset of every checkpoint, for the range hints
            self._points[layer] = [(int(u), int(c)) for u, c in g.seek_points()]
        return g

    def _gzip_hint(self, layer: int, start: int, end: int) -> None:
        """Hint the compressed range that inflating up to *end* from *start* needs.

        It starts at the checkpoint at or before *start* (blocks already fetched
        are not fetched again) and ends at an estimate of where *end* lies: linear
        between the checkpoints around it, capped by the next one, plus one read
        buffer (zran reads whole buffers).
        """
        f = self._gzf[layer]
        if not hasattr(f, "hint"):
            return
        pts = self._points[layer] or [(0, 0)]
        us = [u for u, _c in pts]
        total = int(self.descs[layer]["size"])
        c0 = pts[max(bisect.bisect_right(us, start) - 1, 0)][1]
        j = bisect.bisect_left(us, end)
        if 0 < j < len(pts):
            (ua, ca), (ub, cb) = pts[j - 1], pts[j]
            stop = min(ca + (end - ua) * (cb - ca) // max(ub - ua, 1), cb)
        else:       # past the last checkpoint: the blob's ratio so far (none yet: 1:1)
            ua, ca = pts[-1]
            stop = ca + ((end - ua) * ca // ua if ua else end - ua)
        _hint(f, c0, min(stop + _GZ_READBUF, total))

    def _read_range(self, layer: int, offset: int, size: int) -> Iterator[bytes]:
        li = self.layers[layer]
        if li.compression == "gzip":
            g = self._gzip(layer)
            pos = g.tell()
            ahead = offset - pos
            # reading on is cheaper than going back to the checkpoint: files read in
            # archive order (a copy, a full walk) inflate each byte about once
            read_on = 0 <= ahead <= SPACING
            self._gzip_hint(layer, pos if read_on else offset, offset + size)
            if read_on:
                while ahead:
                    got = g.read(min(ahead, _CHUNK))
                    if not got:
                        raise CorruptLayerError(f"layer {li.blob} ends early")
                    ahead -= len(got)
            else:
                g.seek(offset)
            yield from _read_exactly(g, size, li.blob)
            return
        if li.compression == "zstd" and li.seek_path:
            yield from self._zstd_frames(layer, offset, size)
            return
        if li.compression == "zstd":
            path = self._zstd_tar(layer)
            f: BlobFile = open(path, "rb")  # noqa: SIM115 - closed below
        else:
            f = self._open(layer)
            _hint(f, offset, offset + size)
        try:
            f.seek(offset)
            yield from _read_exactly(f, size, li.blob)
        finally:
            f.close()

    def _zstd_frames(self, layer: int, offset: int, size: int) -> Iterator[bytes]:
        # frames are independent: decompress from the last frame starting at or before
        # *offset*, skip to it, read on (across frames) until *size* bytes
        import zstandard
        frames = self._frames.get(layer)
        if frames is None:
            with open(self.layers[layer].seek_path, "rb") as f:
                frames = [(int(c), int(u)) for c, u in json.load(f)]
            self._frames[layer] = frames
        us = [u for _c, u in frames]
        c, u = frames[max(bisect.bisect_right(us, offset) - 1, 0)]
        j = bisect.bisect_left(us, offset + size)
        total = int(self.descs[layer]["size"])
        stop = frames[j][0] if j < len(frames) else total
        src = self._open(layer)
        try:
            _hint(src, c, min(stop + _ZSTD_READ, total))
            src.seek(c)
            r = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(
                src, read_across_frames=True)  # type: ignore[arg-type]
            skip = offset - u
            while skip:
                got = r.read(min(skip, _CHUNK))
                if not got:
                    raise CorruptLayerError(f"layer {self.layers[layer].blob} ends early")
                skip -= len(got)
            left = size
            while left:
                data = r.read(min(left, _CHUNK))
                if not data:
                    raise CorruptLayerError(
                        f"layer {self.layers[layer].blob} ends inside a file's data")
                left -= len(data)
                yield bytes(data)
        except zstandard.ZstdError as e:
            raise CorruptLayerError(f"layer {self.layers[layer].blob}: corrupt zstd data: {e}",
                                    hint="the blob changed since it was indexed") from None
        finally:
            src.close()

    def _zstd_tar(self, layer: int) -> str:
        # no seek points in a single-frame zstd blob: decompress it once, keep the tar
        path = self._zst.get(layer)
        if path is not None:
            return path
        import zstandard
        path = os.path.join(self.cache_dir, self.layers[layer].blob.split(":", 1)[1] + ".tar")
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".zstd-")
        with removed_on_error(tmp):
            with os.fdopen(fd, "wb") as out:
                src = self._open(layer)
                try:
                    zstandard.ZstdDecompressor(max_window_size=1 << 31).copy_stream(
                        src, out)  # type: ignore[arg-type]
                finally:
                    src.close()
            os.rename(tmp, path)
        self._zst[layer] = path
        return path
