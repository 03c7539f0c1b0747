"""Where pulled blobs go: the :class:`BlobSink` seam, and its OCI-layout adapter.

A pull asks the sink whether it already has a blob (``has_blob``: the
try-skip), streams missing blobs into a :class:`PartialBlob` and commits it
only after the pull has verified size and digest.  A partial blob survives an
interrupted pull, so the next pull resumes it with an HTTP range request;
until it is committed it is invisible to readers of the sink.  The store
implements the same protocol to pull straight into it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Protocol

from lamina.errors import UsageError
from lamina.oci.layout import OCILayout
from lamina.oci.model import Descriptor

if TYPE_CHECKING:
    from lamina.store.store import ImportResult, Store

PARTIAL_PREFIX = ".tmp-partial-"  # .tmp-*: 'lamina gc' reclaims them once stale


class PartialBlob(Protocol):
    """A blob being downloaded; *offset* bytes of it are already stored."""

    offset: int

    def read_back(self) -> Iterator[bytes]:
        """The stored bytes, so that a resumed download can hash them again."""
        ...

    def truncate(self) -> None:
        """Forget the stored bytes (the server ignored the range, or they are bad)."""
        ...

    def write(self, data: bytes) -> None: ...

    def commit(self) -> None:
        """Make the (verified) blob visible under its digest, atomically."""
        ...

    def close(self) -> None:
        """Stop writing; keep what was stored for a later resume (no-op after commit)."""
        ...


class BlobSink(Protocol):
    """What a pull writes into (an OCI layout today, the store later)."""

    def has_blob(self, digest: str) -> bool: ...

    def open_partial(self, digest: str) -> PartialBlob: ...

    def put_blob(self, digest: str, data: bytes) -> None:
        """Store a small blob whose digest the caller has verified (a manifest)."""
        ...

    def set_tag(self, tag: str, desc: Descriptor) -> None: ...


class LayoutSink:
    """:class:`BlobSink` over an :class:`OCILayout` (created if missing).

    Partial downloads live in ``blobs/sha256/.tmp-partial-HEX``, locked with
    ``flock`` while written: a second pull of the same blob at the same time
    downloads into a private temporary file instead of sharing it.
    """

    def __init__(self, layout: OCILayout) -> None:
        self.layout = layout
        self._creating: threading.Thread | None = None
        self._create_error: BaseException | None = None

    @classmethod
    def init(cls, path: str) -> LayoutSink:
        """Open the layout at *path*, or create it.

        A new layout's ``index.json`` is written (schema-validated, which first
        imports jsonschema: a few tenths of a second) on a thread while the pull
        downloads; ``set_tag`` waits for it.  The thread is not a daemon, so the
        layout exists even when the pull fails.
        """
        if os.path.exists(os.path.join(path, "oci-layout")):
            return cls(OCILayout.open(path))
        sink = cls(OCILayout(path))
        try:
            os.makedirs(sink.layout.blob_dir, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create the layout {path}: {e.strerror}",
                             hint="choose a directory path that can be created") from None
        sink._creating = threading.Thread(target=sink._create, name="lamina-layout-init")
        sink._creating.start()
        return sink

    def _create(self) -> None:
        try:
            OCILayout.init(self.layout.path)
        except BaseException as e:  # re-raised by set_tag
            self._create_error = e

    def wait_created(self) -> None:
        if self._creating is not None:
            self._creating.join()
            self._creating = None
            if self._create_error is not None:
                raise self._create_error

    def has_blob(self, digest: str) -> bool:
        return self.layout.has_blob(digest)

    def open_partial(self, digest: str) -> _LayoutPartial:
        return _LayoutPartial(self.layout, digest)

    def put_blob(self, digest: str, data: bytes) -> None:
        # the layout hashes the bytes again and names the blob by that digest
        self.layout.put_blob(data, "application/octet-stream")

    def set_tag(self, tag: str, desc: Descriptor) -> None:
        self.wait_created()
        self.layout.set_ref(tag, desc)

    def partials(self) -> list[str]:
        """Names of the partial downloads present (for tests and ``--json``)."""
        try:
            return sorted(n for n in os.listdir(self.layout.blob_dir)
                          if n.startswith(PARTIAL_PREFIX))
        except FileNotFoundError:
            return []


class _LayoutPartial:
    def __init__(self, layout: OCILayout, digest: str) -> None:
        os.makedirs(layout.blob_dir, exist_ok=True)
        self._dest = layout.blob_path(digest)
        self._path = os.path.join(layout.blob_dir, PARTIAL_PREFIX + digest.split(":", 1)[1])
        self._done = False
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # another pull is downloading this blob: use a private file, no resume
            os.close(fd)
            fd, self._path = tempfile.mkstemp(prefix=".tmp-", dir=layout.blob_dir)
        self.file: IO[bytes] = os.fdopen(fd, "r+b")
        self.offset = self.file.seek(0, os.SEEK_END)

    def read_back(self) -> Iterator[bytes]:
        self.file.seek(0)
        left = self.offset
        while left > 0:
            chunk = self.file.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk
        self.file.seek(self.offset)

    def truncate(self) -> None:
        self.file.seek(0)
        self.file.truncate()
        self.offset = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.offset += len(data)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        os.chmod(self._path, 0o644)
        os.rename(self._path, self._dest)
        self._done = True
        self.file.close()

    def close(self) -> None:
        if not self._done:
            with contextlib.suppress(OSError):
                self.file.flush()
            self.file.close()
            if os.path.basename(self._path).startswith(PARTIAL_PREFIX):
                if self.offset == 0:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._path)
            else:  # a private file cannot be resumed
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path)
            self._done = True


class StoreSink(LayoutSink):
    """Pull into the local store.

    The manifest, config and the blobs the store lacks are downloaded into a
    staging layout ``STORE/pulls/<key>/`` (kept between attempts, so an
    interrupted pull resumes); a layer blob the store has already ingested is
    not downloaded at all (the try-skip).  :meth:`finish` then imports the image
    from the staging layout into the store, which verifies and ingests the new
    layers, and removes the staging layout.
    """

    def __init__(self, store: Store, layout: OCILayout) -> None:
        super().__init__(layout)
        self.store = store
        self._ingested = {li.blob for li in store.layers() if li.state == "ready"}

    @classmethod
    def for_pull(cls, store: Store, key: str) -> StoreSink:
        path = os.path.join(store.path, "pulls", hashlib.sha256(key.encode()).hexdigest()[:32])
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        if os.path.exists(os.path.join(path, "oci-layout")):
            return cls(store, OCILayout.open(path))
        return cls(store, OCILayout.init(path))

    def has_blob(self, digest: str) -> bool:
        return self.layout.has_blob(digest) or (
            digest in self._ingested and self.store.has_blob(digest))

    def finish(self, tag: str, name: str) -> ImportResult:
        res = self.store.import_image(self.layout, tag, name)
        shutil.rmtree(self.layout.path, ignore_errors=True)
        return res
