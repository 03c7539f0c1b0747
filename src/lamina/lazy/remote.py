"""Mount an image straight from a registry: the index from its artifact, data by range.

:func:`resolve` (in the ``lamina mount`` process) fetches the image manifest,
its config and its lazy index artifact (:mod:`lamina.lazy.artifact`: a few
KB to MB), checks them against each other, writes the seek indexes and the
merged tree below the mount's cache directory and returns what the FUSE
daemon needs; nothing of the layers is downloaded.

In the daemon, :class:`RemoteBlobs` serves :class:`lamina.lazy.fetch.Fetcher`
the layer blobs as seekable files (:class:`RemoteBlob`) over HTTP range
requests (``GET /v2/NAME/blobs/DIGEST`` with ``Range``), with a block cache
shared by every blob of the mount, so indexed_gzip inflating from a
checkpoint, or zstd from a frame start, reads fetched blocks.  Before a file
is read the fetcher hints the compressed range it needs, fetched in one
request; reads past the hint fetch on with a growing read-ahead.  Every file
is still verified against the sha256 in the index; a blob served wrong makes
the read fail (EIO), it never shows wrong data.

Nothing here writes where ``lamina pull`` looks: blocks live in memory, and
fetched files in the mount's cache named by their sha256, so pulling the
image later (or during the mount) is unaffected.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from lamina.errors import (
    CorruptLayerError,
    ImageFormatError,
    NotFoundError,
    RegistryError,
    UsageError,
)
from lamina.lazy.index import LayerIndex, atomic_write, check_private_dir
from lamina.lazy.model import FrozenTree, build_tree, dump_tree
from lamina.oci.model import Platform
from lamina.registry.reference import RegistryRef

if TYPE_CHECKING:
    from lamina.lazy.fetch import FetchStats
    from lamina.registry.client import RegistryOptions

SCHEME = "docker://"
BLOCK = 64 << 10                # the block cache's unit
READAHEAD = 4                   # blocks fetched on a miss ...
MAX_READAHEAD = 64              # ... doubling while reads go on sequentially, up to 4 MiB
MAX_REQUEST = 8 << 20           # one range request at most (a hint is cut here)
CACHE_BYTES = 64 << 20          # blocks kept per mount (least recently used dropped)
_LAYERS_FILE = "layers.json"    # written last: the directory is complete


@dataclass(frozen=True)
class RemoteImage:
    """An image to mount from a registry (``docker://REGISTRY/REPO[:TAG][@DIGEST]``)."""

    ref: RegistryRef
    registry: RegistryOptions | None = None
    index_digest: str | None = None     # pin the lazy index artifact

    @classmethod
    def parse(cls, text: str, registry: RegistryOptions | None = None,
              index_digest: str | None = None) -> RemoteImage:
        if not text.startswith(SCHEME):
            raise UsageError(f"{text!r} is not a registry image",
                             hint=f"write {SCHEME}REGISTRY/REPO[:TAG]")
        return cls(RegistryRef.parse(text), registry, index_digest)

    def __str__(self) -> str:
        return SCHEME + str(self.ref)


def is_remote(text: str) -> bool:
    return text.startswith(SCHEME)


# -- resolving: manifest, config, index artifact --------------------------------------------


@dataclass
class Resolved:
    tree: FrozenTree
    layers: list[LayerIndex]        # no member lists; blob_path "" (remote)
    descs: list[dict[str, Any]]
    manifest: str
    artifact: str
    downloaded: bool                # False: the index was in the cache already


def resolve(image: RemoteImage, platform: Platform | None, cache_dir: str) -> Resolved:
    """Find the image and its lazy index; keep the index and tree under *cache_dir*."""
    from lamina.lazy.artifact import fetch_layers, find_artifacts, get_blob
    from lamina.oci.layout import MAX_JSON_BLOB
    from lamina.oci.model import ImageConfig, Manifest
    from lamina.registry.client import RegistryClient, RegistryOptions
    from lamina.registry.pull import PullOptions, _resolve
    ref = image.ref
    repo = ref.repository
    options = image.registry or RegistryOptions()
    with RegistryClient(ref, options, [f"repository:{repo}:pull"]) as client:
        top = client.get_manifest(repo, ref.reference)
        picked = _resolve(client, repo, top, PullOptions(ref, "", platform=platform))[0][0]
        man = Manifest.from_json(picked.digest, picked.doc)
        descs = [d.to_json() for d in man.layers]
        if image.index_digest:
            artifact = image.index_digest
        else:
            found = find_artifacts(client, repo, man.digest)
            if not found:
                raise NotFoundError(
                    f"{ref} ({man.digest}) has no lazy index in the registry",
                    hint=f"publish one: 'lamina lazy-index --push {ref}' (reads the image "
                         f"once), or pull it ('lamina pull {ref} --layout DIR:TAG') and "
                         "mount DIR:TAG locally")
            artifact = found[-1].digest
        # a kept index decides what the mount shows (and its tree is unmarshalled)
        d = os.path.join(cache_dir, "index")
        check_private_dir(d, f"remove it (rm -r {d}); the index is fetched again")
        dest = os.path.join(cache_dir, "index", artifact.split(":", 1)[1])
        tree_path = os.path.join(dest, "tree-" + man.digest.split(":", 1)[1])
        got = _load_cached(dest, tree_path, man.digest, descs)
        if got is not None:
            tree, layers = got
            return Resolved(tree, layers, descs, man.digest, artifact, False)
        try:
            doc = json.loads(get_blob(client, repo, man.config, MAX_JSON_BLOB))
        except ValueError as e:
            raise ImageFormatError(f"config {man.config.digest}: invalid JSON: {e}") from None
        config = ImageConfig.from_json(man.config.digest, doc)
        if len(config.diff_ids) != len(man.layers):
            raise ImageFormatError(f"{ref}: the config lists {len(config.diff_ids)} diff_ids "
                                   f"for {len(man.layers)} layers")
        layers = fetch_layers(client, repo, artifact, man, config.diff_ids, dest,
                              jobs=max(1, min(4, options.connections)))
    data = dump_tree(build_tree(layers), man.digest)
    atomic_write(tree_path, data)
    frozen = FrozenTree.load(data, man.digest)
    assert frozen is not None
    frozen.path = tree_path
    for li in layers:
        li.members = []     # the tree has what the mount needs
    atomic_write(os.path.join(dest, _LAYERS_FILE), json.dumps(
        [[li.blob, li.diff_id, li.compression, li.seek_path] for li in layers]).encode())
    return Resolved(frozen, layers, descs, man.digest, artifact, True)


def _load_cached(dest: str, tree_path: str, manifest: str, descs: list[dict[str, Any]],
                 ) -> tuple[FrozenTree, list[LayerIndex]] | None:
    """The index of an earlier mount with the same cache (--cache), if complete."""
    try:
        with open(os.path.join(dest, _LAYERS_FILE), "rb") as f:
            rows = json.load(f)
        with open(tree_path, "rb") as f:
            tree = FrozenTree.load(f.read(), manifest)
    except (OSError, ValueError):
        return None
    if tree is None or not isinstance(rows, list) or len(rows) != len(descs):
        return None
    layers = []
    for row, d in zip(rows, descs, strict=True):
        if not (isinstance(row, list) and len(row) == 4 and row[0] == d["digest"]) or (
                row[3] and not os.path.exists(row[3])):
            return None
        layers.append(LayerIndex(row[0], row[1], row[2], [], "", row[3]))
    tree.path = tree_path
    return tree, layers


# -- reading: blobs over range requests ------------------------------------------------------


class BlockCache:
    """Fixed-size blocks of remote blobs, least recently used dropped past *limit*."""

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        self.limit = limit
        self._blocks: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> bytes | None:
        with self._lock:
            b = self._blocks.get(key)
            if b is not None:
                self._blocks.move_to_end(key)
            return b

    def has(self, key: tuple[str, int]) -> bool:
        with self._lock:
            return key in self._blocks

    def put(self, key: tuple[str, int], data: bytes) -> None:
        with self._lock:
            old = self._blocks.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._blocks[key] = data
            self._bytes += len(data)
            while self._bytes > self.limit and len(self._blocks) > 1:
                _k, v = self._blocks.popitem(last=False)
                self._bytes -= len(v)


class RangeReader(Protocol):
    """What :class:`RemoteBlob` needs of a registry
    (:class:`lamina.registry.remote.RemoteBlobSource` has it)."""

    def read_range(self, digest: str, start: int, length: int) -> bytes: ...


class RemoteBlob:
    """A seekable, read-only file over one remote blob (see the module doc)."""

    def __init__(self, source: RangeReader, digest: str, size: int,
                 cache: BlockCache, stats: FetchStats, retries: int = 2) -> None:
        self._src = source
        self.digest = digest
        self.size = size
        self._cache = cache
        self._stats = stats
        self._retries = retries
        self._pos = 0
        self._ra = READAHEAD
        self._last = -2             # last block fetched by a miss (for the read-ahead)
        self._nblocks = (size + BLOCK - 1) // BLOCK
        self.closed = False

    # the file interface indexed_gzip and zstandard use
    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self.size}[whence]
        if base + pos < 0:
            raise OSError(22, "negative seek position")
        self._pos = base + pos
        return self._pos

    def close(self) -> None:
        self.closed = True

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self._pos + n)
        if end <= self._pos:
            return b""
        first, last = self._pos // BLOCK, (end - 1) // BLOCK
        parts = []
        for b in range(first, last + 1):
            data = self._block(b, last)
            lo = self._pos - b * BLOCK if b == first else 0
            hi = end - b * BLOCK if b == last else len(data)
            parts.append(data[lo:hi])
        out = b"".join(parts)
        self._pos += len(out)
        return out

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def hint(self, start: int, end: int) -> None:
        """Fetch the blocks of [start, end) that are missing, in as few requests as
        there are gaps (capped at :data:`MAX_REQUEST` bytes from *start*)."""
        end = min(end, self.size, start + MAX_REQUEST)
        if end <= start:
            return
        b, last = start // BLOCK, (end - 1) // BLOCK
        while b <= last:
            if self._cache.has((self.digest, b)):
                b += 1
                continue
            e = b
            while e < last and not self._cache.has((self.digest, e + 1)):
                e += 1
            self._fetch(b, e)
            b = e + 1

    # -- internals -------------------------------------------------------------------------
    def _block(self, b: int, want_last: int) -> bytes:
        data = self._cache.get((self.digest, b))
        if data is not None:
            return data
        # a miss: fetch on to the wanted end and the read-ahead, up to a cached block
        self._ra = min(self._ra * 2, MAX_READAHEAD) if b == self._last + 1 else READAHEAD
        stop = min(max(want_last, b + self._ra - 1), self._nblocks - 1,
                   b + MAX_REQUEST // BLOCK - 1)
        e = b
        while e < stop and not self._cache.has((self.digest, e + 1)):
            e += 1
        got = self._fetch(b, e)
        self._last = e
        return got[0]

    def _fetch(self, first: int, last: int) -> list[bytes]:
        start = first * BLOCK
        length = min((last + 1) * BLOCK, self.size) - start
        for attempt in range(self._retries + 1):
            try:
                data = self._src.read_range(self.digest, start, length)
                break
            except RegistryError:
                # a dropped connection, a 5xx; a 401 was answered inside the client
                # (new token) and a 404 is a NotFoundError: neither is retried here
                if attempt == self._retries:
                    raise
                time.sleep(0.2 * (attempt + 1))
        self._stats.range_requests += 1
        self._stats.blob_bytes_read += len(data)
        if len(data) != length:
            raise CorruptLayerError(f"blob {self.digest}: the registry sent {len(data)} bytes "
                                    f"of the range {start}+{length}",
                                    hint="the registry's copy is shorter than its "
                                         "descriptor says")
        blocks = [data[i:i + BLOCK] for i in range(0, length, BLOCK)]
        for i, blk in enumerate(blocks):
            self._cache.put((self.digest, first + i), blk)
        return blocks


class RemoteBlobs:
    """The :class:`lamina.lazy.fetch.RemoteSource` of a mount from a registry."""

    def __init__(self, image: RemoteImage, cache_bytes: int = CACHE_BYTES) -> None:
        from lamina.registry.client import RegistryOptions
        from lamina.registry.remote import RemoteBlobSource
        options = image.registry or RegistryOptions()
        self._source = RemoteBlobSource(image.ref, options)
        self._retries = options.retries
        self.cache = BlockCache(cache_bytes)

    def open(self, digest: str, size: int, stats: FetchStats) -> RemoteBlob:
        return RemoteBlob(self._source, digest, size, self.cache, stats, self._retries)

    def close(self) -> None:
        self._source.close()
