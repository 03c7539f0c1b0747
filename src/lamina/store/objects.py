"""Content-addressed file objects: ``objects/<2 hex>/<62 hex>``, named by sha256.

An object is the content of one regular file from some layer, nothing else
(no mode, owner or name: those live in the layer's tar-split headers), so the
same bytes in any layer of any image are stored once.

Writing one: the content is hashed while it is written to a temporary file
in this process's staging directory, which is then ``link``\\ed to its digest
name and unlinked.  ``link`` fails with EEXIST when another process got there
first, which makes "publish if absent" atomic and never replaces an inode a
driver may have hardlinked (``rename`` would).  A killed writer leaves only
its staging directory, reclaimed by the next open.  (``O_TMPFILE`` + ``linkat``
would leave nothing at all, but measured 3x slower per file on ext4.)  Small
files (the vast majority) are hashed *before* writing, so a duplicate costs
one ``stat`` and no write.

Objects are mode 0444: read-only for everyone, so a driver that hardlinks one
cannot modify every user of it by accident; readable so drivers can hand them
to unprivileged readers.  Confidentiality comes from the store root, which is
0700: image content such as ``/etc/shadow`` must not reach other local users
through the store.

No per-object fsync: the store calls ``syncfs(2)`` once before a layer's row
is committed (see :func:`syncfs`), which is what makes that row safe to trust.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
from collections.abc import Callable

OBJECT_MODE = 0o444
SMALL = 8 << 20             # files up to this size are read whole and hashed before writing
_IO = 1 << 20

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - no dynamic libc
    _libc = None


def syncfs(fd: int) -> None:
    """Flush every dirty page of the filesystem holding *fd* (``sync`` as a fallback)."""
    if _libc is not None and int(_libc.syncfs(ctypes.c_int(fd))) == 0:
        return
    os.sync()


def _current_umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def object_name(hexd: str) -> str:
    """``ab/cdef...``: the object's path below ``objects/`` (and its splitdirfdstream name)."""
    return f"{hexd[:2]}/{hexd[2:]}"


class ObjectWriter:
    """Publishes objects below *objects_dir*; temporary files go to *staging*.

    ``known`` caches digests seen present; it is only valid while the caller
    holds the store lock (``gc`` cannot run then), and the store clears it
    whenever it takes the lock afresh.
    """

    def __init__(self, objects_dir: str, staging_fd: Callable[[], int]) -> None:
        self.dir = objects_dir
        self.dir_fd = os.open(objects_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._staging_fd = staging_fd
        self.known: set[str] = set()
        self._fchmod = (OBJECT_MODE & ~_current_umask()) != OBJECT_MODE
        self._mu = threading.Lock()
        self._seq = 0

    def close(self) -> None:
        os.close(self.dir_fd)

    def exists(self, hexd: str) -> bool:
        if hexd in self.known:
            return True
        try:
            os.stat(object_name(hexd), dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        self.known.add(hexd)
        return True

    # -- writing --------------------------------------------------------------------
    def put_bytes(self, data: bytes) -> tuple[str, bool]:
        """Store *data*; returns ``(hex digest, True if this call created the object)``."""
        hexd = hashlib.sha256(data).hexdigest()
        if self.exists(hexd):
            return hexd, False
        fd, tmp = self._new_file()
        try:
            _write_all(fd, data)
        except BaseException:
            self._discard(fd, tmp)
            raise
        return hexd, self._publish(fd, tmp, hexd)

    def put_stream(self, read: Callable[[int], bytes]) -> tuple[str, int, bool]:
        """Store what *read* returns until b""; returns ``(hex, size, created)``."""
        h = hashlib.sha256()
        size = 0
        fd, tmp = self._new_file()
        try:
            while b := read(_IO):
                h.update(b)
                _write_all(fd, b)
                size += len(b)
        except BaseException:
            self._discard(fd, tmp)
            raise
        hexd = h.hexdigest()
        if hexd in self.known:
            self._discard(fd, tmp)
            return hexd, size, False
        return hexd, size, self._publish(fd, tmp, hexd)

    def _new_file(self) -> tuple[int, str]:
        with self._mu:
            self._seq += 1
            name = f"obj-{self._seq}"
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     OBJECT_MODE, dir_fd=self._staging_fd())
        if self._fchmod:
            os.fchmod(fd, OBJECT_MODE)
        return fd, name

    def _publish(self, fd: int, tmp: str, hexd: str) -> bool:
        try:
            os.link(tmp, object_name(hexd), src_dir_fd=self._staging_fd(),
                    dst_dir_fd=self.dir_fd, follow_symlinks=False)
            created = True
        except FileExistsError:
            created = False
        finally:
            self._discard(fd, tmp)
        self.known.add(hexd)
        return created

    def _discard(self, fd: int, tmp: str) -> None:
        os.close(fd)
        try:
            os.unlink(tmp, dir_fd=self._staging_fd())
        except FileNotFoundError:
            pass


def _write_all(fd: int, data: bytes) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]
