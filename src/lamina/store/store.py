"""The local content-addressed store.

Default location: ``/var/lib/lamina`` as root, else ``$XDG_DATA_HOME/lamina``
(``~/.local/share/lamina``); ``--store PATH`` overrides.  On disk::

    STORE/                              0700: the store's only access control
    ├── lamina.db                       SQLite index (WAL): refs, manifests, layers,
    │                                   chains, objects, extractions (see db.py)
    ├── lock                            store lock: flock shared for work, exclusive for gc
    ├── blobs/
    │   └── sha256/
    │       └── 2c26b46b68ff...         compressed layers, manifests, configs, as in
    │                                   an OCI layout (OCILayout's blob readers work)
    ├── objects/
    │   ├── 00/ ... ff/                 all 256 made when the store is created
    │   └── 9f/
    │       └── 86d081884c7d659a2f...   one regular file's content, named by its
    │                                   sha256 (2 + 62 hex), mode 0444, shared by
    │                                   every layer and image that contains it
    ├── layers/
    │   └── 4f3a...e1.tar-split         per-layer metadata, named by diff_id hex: a
    │                                   splitdirfdstream whose metadata chunks are the
    │                                   tar's headers/padding/trailer verbatim and
    │                                   whose file chunks name objects (dirfd 0 =
    │                                   objects/, name "9f/86d0..."); empty files
    │                                   have no file chunk (their header says size 0);
    │                                   kept as one zstd frame (lamina.stream.stored;
    │                                   older stores' plain splits are read as well)
    ├── extract/
    │   └── <driver>/<chain id hex>/    reserved for drivers: a layer applied on
    │                                   top of everything below it (named by ChainID)
    ├── locks/
    │   └── layer-<diff_id hex>.lock    work locks: one ingest per layer at a time
    └── tmp/
        └── <pid>-<random>/             per-process staging, flock-held while alive

Invariants: a file becomes visible under its final name only when complete
(written in staging, then linked or renamed); a database row is committed
only after the files it names are in place (and, with ``fsync``, after one
``syncfs``); removals delete rows first, then files.  So an interrupted
process leaves only unreferenced files and staging, which the next open
(staging) or ``gc`` (the rest) reclaims, and ``fsck`` can check every row
against the files and every file against its name.

Layers are keyed by diff_id (the uncompressed tar's digest): the same layer
compressed two ways is ingested once.  A layer's place in an image is its
ChainID (image-spec), so an extraction that depends on the layers below it is
named by the chain.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    BinaryIO,
    Concatenate,
    ParamSpec,
    Protocol,
    TypeVar,
    cast,
)

from lamina.errors import (
    BundleError,
    CorruptLayerError,
    DigestMismatchError,
    EnvironmentError_,
    ImageFormatError,
    LaminaError,
    NotFoundError,
    UnsafeLayerError,
    UnsupportedError,
    UsageError,
)
from lamina.layer.tarstream import TarEntry
from lamina.oci import mediatypes as mt
from lamina.oci.layout import MAX_JSON_BLOB, OCILayout
from lamina.oci.model import Descriptor, ImageConfig, Manifest, Platform
from lamina.store.db import SCHEMA_VERSION, Database, layer_objects_of
from lamina.store.ids import chain_ids, check_driver, hex_of, parse_ref
from lamina.store.locking import Staging, StoreLock, reclaim, rmtree_all, work_lock
from lamina.store.objects import SMALL, ObjectWriter, object_name, syncfs
from lamina.store.paths import default_store_path
from lamina.stream.splitdirfdstream import (
    DataReader,
    from_tar,
    import_file,
    read_chunks,
    write_tar,
)
from lamina.stream.stored import open_stored, stored_writer

if TYPE_CHECKING:
    from lamina.store.fsck import FsckResult
    from lamina.store.gc import StoreGCResult
    from lamina.store.receive import BlobInput, ReceiveStats, SourceIndex

class Progress(Protocol):
    """The hooks imports report to (lamina.bundle.Progress and the CLI's bars fit)."""

    def start(self, total_bytes: int, layers: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def layer_done(self, index: int) -> None: ...


class _NoProgress:
    def start(self, total_bytes: int, layers: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def layer_done(self, index: int) -> None:
        pass


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _host_errors(fn: Callable[Concatenate[Store, _P], _R]) -> Callable[Concatenate[Store, _P], _R]:
    """Turn failures of the host (ENOSPC, EIO, EACCES, a damaged lamina.db) into a
    LaminaError with a hint instead of a traceback."""
    def wrapper(self: Store, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(self, *args, **kwargs)
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            raise EnvironmentError_(
                f"store {self.path}: {e.strerror or e}{where}",
                hint="check free space, permissions and the store's filesystem") from None
        except sqlite3.DatabaseError as e:
            raise EnvironmentError_(
                f"store index {self.db_path}: {e}",
                hint="the index is damaged or unreadable; check the disk, restore it from a "
                     "backup or start a new store") from None
    functools.update_wrapper(wrapper, fn)
    return wrapper


DIRS = ("blobs/sha256", "objects", "layers", "extract", "tmp", "locks")
BLOB_MODE = 0o444
_IO = 1 << 20


@dataclass(frozen=True)
class StoreOptions:
    fsync: bool = True          # syncfs(2) before committing a layer (off: tests, scratch stores)
    link_blobs: bool = True     # hardlink blobs from a layout the current user owns
    wait: bool = True           # wait for the store lock instead of failing "busy"


@dataclass
class LayerStats:
    files: int = 0              # regular files with content
    new_objects: int = 0
    new_bytes: int = 0
    tar_size: int = 0


@dataclass
class IngestResult:
    diff_id: str
    ingested: bool              # False: it was already in the store
    waited: bool = False        # another process held the layer's lock first
    stats: LayerStats = field(default_factory=LayerStats)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LayerImport(IngestResult):
    digest: str = ""
    chain_id: str = ""


@dataclass
class ImportResult:
    name: str
    manifest: str
    config: str
    layers: list[LayerImport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ingested(self) -> int:
        return sum(1 for x in self.layers if x.ingested)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ingested"] = self.ingested
        return d


@dataclass(frozen=True)
class LayerInfo:
    diff_id: str
    blob: str
    media_type: str
    blob_size: int
    tar_size: int
    files: int
    state: str
    created: float


@dataclass(frozen=True)
class StoredLayer:
    desc: Descriptor            # the compressed blob, as in the manifest
    diff_id: str
    chain_id: str


@dataclass(frozen=True)
class StoredImage:
    name: str
    manifest: Manifest
    config: ImageConfig
    layers: tuple[StoredLayer, ...]


@dataclass(frozen=True)
class RefInfo:
    name: str
    manifest: str
    config: str
    platform: str
    layers: int
    size: int                   # compressed layer bytes
    created: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Extraction:
    driver: str
    chain_id: str
    path: str
    state: str
    in_use: bool
    created: float


class Store:
    """A local store; open with :meth:`open`, use as a context manager or :meth:`close`.

    Every public method takes the store lock (shared) for its duration;
    wrap several calls in :meth:`session` to keep ``gc`` out between them
    (e.g. ingest, then extract, then :meth:`record_extraction`).
    """

    def __init__(self, path: str, options: StoreOptions) -> None:
        self.path = path
        self.options = options
        self.db_path = os.path.join(path, "lamina.db")
        self.blob_dir = os.path.join(path, "blobs", "sha256")
        self.objects_dir = os.path.join(path, "objects")
        self.layers_dir = os.path.join(path, "layers")
        self.extract_dir = os.path.join(path, "extract")
        self.tmp_dir = os.path.join(path, "tmp")
        self.locks_dir = os.path.join(path, "locks")
        self.lock = StoreLock(os.path.join(path, "lock"))
        self.db = Database(self.db_path)
        self._root_fd = -1
        self._staging = Staging(self.tmp_dir)
        self._objects: ObjectWriter | None = None

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | None = None, *, create: bool = True,
             options: StoreOptions | None = None) -> Store:
        p = os.path.abspath(path or default_store_path())
        try:
            _check_store_dir(p, create)
            st = cls(p, options or StoreOptions())
        except PermissionError as e:
            raise EnvironmentError_(f"cannot open the store {p}: {e.strerror}",
                                    hint="run as the store's owner or pass --store") from None
        try:
            st._setup()
        except BaseException:
            st.close()
            raise
        return st

    @_host_errors
    def _setup(self) -> None:
        if self.db.version() != SCHEMA_VERSION:
            with self.lock.exclusive():
                for d in DIRS:
                    os.makedirs(os.path.join(self.path, d), 0o700, exist_ok=True)
                for i in range(256):
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(os.path.join(self.objects_dir, f"{i:02x}"), 0o700)
                self.db.initialise()
        self.db.check_version()
        self.db.configure()
        self._root_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._objects = ObjectWriter(self.objects_dir, lambda: self._staging.fd)
        reclaim(self.tmp_dir)  # staging of killed processes (locks tell live from dead)

    def close(self) -> None:
        self._staging.close()
        if self._objects is not None:
            self._objects.close()
            self._objects = None
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1
        self.db.close()
        self.lock.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def session(self) -> Iterator[Store]:
        """Hold the store lock (shared) across several operations."""
        with self.lock.shared(self._on_lock, wait=self.options.wait):
            yield self

    def _on_lock(self) -> None:
        # another process's gc may have run while we did not hold the lock
        if self._objects is not None:
            self._objects.known.clear()

    @property
    def objects(self) -> ObjectWriter:
        assert self._objects is not None, "store is closed"
        return self._objects

    # -- paths ----------------------------------------------------------------------------
    def blob_path(self, digest: str) -> str:
        return os.path.join(self.blob_dir, hex_of(digest))

    def object_path(self, digest: str) -> str:
        return os.path.join(self.objects_dir, object_name(hex_of(digest)))

    def tar_split_path(self, diff_id: str) -> str:
        return os.path.join(self.layers_dir, hex_of(diff_id) + ".tar-split")

    def extraction_dir(self, driver: str, chain_id: str) -> str:
        return os.path.join(self.extract_dir, check_driver(driver), hex_of(chain_id))

    @property
    def objects_fd(self) -> int:
        """A directory fd of ``objects/``: dirfd index 0 of every tar-split."""
        return self.objects.dir_fd

    def _lock_path(self, kind: str, key: str) -> str:
        return os.path.join(self.locks_dir, f"{kind}-{key}.lock")

    # -- blobs ----------------------------------------------------------------------------
    def has_blob(self, digest: str) -> bool:
        return os.path.exists(self.blob_path(digest))

    def open_blob(self, digest: str) -> BinaryIO:
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is not in the store {self.path}",
                                hint="import the image again (lamina import)") from None

    def read_blob(self, digest: str, limit: int = MAX_JSON_BLOB) -> bytes:
        """A small blob (manifest, config), verified against its digest."""
        with self.open_blob(digest) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ImageFormatError(f"blob {digest} is over the {limit}-byte limit for a "
                                   "JSON document")
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise DigestMismatchError(f"store blob {digest} does not match its digest",
                                      hint="run 'lamina fsck --repair' and import the "
                                           "image again")
        return data

    @_host_errors
    def put_blob(self, data: bytes, media_type: str) -> Descriptor:
        """Store a small blob (manifest, config) from memory."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with self.session():
            if not self.has_blob(digest):
                name = f"blob-{os.urandom(8).hex()}"
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             BLOB_MODE, dir_fd=self._staging.fd)
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                    os.chmod(name, BLOB_MODE, dir_fd=self._staging.fd)
                except BaseException:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=self._staging.fd)
                    raise
                self._link_blob(name, digest)
            with self.db.tx() as c:
                c.execute("INSERT OR IGNORE INTO blobs VALUES (?, ?, ?)",
                          (digest, media_type, len(data)))
        return Descriptor(media_type, digest, len(data))

    @_host_errors
    def import_blob(self, layout: OCILayout, desc: Descriptor) -> Descriptor:
        """Copy one blob from a layout into the store (hardlinked if the current user
        owns it, else reflinked or copied), verified against *desc* before it appears.
        Like every blob, it stays only while a ref reaches it (``gc``)."""
        with self.session():
            if not self.has_blob(desc.digest):
                staged = self._stage_blob(layout, desc)
                try:
                    self._verify_file(staged, desc)
                except BaseException:
                    os.unlink(staged, dir_fd=self._staging.fd)
                    raise
                self._link_blob(staged, desc.digest)
            with self.db.tx() as c:
                c.execute("INSERT OR IGNORE INTO blobs VALUES (?, ?, ?)",
                          (desc.digest, desc.media_type, desc.size))
        return Descriptor(desc.media_type, desc.digest, desc.size)

    def _link_blob(self, staged_name: str, digest: str) -> None:
        """Publish a staged file (relative to the staging dir) as blob *digest*."""
        try:
            os.link(staged_name, self.blob_path(digest), src_dir_fd=self._staging.fd,
                    follow_symlinks=False)
        except FileExistsError:
            pass
        os.unlink(staged_name, dir_fd=self._staging.fd)

    def _stage_blob(self, layout: OCILayout, desc: Descriptor) -> str:
        """Bring a layout's blob into staging: hardlink (ours), reflink or copy.

        Not verified here: the caller either ingests it (which verifies) or
        calls :func:`_verify_file`.  Returns its name in the staging dir.
        """
        src = layout.blob_path(desc.digest)
        name = f"blob-{os.urandom(8).hex()}"
        sfd = self._staging.fd
        try:
            lst = os.lstat(src)
            fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise NotFoundError(f"blob {desc.digest} ({desc.media_type}) is missing from "
                                f"{layout.path}",
                                hint="the layout is incomplete; re-pull the image") from None
        except OSError as e:
            raise ImageFormatError(f"{src}: cannot read the blob: {e.strerror}",
                                   hint="blobs must be regular files") from None
        try:
            if not stat.S_ISREG(lst.st_mode):
                raise ImageFormatError(f"{src} is not a regular file",
                                       hint="blobs must be regular files")
            if lst.st_size != desc.size:
                raise DigestMismatchError(
                    f"blob {desc.digest} is {lst.st_size} bytes, the manifest says {desc.size}",
                    hint="the layout is corrupt; re-pull the image")
            # a hardlink shares the inode: only safe if nobody else can rewrite it
            if self.options.link_blobs and lst.st_uid == os.geteuid():
                try:
                    os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=sfd)
                    return name
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES,
                                       errno.ENOENT):
                        raise
            import_file(fd, sfd, name, mode=BLOB_MODE)
        finally:
            os.close(fd)
        return name

    def _verify_file(self, name: str, desc: Descriptor) -> None:
        h = hashlib.sha256()
        n = 0
        with open(os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._staging.fd),
                  "rb", buffering=0) as f:
            while b := f.read(_IO):
                h.update(b)
                n += len(b)
        got = "sha256:" + h.hexdigest()
        if got != desc.digest or n != desc.size:
            raise DigestMismatchError(
                f"blob digest mismatch: expected {desc.digest} ({desc.size} bytes), got "
                f"{got} ({n} bytes)", hint="the layout is corrupt; re-pull the image")

    # -- layers ---------------------------------------------------------------------------
    def layer(self, diff_id: str) -> LayerInfo | None:
        rows = self.db.query("SELECT diff_id, blob, media_type, blob_size, tar_size, files, "
                             "state, created FROM layers WHERE diff_id = ?", (diff_id,))
        if not rows:
            return None
        r = rows[0]
        return LayerInfo(str(r[0]), str(r[1]), str(r[2]), int(cast(int, r[3])),
                         int(cast(int, r[4])), int(cast(int, r[5])), str(r[6]),
                         float(cast(float, r[7])))

    def layers(self) -> list[LayerInfo]:
        ids = [str(r[0]) for r in self.db.query("SELECT diff_id FROM layers ORDER BY diff_id")]
        return [x for x in (self.layer(d) for d in ids) if x is not None]

    def _layer_ready(self, diff_id: str) -> bool:
        rows = self.db.query("SELECT state FROM layers WHERE diff_id = ?", (diff_id,))
        return bool(rows) and rows[0][0] == "ready"

    def layer_objects(self, diff_id: str) -> list[str]:
        return [str(r[0]) for r in self.db.query(
            "SELECT object FROM layer_objects WHERE diff_id = ? ORDER BY object", (diff_id,))]

    def layer_object_sizes(self, diff_id: str) -> dict[str, int]:
        """The objects a stored layer references: hex digest -> size, in key order."""
        rows = self.db.query(
            f"SELECT o.digest, o.size {layer_objects_of()} ORDER BY l.object", (diff_id,))
        return {str(d)[7:]: int(str(n)) for d, n in rows}

    @contextlib.contextmanager
    def layer_lock(self, diff_id: str) -> Iterator[bool]:
        """The work lock of one layer (held while it is ingested); yields "waited"."""
        with work_lock(self._lock_path("layer", hex_of(diff_id))) as waited:
            yield waited

    @_host_errors
    def ingest_layer(self, desc: Descriptor, diff_id: str, *,
                     source: Callable[[], BinaryIO] | None = None,
                     progress: Progress | None = None) -> IngestResult:
        """Split a layer into objects + tar-split and publish it (state ``ready``).

        The blob is read from the store (``put``/``import`` it first) unless
        *source* opens it from elsewhere; its digest and diff_id are verified
        while streaming.  If another process is ingesting the same layer, this
        waits for it and then returns ``ingested=False``.
        """
        hex_of(diff_id)
        prog = progress or _NoProgress()
        with self.session():
            if self._layer_ready(diff_id):
                return IngestResult(diff_id, ingested=False)
            opener = source or self._blob_opener(self.blob_path(desc.digest), desc)
            with self.layer_lock(diff_id) as waited:
                if self._layer_ready(diff_id):
                    return IngestResult(diff_id, ingested=False, waited=waited)
                stats = self._ingest(desc, diff_id, opener, prog, staged_blob=None)
                return IngestResult(diff_id, ingested=True, waited=waited, stats=stats)

    def _blob_opener(self, path: str, desc: Descriptor) -> Callable[[], BinaryIO]:
        def open_blob() -> BinaryIO:
            try:
                return open(path, "rb", buffering=0)
            except FileNotFoundError:
                raise NotFoundError(f"layer blob {desc.digest} is not in the store",
                                    hint="import the image (lamina import)") from None
        return open_blob

    def _ingest(self, desc: Descriptor, diff_id: str, opener: Callable[[], BinaryIO],
                prog: Progress, staged_blob: str | None) -> LayerStats:
        """The hot path; the caller holds the session and the layer's work lock."""
        from lamina.layer.compression import LayerPipeline, LayerSource
        hexd = hex_of(diff_id)
        objw = self.objects
        stats = LayerStats()
        refs: dict[str, int] = {}

        def place(entry: TarEntry, data: DataReader) -> tuple[int, str]:
            size = entry.size
            if size <= SMALL:
                b = data(size)
                if len(b) < size:  # the reader hands out what it has buffered
                    parts = [b]
                    got = len(b)
                    while got < size:
                        c = data(size - got)
                        if not c:
                            break  # cannot happen: read_data raises on truncation
                        parts.append(c)
                        got += len(c)
                    b = b"".join(parts)
                h, created = objw.put_bytes(b)
            else:
                h, _n, created = objw.put_stream(data)
            refs[h] = size
            stats.files += 1
            if created:
                stats.new_objects += 1
                stats.new_bytes += size
            return 0, object_name(h)

        sfd = self._staging.fd
        split_name = f"{hexd}.tar-split.{os.urandom(4).hex()}"
        split_fd = os.open(split_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                           0o444, dir_fd=sfd)
        try:
            with open(split_fd, "wb", buffering=_IO) as f, stored_writer(f) as w:
                src = LayerSource(desc, diff_id, opener)
                with LayerPipeline([src], prog.advance) as pipe:
                    stream = pipe.stream(0)
                    try:
                        digest = from_tar(cast(BinaryIO, stream), w, place)
                        stream.finish()
                    except (CorruptLayerError, UnsafeLayerError, UnsupportedError) as e:
                        # a damaged blob is reported as what it is: digests first
                        try:
                            stream.finish()
                        except DigestMismatchError as d:
                            raise d from None
                        except LaminaError:
                            pass
                        e.message = f"layer {desc.digest[:19]}: {e.message}"
                        e.args = (e.message,)
                        raise
                stats.tar_size = w.tar_size
            if digest != diff_id:  # the pipeline checked the stream; this checks the split
                raise DigestMismatchError(
                    f"layer {desc.digest}: split stream digest {digest} != diff_id {diff_id}",
                    hint="this is a bug in lamina's tar splitting; please report it")
            os.rename(split_name, self.tar_split_path(diff_id), src_dir_fd=sfd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(split_name, dir_fd=sfd)
            raise
        if staged_blob is not None:
            self._link_blob(staged_blob, desc.digest)
        if self.options.fsync:
            syncfs(self._root_fd)  # everything the row names is durable before the row
        self._record_layer(diff_id, refs, desc, stats.tar_size, stats.files)
        return stats

    def _record_layer(self, diff_id: str, refs: dict[str, int], desc: Descriptor,
                      tar_size: int, files: int, *, source: str | None = None) -> None:
        """Commit a layer's rows: its objects (*refs*: hex -> size, or the same layer's
        rows in *source*, an :meth:`Database.attached` store index), blob and layer.
        The caller made everything they name durable first."""
        with self.db.tx(deferred=source is not None) as c:
            # first statement: a write to main, so a deferred transaction takes main's
            # write lock (and waits for it) and only reads *source*
            c.execute("DELETE FROM main.layer_objects WHERE diff_id = ?", (diff_id,))
            if source is not None:
                # in SQL: the 25k rows of a big layer never become Python objects
                c.execute(f"INSERT OR IGNORE INTO main.objects SELECT o.digest, o.size "
                          f"{layer_objects_of(source)}", (diff_id,))
                c.execute(f"INSERT INTO main.layer_objects SELECT diff_id, object "
                          f"FROM {source}.layer_objects WHERE diff_id = ?", (diff_id,))
            else:
                # in key order: each insert appends to the B-trees instead of splitting
                # random pages (3x faster for the 25k objects of a big layer)
                rows = sorted(refs.items())
                c.executemany("INSERT OR IGNORE INTO main.objects VALUES (?, ?)",
                              [(f"sha256:{h}", n) for h, n in rows])
                c.executemany("INSERT INTO main.layer_objects VALUES (?, ?)",
                              [(diff_id, f"sha256:{h}") for h, _n in rows])
            c.execute("INSERT OR IGNORE INTO main.blobs VALUES (?, ?, ?)",
                      (desc.digest, desc.media_type, desc.size))
            c.execute("INSERT OR REPLACE INTO main.layers VALUES (?, ?, ?, ?, ?, ?, 'ready', ?)",
                      (diff_id, desc.digest, desc.media_type, desc.size, tar_size,
                       files, time.time()))

    @_host_errors
    def export_layer(self, diff_id: str, out: IO[bytes]) -> str:
        """Write the exact layer tar (uncompressed) to *out*, rebuilt from the tar-split
        and the objects; raises if it does not hash to *diff_id*."""
        with self.session():
            if not self._layer_ready(diff_id):
                raise NotFoundError(f"layer {diff_id} is not in the store",
                                    hint="import an image that contains it")
            try:
                f = open_stored(self.tar_split_path(diff_id))
            except FileNotFoundError:
                raise CorruptLayerError(f"the tar-split of layer {diff_id} is missing",
                                        hint="run 'lamina fsck --repair' and import the "
                                             "image again") from None
            with f:
                digest = write_tar(read_chunks(f), [self.objects_fd], cast(BinaryIO, out))
        if digest != diff_id:
            raise DigestMismatchError(
                f"layer {diff_id} rebuilt from the store hashes to {digest}",
                hint="the store is damaged: run 'lamina fsck --repair' and import the "
                     "image again")
        return digest

    @_host_errors
    def receive_layer(self, stream: BinaryIO, dirfds: Sequence[int], *,
                      diff_id: str | None = None, blob: BlobInput | None = None,
                      compression: str = "gzip", trust_source: bool = False,
                      local_source: bool = False, source_index: SourceIndex | None = None,
                      ) -> tuple[Descriptor, str, ReceiveStats]:
        """Store a layer sent as a splitdirfdstream whose file chunks name files
        beneath *dirfds*; returns ``(blob descriptor, diff_id, stats)``.

        Referenced files are cloned (FICLONE, else copied) into objects, the tar
        is verified against *diff_id*, *blob* (an open compressed blob) is cloned
        and verified, or else the blob is regenerated with *compression*.  See
        :mod:`lamina.store.receive` for ``trust_source`` and ``local_source``.
        """
        from lamina.store.receive import receive
        with self.session():
            return receive(self, stream, dirfds, diff_id=diff_id, blob=blob,
                           compression=compression, trust_source=trust_source,
                           local_source=local_source, source_index=source_index)

    @_host_errors
    def put_image(self, name: str, manifest: bytes, config: bytes) -> str:
        """Record an image whose layers are already stored, from its manifest and
        config documents (kept byte for byte), and name it; returns the manifest digest."""
        ref = parse_ref(name)
        mdigest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        m = Manifest.from_json(mdigest, _json(manifest, mdigest))
        if "sha256:" + hashlib.sha256(config).hexdigest() != m.config.digest:
            raise DigestMismatchError(f"config does not match {m.config.digest} of manifest "
                                      f"{mdigest}")
        cfg = ImageConfig.from_json(m.config.digest, _json(config, m.config.digest))
        if len(cfg.diff_ids) != len(m.layers):
            raise ImageFormatError(f"manifest {mdigest}: layer count differs from its config")
        chains = chain_ids(cfg.diff_ids)
        mtype = str(m.raw.get("mediaType") or mt.MANIFEST)
        with self.session():
            for d, diff_id in zip(m.layers, cfg.diff_ids, strict=True):
                if not self._layer_ready(diff_id) or not self.has_blob(d.digest):
                    raise NotFoundError(f"layer {diff_id} ({d.digest}) is not in the store",
                                        hint="store the image's layers first")
            self.put_blob(config, m.config.media_type)
            self.put_blob(manifest, mtype)
            plat = "/".join(p for p in (cfg.os, cfg.architecture,
                                        cfg.raw.get("variant") or "") if p)
            now = time.time()
            with self.db.tx() as c:
                c.execute("INSERT OR REPLACE INTO manifests VALUES (?, ?, ?, ?, ?, ?)",
                          (mdigest, mtype, len(manifest), m.config.digest, plat, now))
                c.execute("DELETE FROM manifest_layers WHERE manifest = ?", (mdigest,))
                parent: str | None = None
                for i, d in enumerate(m.layers):
                    c.execute("INSERT INTO manifest_layers VALUES (?, ?, ?, ?, ?, ?, ?)",
                              (mdigest, i, d.digest, d.media_type, d.size, cfg.diff_ids[i],
                               chains[i]))
                    c.execute("INSERT OR IGNORE INTO chains VALUES (?, ?, ?, ?)",
                              (chains[i], parent, cfg.diff_ids[i], i))
                    parent = chains[i]
                c.execute("INSERT OR REPLACE INTO refs VALUES (?, ?, ?)", (ref, mdigest, now))
        return mdigest

    def hold(self) -> Callable[[], None]:
        """Take the store lock (shared) until the returned function is called: ``gc``
        waits meanwhile.  For holders whose lifetime is not a ``with`` block."""
        cm = self.session()
        cm.__enter__()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                cm.__exit__(None, None, None)
        return release

    # -- images ---------------------------------------------------------------------------
    @_host_errors
    def import_image(self, layout: OCILayout | str, tag: str, name: str | None = None, *,
                     platform: Platform | None = None,
                     progress: Progress | None = None) -> ImportResult:
        """Copy the image *tag* of an OCI layout into the store and name it *name*
        (``NAME[:TAG]``; default: the layout directory's name and *tag*)."""
        t0 = time.monotonic()
        lay = layout if isinstance(layout, OCILayout) else OCILayout.open(layout)
        ref = parse_ref(name if name is not None else
                        f"{os.path.basename(lay.path.rstrip('/')) or 'image'}:{tag}")
        prog = progress or _NoProgress()
        with self.session():
            manifest = lay.resolve(tag, platform)
            cfg = lay.config_for(manifest)
            mbytes = _read_layout_blob(lay, manifest.digest)
            cbytes = lay.read_blob(manifest.config)
            chains = chain_ids(cfg.diff_ids)
            res = ImportResult(ref, manifest.digest, manifest.config.digest)
            prog.start(sum(d.size for d in manifest.layers), len(manifest.layers))
            for i, desc in enumerate(manifest.layers):
                li = self._import_layer(lay, desc, cfg.diff_ids[i], prog)
                li.chain_id = chains[i]
                res.layers.append(li)
                prog.layer_done(i)
            mtype = str(manifest.raw.get("mediaType") or mt.MANIFEST)
            self.put_blob(cbytes, manifest.config.media_type)
            self.put_blob(mbytes, mtype)
            plat = "/".join(p for p in (cfg.os, cfg.architecture,
                                        cfg.raw.get("variant") or "") if p)
            now = time.time()
            with self.db.tx() as c:
                c.execute("INSERT OR REPLACE INTO manifests VALUES (?, ?, ?, ?, ?, ?)",
                          (manifest.digest, mtype, len(mbytes), manifest.config.digest,
                           plat, now))
                c.execute("DELETE FROM manifest_layers WHERE manifest = ?", (manifest.digest,))
                parent: str | None = None
                for i, desc in enumerate(manifest.layers):
                    c.execute("INSERT INTO manifest_layers VALUES (?, ?, ?, ?, ?, ?, ?)",
                              (manifest.digest, i, desc.digest, desc.media_type, desc.size,
                               cfg.diff_ids[i], chains[i]))
                    c.execute("INSERT OR IGNORE INTO chains VALUES (?, ?, ?, ?)",
                              (chains[i], parent, cfg.diff_ids[i], i))
                    parent = chains[i]
                c.execute("INSERT OR REPLACE INTO refs VALUES (?, ?, ?)",
                          (ref, manifest.digest, now))
        res.seconds = round(time.monotonic() - t0, 3)
        return res

    def _import_layer(self, lay: OCILayout, desc: Descriptor, diff_id: str,
                      prog: Progress) -> LayerImport:
        out = LayerImport(diff_id, ingested=False, digest=desc.digest)
        if self._layer_ready(diff_id) and self.has_blob(desc.digest):
            prog.advance(desc.size)
            return out
        with self.layer_lock(diff_id) as waited:
            out.waited = waited
            if self._layer_ready(diff_id):
                if not self.has_blob(desc.digest):  # same layer, other compression
                    self.import_blob(lay, desc)
                prog.advance(desc.size)
                return out
            staged: str | None = None
            if self.has_blob(desc.digest):
                path = self.blob_path(desc.digest)
            else:
                staged = self._stage_blob(lay, desc)
                path = os.path.join(self._staging.path, staged)
            try:
                out.stats = self._ingest(desc, diff_id, self._blob_opener(path, desc), prog,
                                         staged_blob=staged)
            except BaseException:
                if staged is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(staged, dir_fd=self._staging.fd)
                raise
            out.ingested = True
            return out

    def images(self) -> list[RefInfo]:
        rows = self.db.query(
            "SELECT r.name, r.manifest, COALESCE(m.config, ''), COALESCE(m.platform, ''), "
            "(SELECT COUNT(*) FROM manifest_layers l WHERE l.manifest = r.manifest), "
            "(SELECT COALESCE(SUM(size), 0) FROM manifest_layers l "
            " WHERE l.manifest = r.manifest), r.created "
            "FROM refs r LEFT JOIN manifests m ON m.digest = r.manifest ORDER BY r.name")
        return [RefInfo(str(r[0]), str(r[1]), str(r[2]), str(r[3]), int(cast(int, r[4])),
                        int(cast(int, r[5])), float(cast(float, r[6]))) for r in rows]

    def resolve_ref(self, name: str) -> str:
        ref = parse_ref(name)
        rows = self.db.query("SELECT manifest FROM refs WHERE name = ?", (ref,))
        if not rows:
            known = ", ".join(r.name for r in self.images()[:10]) or "none"
            raise NotFoundError(f"image {ref} is not in the store {self.path}",
                                hint=f"images: {known}")
        return str(rows[0][0])

    @_host_errors
    def image(self, name: str) -> StoredImage:
        """The manifest, config and layers (with ChainIDs) of a stored image."""
        with self.session():
            digest = self.resolve_ref(name)
            manifest = Manifest.from_json(digest, _json(self.read_blob(digest), digest))
            cfg = ImageConfig.from_json(manifest.config.digest, _json(
                self.read_blob(manifest.config.digest), manifest.config.digest))
        if len(cfg.diff_ids) != len(manifest.layers):
            raise ImageFormatError(f"manifest {digest}: layer count differs from its config")
        chains = chain_ids(cfg.diff_ids)
        layers = tuple(StoredLayer(d, cfg.diff_ids[i], chains[i])
                       for i, d in enumerate(manifest.layers))
        return StoredImage(parse_ref(name), manifest, cfg, layers)

    @_host_errors
    def set_ref(self, name: str, manifest: str) -> None:
        ref = parse_ref(name)
        with self.session():
            if not self.db.query("SELECT 1 FROM manifests WHERE digest = ?", (manifest,)):
                raise NotFoundError(f"manifest {manifest} is not in the store")
            with self.db.tx() as c:
                c.execute("INSERT OR REPLACE INTO refs VALUES (?, ?, ?)",
                          (ref, manifest, time.time()))

    @_host_errors
    def remove_ref(self, name: str) -> None:
        """Drop a ref; its content stays until ``gc``."""
        ref = parse_ref(name)
        with self.session(), self.db.tx() as c:
            if c.execute("DELETE FROM refs WHERE name = ?", (ref,)).rowcount == 0:
                raise NotFoundError(f"image {ref} is not in the store {self.path}")

    # -- extractions (for drivers) ------------------------------------------------------------
    @contextlib.contextmanager
    def extraction_lock(self, driver: str, chain_id: str) -> Iterator[bool]:
        """The work lock for building one extraction; yields "waited"."""
        key = f"{check_driver(driver)}-{hex_of(chain_id)}"
        with work_lock(self._lock_path("extract", key)) as waited:
            yield waited

    def extraction(self, driver: str, chain_id: str) -> Extraction | None:
        rows = self.db.query("SELECT driver, chain_id, path, state, in_use, created FROM "
                             "extractions WHERE driver = ? AND chain_id = ?",
                             (driver, chain_id))
        return _extraction(rows[0]) if rows else None

    def extractions(self, driver: str | None = None) -> list[Extraction]:
        sql = "SELECT driver, chain_id, path, state, in_use, created FROM extractions"
        rows = (self.db.query(sql + " WHERE driver = ? ORDER BY chain_id", (driver,))
                if driver else self.db.query(sql + " ORDER BY driver, chain_id"))
        return [_extraction(r) for r in rows]

    @contextlib.contextmanager
    def stage_extraction(self, driver: str, chain_id: str) -> Iterator[str]:
        """A fresh directory to build an extraction in; on success it is renamed to
        :meth:`extraction_dir` and recorded ``ready``, on failure removed.  Hold
        :meth:`extraction_lock` (and a :meth:`session`) around it."""
        final = self.extraction_dir(driver, chain_id)
        with self.session():
            self._require_chain(chain_id)
            stage = os.path.join(self._staging.path, f"extract-{os.urandom(6).hex()}")
            os.mkdir(stage, 0o700)
            try:
                yield stage
                os.makedirs(os.path.dirname(final), 0o700, exist_ok=True)
                if os.path.lexists(final):
                    raise BundleError(f"extraction {final} already exists",
                                      hint="remove_extraction() it first")
                os.rename(stage, final)
            except BaseException:
                rmtree_all(stage)
                raise
            if self.options.fsync:
                syncfs(self._root_fd)
            self.record_extraction(driver, chain_id, final)

    @_host_errors
    def checkpoint(self) -> None:
        """Move the index's write-ahead log into the database now.  For a caller about
        to write many inodes on the store's filesystem (a bundle): the checkpoint
        SQLite runs when the store is closed syncs, and after those writes that sync
        would flush them too (ext4's and xfs's journals commit in order)."""
        self.db.query("PRAGMA wal_checkpoint(PASSIVE)")

    @_host_errors
    def record_extraction(self, driver: str, chain_id: str, path: str | None = None,
                          state: str = "ready", in_use: bool | None = None) -> None:
        """Record (or update) what a driver made for *chain_id*; *path* defaults to
        :meth:`extraction_dir`."""
        p = os.path.abspath(path or self.extraction_dir(driver, chain_id))
        with self.session():
            self._require_chain(chain_id)
            with self.db.tx() as c:
                old = c.execute("SELECT in_use FROM extractions WHERE driver = ? AND "
                                "chain_id = ?", (driver, chain_id)).fetchone()
                use = bool(old[0]) if (in_use is None and old) else bool(in_use)
                c.execute("INSERT OR REPLACE INTO extractions VALUES (?, ?, ?, ?, ?, ?)",
                          (check_driver(driver), chain_id, p, state, int(use), time.time()))

    @_host_errors
    def set_in_use(self, driver: str, chain_id: str, in_use: bool) -> None:
        """Mark an extraction as a GC root (e.g. while mounted) or release it."""
        with self.session(), self.db.tx() as c:
            if c.execute("UPDATE extractions SET in_use = ? WHERE driver = ? AND chain_id = ?",
                         (int(in_use), driver, chain_id)).rowcount == 0:
                raise NotFoundError(f"no {driver} extraction for {chain_id}")

    @_host_errors
    def remove_extraction(self, driver: str, chain_id: str,
                          remove: Callable[[str], None] | None = None) -> None:
        """Forget an extraction and delete its directory (with *remove* if given)."""
        with self.session():
            ex = self.extraction(driver, chain_id)
            if ex is None:
                raise NotFoundError(f"no {driver} extraction for {chain_id}")
            with self.db.tx() as c:
                c.execute("DELETE FROM extractions WHERE driver = ? AND chain_id = ?",
                          (driver, chain_id))
            (remove or rmtree_all)(ex.path)

    def _require_chain(self, chain_id: str) -> None:
        hex_of(chain_id)
        if not self.db.query("SELECT 1 FROM chains WHERE chain_id = ?", (chain_id,)):
            raise NotFoundError(f"chain {chain_id} is not in the store",
                                hint="import an image with these layers first")

    def chain(self, chain_id: str) -> list[str]:
        """The diff_ids of a chain, bottom layer first."""
        out: list[str] = []
        cur: str | None = chain_id
        while cur is not None:
            rows = self.db.query("SELECT parent, diff_id FROM chains WHERE chain_id = ?", (cur,))
            if not rows:
                raise NotFoundError(f"chain {cur} is not in the store")
            out.append(str(rows[0][1]))
            cur = None if rows[0][0] is None else str(rows[0][0])
        out.reverse()
        return out

    # -- maintenance ------------------------------------------------------------------------
    @_host_errors
    def gc(self, *, dry_run: bool = False,
           removers: dict[str, Callable[[str], None]] | None = None,
           wait: bool | None = None) -> StoreGCResult:
        """Remove everything no ref (or in-use extraction) reaches; see lamina.store.gc.
        *wait* overrides ``options.wait`` for the exclusive lock."""
        from lamina.store.gc import collect
        return collect(self, dry_run=dry_run, removers=removers or {},
                       wait=self.options.wait if wait is None else wait)

    @_host_errors
    def fsck(self, *, quick: bool = False, repair: bool = False) -> FsckResult:
        """Check the store; see lamina.store.fsck."""
        from lamina.store.fsck import check
        return check(self, quick=quick, repair=repair)


def _check_store_dir(p: str, create: bool) -> None:
    if not os.path.isdir(p):
        if os.path.lexists(p):
            raise UsageError(f"{p} exists and is not a directory",
                             hint="pass --store with a directory for the store")
        if not create:
            raise NotFoundError(f"there is no lamina store at {p}",
                                hint="import an image first (lamina import) or pass --store")
        os.makedirs(p, 0o700, exist_ok=True)    # another process may be creating it too
        os.chmod(p, 0o700)
        return
    if not os.path.exists(os.path.join(p, "lamina.db")):
        if set(os.listdir(p)) - {"lock"}:
            raise UsageError(f"{p} is not a lamina store (it has no lamina.db and is not "
                             "empty)", hint="pass --store with a new or empty directory")
        if not create:
            raise NotFoundError(f"there is no lamina store at {p}",
                                hint="import an image first (lamina import) or pass --store")
        os.chmod(p, 0o700)


def _read_layout_blob(lay: OCILayout, digest: str) -> bytes:
    try:
        size = os.stat(lay.blob_path(digest)).st_size
    except FileNotFoundError:
        raise NotFoundError(f"blob {digest} is missing from {lay.path}",
                            hint="the layout is incomplete; re-pull the image") from None
    return lay.read_blob(Descriptor(mt.MANIFEST, digest, size))


def _json(data: bytes, digest: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as e:
        raise ImageFormatError(f"blob {digest}: invalid JSON: {e}") from None


def _extraction(r: tuple[object, ...]) -> Extraction:
    return Extraction(str(r[0]), str(r[1]), str(r[2]), str(r[3]), bool(r[4]),
                      float(cast(float, r[5])))
