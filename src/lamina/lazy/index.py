"""Per-layer lazy index: every member's metadata plus where its data lies.

Built once per layer blob with one sequential pass (``lamina lazy-index``, or
on first mount): the blob's digest and diff_id are verified, every tar member
is recorded with the offset of its data in the *uncompressed* stream and, for
regular files, the sha256 of that data.  A mount needs only these indexes to
serve the whole tree; file contents are fetched on first read.

Random access into the compressed blob:

- ``gzip``: a zran seek index (``indexed_gzip``): every :data:`SPACING` bytes of
  output a checkpoint keeps the compressed bit position and the 32 KiB inflate
  window, so a read inflates at most ``SPACING`` bytes before the wanted range.
  ``indexed_gzip`` exports and imports these points, which plain ``zlib``
  cannot do (it exposes neither ``inflatePrime`` nor the window).
- ``none``: the uncompressed offset is the blob offset.
- ``zstd`` with several frames (zstd:chunked, pzstd, ``zstd --block-size``):
  frames are independent, so the index keeps where each starts
  (:class:`ZstdFrames`) and a read decompresses from the last frame start at
  or before the wanted range.
- ``zstd`` in one frame: no seek points exist (a frame cannot be entered in
  the middle); the first read decompresses the whole blob once into the
  mount's cache and later reads come from there.

Files: ``LAYOUT/.lamina-lazy/<blob hex>.json`` (the member list) and
``<blob hex>.gzidx`` (gzip) or ``<blob hex>.zframes`` (multi-frame zstd);
written to a temporary name and renamed, so a reader never sees half an index.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from lamina.errors import (
    CorruptLayerError,
    DigestMismatchError,
    UnsafeLayerError,
    UnsupportedError,
)
from lamina.layer.tarstream import TarReader
from lamina.oci import mediatypes as mt
from lamina.oci.layout import OCILayout
from lamina.oci.model import Descriptor

INDEX_DIR = ".lamina-lazy"
VERSION = 1
SPACING = 2 << 20          # gzip checkpoint every 2 MiB of output (window: 32 KiB each)
_READ = 1 << 20


@dataclass(slots=True)
class Member:
    """One tar member as the index records it (data located, not copied)."""

    name: str
    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: str
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes]
    offset: int             # of the data in the uncompressed tar (files only)
    sha256: str             # hex digest of the data (files only, else "")

    def to_json(self) -> list[Any]:
        x = {k: base64.b64encode(v).decode() for k, v in self.xattrs.items()}
        return [self.name, self.kind, self.mode, self.uid, self.gid, self.size, self.mtime_ns,
                self.linkname, self.devmajor, self.devminor, x, self.offset, self.sha256]

    @classmethod
    def from_json(cls, r: list[Any]) -> Member:
        x = {k: base64.b64decode(v) for k, v in r[10].items()}
        return cls(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], x, r[11], r[12])


@dataclass
class LayerIndex:
    blob: str               # layer digest
    diff_id: str
    compression: str        # none, gzip, zstd
    members: list[Member]
    blob_path: str          # where the blob lies
    seek_path: str         # the gzip seek index ("" unless gzip)


def index_dir(layout: OCILayout) -> str:
    return os.path.join(layout.path, INDEX_DIR)


def check_index_dir(layout: OCILayout) -> None:
    """Refuse an index directory someone else could have written.

    The indexes are not content-addressed: the stored tree decides what the
    mount shows and which sha256 a file must match.  So, like ssh with its
    keys, they are used only from a directory owned by root or the caller and
    writable by nobody else.
    """
    d = index_dir(layout)
    check_private_dir(d, f"remove it (rm -r {d}) and build the indexes again")


def check_private_dir(d: str, hint: str) -> None:
    """Refuse *d* (if it exists) unless it is a directory owned by root or the
    caller and writable by nobody else; *hint* says how to recover."""
    try:
        st = os.stat(d, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (0, os.geteuid()) or (
            st.st_mode & 0o022):
        raise UnsafeLayerError(
            f"lazy index directory {d} is not a directory owned by root or you and "
            "writable only by its owner", hint=hint)


def _paths(layout: OCILayout, desc: Descriptor) -> tuple[str, str]:
    d = index_dir(layout)
    ext = ".zframes" if compression_of(desc) == "zstd" else ".gzidx"
    return os.path.join(d, desc.hex + ".json"), os.path.join(d, desc.hex + ext)


def index_paths(layout: OCILayout, desc: Descriptor) -> tuple[str, str]:
    """Where the member list and the seek index of *desc* are stored (they may not exist)."""
    return _paths(layout, desc)


def _seek_path(comp: str, path: str) -> str:
    if comp == "gzip" or (comp == "zstd" and os.path.exists(path)):
        return path
    return ""


def compression_of(desc: Descriptor) -> str:
    comp = mt.LAYER_COMPRESSION.get(desc.media_type)
    if comp is None:
        raise UnsupportedError(f"unsupported layer media type {desc.media_type!r}",
                               hint="supported: tar, tar+gzip, tar+zstd")
    return comp


class CountingFile:
    """A read-only file counting the bytes read from it (the "bytes fetched").

    Deliberately without ``fileno()``: given one, indexed_gzip reads the fd
    itself and the count would miss those reads.
    """

    def __init__(self, path: str, count: Callable[[int], None]) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._count = count

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._count(len(data))
        return data

    def readinto(self, b: Any) -> int:
        n = self._f.readinto(b)
        self._count(n or 0)
        return n or 0

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._f.close()

    @property
    def closed(self) -> bool:
        return self._f.closed


class ZstdFrames:
    """Decompress a (multi-frame) zstd stream and note where each frame starts.

    ``frames`` holds ``[compressed offset, uncompressed offset]`` of every frame
    start, then of the end: frames are independent, so a reader may start
    decompressing at any of them (zstd:chunked and pzstd write one per chunk).
    """

    def __init__(self, f: Any) -> None:
        import zstandard
        self._f = f
        self._ctx = zstandard.ZstdDecompressor(max_window_size=1 << 31)
        self._d: Any = self._ctx.decompressobj()
        self._pending = b""
        self._in = 0
        self._out = 0
        self._fresh = True
        self.frames: list[list[int]] = [[0, 0]]

    def read(self, _n: int) -> bytes:
        while True:
            chunk = self._pending or self._f.read(_READ)
            self._pending = b""
            if not chunk:
                if not self._fresh:
                    raise CorruptLayerError("truncated zstd stream (frame not finished)",
                                            hint="the layer blob is incomplete")
                return b""
            if self._fresh and not chunk.strip(b"\0"):
                continue        # zero padding after the last frame
            self._fresh = False
            out: bytes = self._d.decompress(chunk)
            if self._d.eof:
                rest: bytes = self._d.unused_data
                self._in += len(chunk) - len(rest)
                self._out += len(out)
                self.frames.append([self._in, self._out])
                self._d = self._ctx.decompressobj()
                self._pending = rest
                self._fresh = True
            else:
                self._in += len(chunk)
                self._out += len(out)
            if out:
                return out


def load_index(layout: OCILayout, desc: Descriptor, diff_id: str) -> LayerIndex | None:
    """The stored index of *desc*, or None when it is missing or stale."""
    jpath, gpath = _paths(layout, desc)
    try:
        with open(jpath, "rb") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None     # damaged: rebuilt by the caller
    if doc.get("version") != VERSION or doc.get("blob") != desc.digest or doc.get(
            "diff_id") != diff_id:
        return None
    comp = compression_of(desc)
    if comp == "gzip" and not os.path.exists(gpath):
        return None
    return LayerIndex(desc.digest, diff_id, comp, [Member.from_json(r) for r in doc["members"]],
                      layout.blob_path(desc.digest), gpath if comp == "gzip" else "")


def light_index(layout: OCILayout, desc: Descriptor, diff_id: str) -> LayerIndex | None:
    """What reading file data needs (no member list), or None if the seek index is gone."""
    comp = compression_of(desc)
    _jpath, gpath = _paths(layout, desc)
    if comp == "gzip" and not os.path.exists(gpath):
        return None
    return LayerIndex(desc.digest, diff_id, comp, [], layout.blob_path(desc.digest),
                      _seek_path(comp, gpath))


def atomic_write(path: str, data: bytes) -> None:
    def write(p: str) -> None:
        with open(p, "wb") as f:
            f.write(data)
    _atomic(path, write)


def _atomic(path: str, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    os.close(fd)
    with removed_on_error(tmp):
        write(tmp)
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)


@contextlib.contextmanager
def removed_on_error(tmp: str) -> Iterator[None]:
    """Remove the temporary file *tmp* if the block fails (even on KeyboardInterrupt)
    before it renamed *tmp* into place; the error goes on."""
    try:
        yield
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def build_index(layout: OCILayout, desc: Descriptor, diff_id: str) -> LayerIndex:
    """Read the blob of *desc* once, verify it and write its index (see module doc)."""
    import indexed_gzip
    import zstandard

    comp = compression_of(desc)
    blob_path = layout.blob_path(desc.digest)
    jpath, gpath = _paths(layout, desc)
    os.makedirs(os.path.dirname(jpath), 0o755, exist_ok=True)
    # the blob digest first: nothing is indexed from unverified bytes
    h = hashlib.sha256()
    size = 0
    with open(blob_path, "rb") as f:
        while chunk := f.read(_READ):
            h.update(chunk)
            size += len(chunk)
    if "sha256:" + h.hexdigest() != desc.digest or size != desc.size:
        raise DigestMismatchError(f"layer blob {desc.digest} does not match its digest",
                                  hint="the layout is damaged; pull or copy the image again")
    dh = hashlib.sha256()
    igz: Any = None
    zr: Any = None
    raw = open(blob_path, "rb")  # noqa: SIM115 - closed below
    try:
        if comp == "gzip":
            try:
                igz = indexed_gzip.IndexedGzipFile(fileobj=raw, spacing=SPACING,
                                                   readbuf_size=_READ, drop_handles=False)
                # checkpoints first, in one pass: plain reads add them only when a read
                # starts past the last one (never in a layer its 8 MiB buffer covers, nor
                # in the tail of any layer) and inflate the data twice doing it
                igz.build_full_index()
            except Exception as e:  # raised as ZranError/ValueError subclasses
                raise CorruptLayerError(f"layer {desc.digest}: bad gzip stream: {e}") from None
            src_read: Callable[[int], bytes] = igz.read
        elif comp == "zstd":
            zr = ZstdFrames(raw)
            src_read = zr.read
        else:
            src_read = raw.read

        def read(n: int) -> bytes:
            try:
                data = src_read(n)
            except (OSError, zstandard.ZstdError) as e:
                raise CorruptLayerError(f"layer {desc.digest}: corrupt data: {e}",
                                        hint="the layer blob is damaged") from None
            dh.update(data)
            return bytes(data)

        reader = TarReader(read)
        members: list[Member] = []
        for te in reader:
            sha = ""
            off = reader.offset
            if te.kind == "file":
                fh = hashlib.sha256()
                while data := reader.read_data():
                    fh.update(data)
                sha = fh.hexdigest()
            members.append(Member(te.name, te.kind, te.mode, te.uid, te.gid, te.size,
                                  te.mtime_ns, te.linkname, te.devmajor, te.devminor,
                                  te.xattrs, off, sha))
        reader.drain()
        if "sha256:" + dh.hexdigest() != diff_id:
            raise DigestMismatchError(
                f"layer {desc.digest}: uncompressed content does not match diff_id {diff_id}",
                hint="the image config and the layer disagree; the image is damaged")
        doc = {"version": VERSION, "blob": desc.digest, "diff_id": diff_id,
               "compression": comp, "members": [m.to_json() for m in members]}
        if igz is not None:
            _atomic(gpath, igz.export_index)
        if zr is not None and len(zr.frames) > 2:     # several frames: a seek table
            atomic_write(gpath, json.dumps(zr.frames).encode())

        def write_json(p: str) -> None:
            with open(p, "w") as f:
                json.dump(doc, f, separators=(",", ":"))
        _atomic(jpath, write_json)
    finally:
        if igz is not None:
            igz.close()
        raw.close()
    return LayerIndex(desc.digest, diff_id, comp, members, blob_path, _seek_path(comp, gpath))


def ensure_index(layout: OCILayout, desc: Descriptor, diff_id: str) -> tuple[LayerIndex, bool]:
    """The index of *desc*, built when missing; the flag says whether it was built."""
    idx = load_index(layout, desc, diff_id)
    if idx is not None:
        return idx, False
    return build_index(layout, desc, diff_id), True
