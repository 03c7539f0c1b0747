"""Cross-process locking and per-process staging for the store.

Three kinds of ``flock(2)`` locks, always taken in this order:

1. ``lock`` (the store lock): *shared* by every process that reads or adds
   content, *exclusive* for ``gc`` and ``fsck --repair``, which delete.  So a
   collector never removes what a running import has written but not yet
   referenced, and an import never reads what a collector is deleting.
2. ``locks/<what>.lock`` (work locks): *exclusive* while one process does a
   piece of work another might want to do too (ingesting a layer, building an
   extraction).  The second process waits, then finds the work done and skips
   it.  Lock files are never unlinked while the store lock is shared (that
   would let two processes lock two different inodes of "the same" file);
   ``gc`` removes them under the exclusive lock.
3. ``tmp/<pid>-<random>/`` (staging dirs): each process stages its files in
   its own directory and holds an exclusive lock on the directory's fd for as
   long as it lives.  A directory whose lock can be taken belongs to a dead
   process (killed, crashed) and is reclaimed by the next open or ``gc``;
   no pid guessing, so pid reuse and pid namespaces cannot fool it.

flock locks belong to an open file description, and the kernel drops them
when the process dies, however it dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator

from lamina.errors import UsageError

STALE_INIT_AGE = 3600.0     # a half-created staging dir older than this is abandoned


def _open_lock(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


class StoreLock:
    """The store-wide lock, shared re-entrantly by the threads of one process.

    flock locks of one process still conflict with each other when taken on
    different file descriptions, so the process keeps one fd and counts.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = _open_lock(path)
        self._mu = threading.Lock()
        self._shared = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self, on_acquire: Callable[[], None] | None = None,
               wait: bool = True) -> Iterator[None]:
        with self._mu:
            if self._exclusive:
                pass  # exclusive already covers us (fsck --repair reads while holding it)
            elif self._shared == 0:
                _flock(self.fd, fcntl.LOCK_SH, wait, self.path)
                if on_acquire is not None:
                    on_acquire()
            self._shared += 1
        try:
            yield
        finally:
            with self._mu:
                self._shared -= 1
                if self._shared == 0 and not self._exclusive:
                    fcntl.flock(self.fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def exclusive(self, wait: bool = True) -> Iterator[None]:
        with self._mu:
            if self._shared or self._exclusive:
                raise UsageError("the store is already locked by this process",
                                 hint="run gc/repair outside a store session")
            _flock(self.fd, fcntl.LOCK_EX, wait, self.path)
            self._exclusive = True
        try:
            yield
        finally:
            with self._mu:
                self._exclusive = False
                fcntl.flock(self.fd, fcntl.LOCK_SH if self._shared else fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self.fd)


def _flock(fd: int, op: int, wait: bool, path: str) -> None:
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        if not wait:
            raise UsageError(f"the store is busy ({path} is locked by another process)",
                             hint="wait for the other lamina command to finish") from None
    fcntl.flock(fd, op)


@contextlib.contextmanager
def work_lock(path: str) -> Iterator[bool]:
    """Hold the exclusive work lock *path*; yields True when another process held it
    first (so the caller should re-check whether the work is still to do)."""
    fd = _open_lock(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited = False
        except BlockingIOError:
            fcntl.flock(fd, fcntl.LOCK_EX)
            waited = True
        yield waited
    finally:
        os.close(fd)


class Staging:
    """This process's staging directory under ``tmp/``, created on first use."""

    def __init__(self, tmp_root: str) -> None:
        self.root = tmp_root
        self._mu = threading.Lock()
        self._path: str | None = None
        self._fd = -1

    @property
    def path(self) -> str:
        with self._mu:
            if self._path is None:
                # created under a name reclaim() leaves alone, locked, then renamed:
                # nobody can see it unlocked under its final name
                rand = os.urandom(6).hex()
                init = os.path.join(self.root, f".init-{os.getpid()}-{rand}")
                os.mkdir(init, 0o700)
                fd = os.open(init, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                fcntl.flock(fd, fcntl.LOCK_EX)
                final = os.path.join(self.root, f"{os.getpid()}-{rand}")
                os.rename(init, final)
                self._path, self._fd = final, fd
            return self._path

    @property
    def fd(self) -> int:
        _ = self.path
        return self._fd

    def close(self) -> None:
        with self._mu:
            if self._path is not None:
                rmtree_all(self._path)
                os.close(self._fd)
                self._path, self._fd = None, -1


def reclaim(tmp_root: str, *, dry_run: bool = False,
            now: float | None = None) -> list[tuple[str, int]]:
    """Remove staging left by dead processes; returns ``(name, bytes)`` removed."""
    out: list[tuple[str, int]] = []
    t = time.time() if now is None else now
    try:
        names = os.listdir(tmp_root)
    except FileNotFoundError:
        return out
    for name in sorted(names):
        p = os.path.join(tmp_root, name)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        if name.startswith(".init-"):
            if t - st.st_mtime < STALE_INIT_AGE:
                continue  # someone is creating it right now
        elif stat.S_ISDIR(st.st_mode):
            try:
                fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its process is alive
                size = tree_size(p)
                if not dry_run:
                    rmtree_all(p)
            finally:
                os.close(fd)
            out.append((name, size))
            continue
        size = tree_size(p)
        if not dry_run:
            rmtree_all(p)
        out.append((name, size))
    return out


def tree_size(path: str) -> int:
    total = 0
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def rmtree_all(path: str) -> None:
    """Remove a file or a tree, also one whose directories lost their write bits."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    for root, dirs, _files in os.walk(path):
        for d in dirs:
            p = os.path.join(root, d)
            if not os.path.islink(p):
                with contextlib.suppress(OSError):
                    os.chmod(p, 0o700)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    shutil.rmtree(path, ignore_errors=True)
