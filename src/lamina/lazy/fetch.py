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
:mod:`lamina.hooks` is adapted by :class:`HookLookup`).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from lamina.errors import CorruptLayerError, DigestMismatchError, NotFoundError
from lamina.lazy.index import SPACING, CountingFile, LayerIndex
from lamina.lazy.model import Node

_CHUNK = 1 << 20
_GZ_READBUF = 64 << 10     # compressed bytes per read: small, so a small file costs little


@dataclass
class FetchStats:
    blob_bytes_read: int = 0        # compressed bytes read from layer blobs
    files_fetched: int = 0          # distinct contents fetched and verified
    file_bytes_fetched: int = 0     # their uncompressed size
    cache_hits: int = 0             # opens served by an already fetched content

    def to_json(self) -> dict[str, int]:
        return asdict(self)


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
                 plugins: tuple[LookupPlugin, ...] = ()) -> None:
        self.layers = layers
        self.descs = descs
        self.cache_dir = cache_dir
        self.plugins = plugins
        self.stats = FetchStats()
        self._asked: set[int] = set()
        self._blob: dict[int, str] = {}
        self._gz: dict[int, Any] = {}
        self._zst: dict[int, str] = {}
        self._frames: dict[int, list[tuple[int, int]]] = {}
        self._lock = threading.Lock()
        os.makedirs(cache_dir, exist_ok=True)

    def _count(self, n: int) -> None:
        self.stats.blob_bytes_read += n

    def close(self) -> None:
        for g in self._gz.values():
            g.close()
        self._gz.clear()

    def _blob_path(self, layer: int) -> str:
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
        if not os.path.exists(path):
            raise NotFoundError(f"layer blob {self.layers[layer].blob} is not available",
                                hint="no lookup plugin provided it and the layout lacks it")
        return path

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
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in self._read_range(node.layer, node.offset, node.size):
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != node.sha256:
                raise DigestMismatchError(
                    f"content of a file in layer {self.layers[node.layer].blob} does not "
                    "match the lazy index", hint="the blob changed since it was indexed")
            os.rename(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        self.stats.files_fetched += 1
        self.stats.file_bytes_fetched += node.size
        return path

    def _read_range(self, layer: int, offset: int, size: int) -> Any:
        li = self.layers[layer]
        blob = self._blob_path(layer)
        if li.compression == "gzip":
            import indexed_gzip
            g = self._gz.get(layer)
            if g is None:
                g = indexed_gzip.IndexedGzipFile(fileobj=CountingFile(blob, self._count),
                                                 drop_handles=False, index_file=li.seek_path,
                                                 readbuf_size=_GZ_READBUF)
                self._gz[layer] = g
            ahead = offset - g.tell()
            if 0 <= ahead <= SPACING:
                # reading on is cheaper than going back to the checkpoint: files read in
                # archive order (a copy, a full walk) inflate each byte about once
                while ahead:
                    got = g.read(min(ahead, _CHUNK))
                    if not got:
                        raise CorruptLayerError(f"layer {li.blob} ends early")
                    ahead -= len(got)
            else:
                g.seek(offset)
            left = size
            while left:
                data = g.read(min(left, _CHUNK))
                if not data:
                    raise CorruptLayerError(f"layer {li.blob} ends inside a file's data")
                left -= len(data)
                yield data
            return
        if li.compression == "zstd" and li.seek_path:
            yield from self._zstd_frames(layer, blob, offset, size)
            return
        if li.compression == "zstd":
            blob = self._zstd_tar(layer, blob)
            count = False
        else:
            count = True
        with open(blob, "rb") as f:
            f.seek(offset)
            left = size
            while left:
                data = f.read(min(left, _CHUNK))
                if not data:
                    raise CorruptLayerError(f"layer {li.blob} ends inside a file's data")
                if count:
                    self._count(len(data))
                left -= len(data)
                yield data

    def _zstd_frames(self, layer: int, blob: str, offset: int, size: int) -> Any:
        # frames are independent: decompress from the last frame starting at or before
        # *offset*, skip to it, read on (across frames) until *size* bytes
        import zstandard
        frames = self._frames.get(layer)
        if frames is None:
            with open(self.layers[layer].seek_path, "rb") as f:
                frames = [(int(c), int(u)) for c, u in json.load(f)]
            self._frames[layer] = frames
        i = bisect.bisect_right([u for _c, u in frames], offset) - 1
        c, u = frames[max(i, 0)]
        src = CountingFile(blob, self._count)
        try:
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

    def _zstd_tar(self, layer: int, blob: str) -> str:
        # no seek points in a single-frame zstd blob: decompress it once, keep the tar
        path = self._zst.get(layer)
        if path is not None:
            return path
        import zstandard
        path = os.path.join(self.cache_dir, self.layers[layer].blob.split(":", 1)[1] + ".tar")
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".zstd-")
        try:
            with os.fdopen(fd, "wb") as out:
                src = CountingFile(blob, self._count)
                try:
                    zstandard.ZstdDecompressor(max_window_size=1 << 31).copy_stream(
                        src, out)  # type: ignore[arg-type]
                finally:
                    src.close()
            os.rename(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        self._zst[layer] = path
        return path
