"""Apply layer tar streams to a root filesystem with exact OCI semantics.

Every path is resolved beneath an open directory fd of the rootfs, one
component at a time, never trusting what is on disk: symlinks met in parent
components are followed *inside* the rootfs (absolute targets restart at the
rootfs, ``..`` stops at it), like containerd's and umoci's securejoin, and the
last component of an entry is never followed.  Entry names containing ``..``
are refused outright.  Hardlink targets are resolved the same way and must be
non-directories that exist inside the rootfs.

Whiteouts only hide *lower* layers, whatever their position in the layer: the
writer records which paths the current layer produced and keeps them when a
``.wh.NAME`` or ``.wh..wh..opq`` marker is applied, before or after them.

Directory modes and mtimes are applied once, after the last layer, so that
later writes inside a directory neither disturb its mtime nor are refused by a
read-only mode (which matters for ``--rootless``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
from bisect import bisect_left
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lamina.errors import CorruptLayerError, EnvironmentError_, UnsafeLayerError
from lamina.layer import whiteout as wh
from lamina.layer.idmap import ROOTLESS_XATTR, IdMapping, encode_rootless, map_id
from lamina.layer.tarstream import FastFn, TarEntry, TarReader

try:  # compiled fast path for plain files (setup.py builds it when a compiler is there)
    from lamina import _fastpath
except ImportError:  # pragma: no cover - depends on the build
    _fastpath = None  # type: ignore[assignment]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_SYMLINKS = 40
_FD_CACHE = 128

Warn = Callable[[str], None]


@dataclass(frozen=True)
class ExtractOptions:
    rootless: bool = False
    uid_map: tuple[IdMapping, ...] = ()
    gid_map: tuple[IdMapping, ...] = ()
    keep_dirlinks: bool = False


@dataclass
class LayerStats:
    entries: int = 0
    files: int = 0
    bytes: int = 0
    whiteouts: int = 0
    skipped: int = 0
    fast: int = 0   # entries made by the compiled fast path (also counted above)


def fastpath_enabled() -> bool:
    """Whether the compiled fast path is built and not disabled by LAMINA_NO_FASTPATH=1."""
    return _fastpath is not None and os.environ.get("LAMINA_NO_FASTPATH", "") in ("", "0")


@dataclass
class _Pending:
    """A hardlink whose target appears later in the same layer."""

    entry: TarEntry
    parent: tuple[str, ...]
    name: str


def _listdir_fresh(dfd: int) -> list[str]:
    """The names in the directory *dfd*, read through a new open of it: a cached fd
    opened before entries were added may not list them (btrfs readdir stops at the
    last index the directory had when that fd was opened)."""
    fd = os.open(".", _DIR_FLAGS, dir_fd=dfd)
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def clean_name(name: str, what: str = "entry") -> tuple[str, ...]:
    """Split an archive path into components; refuse ``..`` and empty names."""
    parts = tuple(name.split("/"))
    if "" in parts or "." in parts:
        parts = tuple(p for p in parts if p and p != ".")
    if ".." in parts:
        raise UnsafeLayerError(f"{what} {name!r} contains a '..' component",
                               hint="the layer tries to escape the root filesystem")
    return parts


def _join(parts: tuple[str, ...]) -> str:
    return "/".join(parts)


def resolve_scoped(root_fd: int, comps: tuple[str, ...], *, entry: str = "",
                   create: Callable[[str], None] | None = None,
                   want_dir: bool = True) -> tuple[str, ...] | None:
    """Resolve *comps* beneath *root_fd*, following symlinks but never leaving the root.

    Returns the symlink-free components of the result, or None when a component
    is missing (unless *create* makes it).  Every component but the last must
    be a directory; the last must be one too unless *want_dir* is false.
    """
    real: list[str] = []
    todo = list(comps)
    todo.reverse()          # a stack: the next component is at the end
    links = 0
    while todo:
        c = todo.pop()
        if c == "..":
            if real:
                real.pop()
            continue
        path = _join((*real, c))
        try:
            st = os.stat(path, dir_fd=root_fd, follow_symlinks=False)
        except FileNotFoundError:
            if create is None:
                return None
            create(path)
            real.append(c)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_SYMLINKS:
                raise UnsafeLayerError(f"entry {entry!r}: too many levels of symbolic links",
                                       hint="the layer contains a symlink loop")
            target = os.readlink(path, dir_fd=root_fd)
            if target.startswith("/"):
                real = []
            todo.extend(reversed([p for p in target.split("/") if p and p != "."]))
            continue
        if not stat.S_ISDIR(st.st_mode) and (todo or want_dir):
            raise CorruptLayerError(
                f"entry {entry!r}: path component {path!r} is not a directory",
                hint="the layer writes beneath a non-directory without replacing it")
        real.append(c)
    return tuple(real)


class RootfsWriter:
    """Applies layers, in order, to the directory *root* (which must exist)."""

    def __init__(self, root: str, opts: ExtractOptions, warn: Warn | None = None) -> None:
        self.root = root
        self.opts = opts
        self._warn = warn or (lambda _m: None)
        self.root_fd = os.open(root, _DIR_FLAGS)
        # open directories by archive path ('a/b') -> (fd, real path); shared with the
        # fast path, which adds the directories it creates; emptied on removals.  The
        # root ("") is first, so eviction (oldest first) skips it by position.
        self._dirs: dict[str, tuple[int, str]] = {"": (self.root_fd, "")}
        self._stale: list[int] = []   # dropped fds that a caller may still be using
        self.dir_meta: dict[str, tuple[int, int]] = {}   # real path -> (mode, mtime_ns)
        # dir_meta's keys sorted, for removals: rebuilt when its size changed (the only
        # deletions are _remove's, which keeps it in step; everything else adds keys)
        self._meta_keys: list[str] = []
        self._meta_len = 0
        self.hashes: dict[str, bytes] = {}                # real path -> sha256 of content
        self._layer = wh.LayerPaths()
        self._warned: set[str] = set()
        self._euid, self._egid = os.geteuid(), os.getegid()
        self._umask = os.umask(0o022)
        os.umask(self._umask)
        if not opts.rootless and self._euid != 0:
            raise EnvironmentError_("unpacking with real ownership needs root",
                                    hint="run as root, or pass --rootless")

    def close(self) -> None:
        self._drop_cache()
        self._close_stale()
        os.close(self.root_fd)

    # -- warnings -------------------------------------------------------------
    def warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self._warn(msg)

    # -- path resolution ------------------------------------------------------
    def _drop_cache(self) -> None:
        # closing now could pull an fd from under a caller; close between entries
        self._stale.extend(fd for k, (fd, _) in self._dirs.items() if k)
        self._dirs.clear()
        self._dirs[""] = (self.root_fd, "")

    def _close_stale(self) -> None:
        for fd in self._stale:
            os.close(fd)
        self._stale.clear()

    def _dir_fd(self, comps: tuple[str, ...], create: bool,
                entry: str) -> tuple[int, str] | None:
        """(fd, real path) of the directory *comps* inside the rootfs, None if missing."""
        key = _join(comps)
        hit = self._dirs.get(key)
        if hit is not None:
            return hit
        rcomps = self._resolve(comps, create, entry)
        if rcomps is None:
            return None
        real = _join(rcomps)
        fd = os.open(real, _DIR_FLAGS, dir_fd=self.root_fd) if real else os.dup(self.root_fd)
        if len(self._dirs) > _FD_CACHE:
            it = iter(self._dirs)
            next(it)                     # the root stays
            self._stale.append(self._dirs.pop(next(it))[0])
        self._dirs[key] = (fd, real)
        return fd, real

    def _resolve(self, comps: tuple[str, ...], create: bool,
                 entry: str) -> tuple[str, ...] | None:
        return resolve_scoped(self.root_fd, comps, entry=entry,
                              create=self._implicit_dir if create else None)

    def _implicit_dir(self, path: str) -> None:
        # implicit parent: created like umoci/containerd do, 0755 and root-owned
        os.mkdir(path, 0o700, dir_fd=self.root_fd)
        self._chown(path, 0, 0, None, fresh=True)
        self.dir_meta[path] = (0o755, -1)

    # -- ownership and metadata ---------------------------------------------
    def _owner(self, uid: int, gid: int) -> tuple[int, int]:
        return (map_id(uid, self.opts.uid_map, "uid"), map_id(gid, self.opts.gid_map, "gid"))

    def _chown(self, path: str, uid: int, gid: int, fd: int | None,
               fresh: bool = False) -> bool:
        """Set ownership (or record it in the rootless xattr); *path* is rootfs-relative.

        *fresh* inodes were just created by us and so are owned by our euid/egid
        (no directory is setgid during extraction: directory modes come last);
        for them the syscall is skipped when it would change nothing.
        """
        if self.opts.rootless:
            if uid or gid:
                self._setxattr(path, fd, ROOTLESS_XATTR, encode_rootless(uid, gid))
            return False
        if self.opts.uid_map or self.opts.gid_map:
            huid, hgid = self._owner(uid, gid)
        else:
            huid, hgid = uid, gid
        if fresh and huid == self._euid and hgid == self._egid:
            return False
        if fd is not None:
            os.fchown(fd, huid, hgid)
        else:
            os.chown(path, huid, hgid, dir_fd=self.root_fd, follow_symlinks=False)
        return True

    def _setxattr(self, path: str, fd: int | None, name: str, value: bytes) -> None:
        try:
            if fd is not None:
                os.setxattr(fd, name, value)
            else:
                os.setxattr(self._proc_path(path), name, value, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.EPERM, errno.ENOTSUP, errno.EACCES, errno.EINVAL):
                self.warn_once(f"xattr:{name.split('.')[0]}:{e.errno}",
                               f"cannot set xattr {name} on /{path}: {e.strerror} "
                               "(further such xattrs are skipped silently)")
                return
            raise

    def _proc_path(self, path: str) -> str:
        # path-based xattr calls on symlinks/devices: go through the rootfs fd so that
        # nothing outside it can be named; the path itself has no symlinks (resolved)
        return f"/proc/self/fd/{self.root_fd}/{path}" if path else f"/proc/self/fd/{self.root_fd}"

    def _set_xattrs(self, path: str, fd: int | None, xattrs: dict[str, bytes],
                    clear: bool) -> None:
        if clear:
            try:
                if fd is not None:
                    names = os.listxattr(fd)
                else:
                    names = os.listxattr(self._proc_path(path), follow_symlinks=False)
            except OSError:
                names = []
            for n in names:
                if n not in xattrs and not n.startswith("security.selinux"):
                    try:
                        if fd is not None:
                            os.removexattr(fd, n)
                        else:
                            os.removexattr(self._proc_path(path), n, follow_symlinks=False)
                    except OSError:
                        pass
        for name, value in xattrs.items():
            if self.opts.rootless and name == ROOTLESS_XATTR:
                continue
            self._setxattr(path, fd, name, value)

    # -- removal ---------------------------------------------------------------
    def _remove(self, pfd: int, name: str, mode: int, real: str) -> None:
        if stat.S_ISLNK(mode):
            # cached directory fds may have been resolved through this symlink
            self._drop_cache()
        if stat.S_ISDIR(mode):
            self._drop_cache()
            shutil.rmtree(name, dir_fd=pfd)
            self._forget_dirs(real)
        else:
            os.unlink(name, dir_fd=pfd)

    def _forget_dirs(self, real: str) -> None:
        """Drop *real* and every directory below it from dir_meta: a range of its sorted
        keys (those starting with "real/"), so that removing many directories from a
        big tree (an opaque directory) does not scan every directory per removal."""
        meta, keys = self.dir_meta, self._meta_keys
        if len(meta) != self._meta_len:
            keys = self._meta_keys = sorted(meta)
        # "0" follows "/": [real/, real0) holds exactly the keys starting with "real/"
        lo = bisect_left(keys, real + "/")
        hi = bisect_left(keys, real + "0", lo)
        for k in keys[lo:hi]:
            del meta[k]
        del keys[lo:hi]
        if meta.pop(real, None) is not None:
            del keys[bisect_left(keys, real)]
        self._meta_len = len(meta)

    def _clear_lower(self, pfd: int, name: str, real: str) -> None:
        """Remove whatever lies at/below *real* that the current layer did not write."""
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        keep = self._layer.keeps(real)
        if not keep:
            self._remove(pfd, name, st.st_mode, real)
            return
        if not stat.S_ISDIR(st.st_mode):
            return
        fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        try:
            for child in os.listdir(fd):
                self._clear_lower(fd, child, f"{real}/{child}" if real else child)
        finally:
            os.close(fd)

    # -- the layer loop ----------------------------------------------------------
    def apply(self, reader: TarReader, stats: LayerStats) -> None:
        self._layer = wh.LayerPaths()
        pending: list[_Pending] = []
        if fastpath_enabled() and not (self.opts.uid_map or self.opts.gid_map):
            reader.fast = self._fast_fn(stats)
        for entry in reader:
            if self._stale:
                self._close_stale()
            stats.entries += 1
            if entry.kind == "skip":
                stats.skipped += 1
                continue
            comps = clean_name(entry.name)
            if wh.is_marker(entry.name, comps):
                self._whiteout(comps, entry.name)
                stats.whiteouts += 1
                continue
            if not comps:
                self._apply_root(entry)
                continue
            got = self._dir_fd(comps[:-1], True, entry.name)
            assert got is not None
            pfd, preal = got
            name = comps[-1]
            real = f"{preal}/{name}" if preal else name
            self._layer.mark(real)
            if entry.kind == "hardlink":
                if not self._hardlink(entry, pfd, name, real, final=False):
                    pending.append(_Pending(entry, comps[:-1], name))
                continue
            self._apply_entry(entry, reader, pfd, name, real, stats)
        for p in pending:
            got = self._dir_fd(p.parent, True, p.entry.name)
            assert got is not None
            self._hardlink(p.entry, got[0], p.name, f"{got[1]}/{p.name}" if got[1] else p.name,
                           final=True)

    def _fast_fn(self, stats: LayerStats) -> FastFn:
        assert _fastpath is not None
        extract = _fastpath.extract_files
        rootless, euid, egid, umask = self.opts.rootless, self._euid, self._egid, self._umask
        layer = self._layer       # apply() makes one per layer, before this

        def fast(buf: bytes, pos: int) -> tuple[int, int]:
            # the C side adds each member to layer.paths; its parents are marked here
            pos, entries, files, nbytes, parents, need = extract(
                buf, pos, self._dirs, self._stale, _FD_CACHE, self.hashes, layer.paths,
                self.dir_meta, rootless, euid, egid, umask)
            if entries:
                stats.entries += entries
                stats.files += files
                stats.fast += entries
                stats.bytes += nbytes
                for p in parents:
                    layer.mark_parent(p)
            return pos, need
        return fast

    def _whiteout(self, comps: tuple[str, ...], raw_name: str) -> None:
        base = comps[-1]
        if base == wh.OPAQUE:
            got = self._dir_fd(comps[:-1], True, raw_name)
            assert got is not None
            dfd, real = got
            self._mark_dir_only(real)
            for child in _listdir_fresh(dfd):
                self._clear_lower(dfd, child, f"{real}/{child}" if real else child)
            return
        target = wh.hidden_name(base, raw_name)
        if target is None:
            return
        try:
            got = self._dir_fd(comps[:-1], False, raw_name)
        except CorruptLayerError:
            got = None  # a parent is not a directory: nothing below it to hide
        if got is None:
            return  # whiting out something that does not exist is a no-op
        pfd, preal = got
        self._clear_lower(pfd, target, f"{preal}/{target}" if preal else target)

    def _mark_dir_only(self, real: str) -> None:
        # the opaque directory itself belongs to this layer (its lower children do not)
        if real:
            self._layer.mark(real)

    def _apply_root(self, entry: TarEntry) -> None:
        if entry.kind != "dir":
            raise UnsafeLayerError(f"entry {entry.name!r} would replace the root directory")
        self._chown("", entry.uid, entry.gid, self.root_fd)
        self._set_xattrs("", self.root_fd, entry.xattrs, clear=True)
        self.dir_meta[""] = (entry.mode, entry.mtime_ns)

    def _apply_entry(self, e: TarEntry, reader: TarReader, pfd: int, name: str, real: str,
                     stats: LayerStats) -> None:
        # create first and look only on EEXIST: most entries land on a free path
        if e.kind == "file":
            # rootless: keep owner rw until xattrs are set (the kernel checks the
            # inode's mode for user.* xattrs, even through a writable fd)
            mode = e.mode & 0o777 | (0o600 if self.opts.rootless else 0)
            try:
                fd = os.open(name, _FILE_FLAGS, mode, dir_fd=pfd)
            except FileExistsError:
                self._replace(pfd, name, real)
                fd = os.open(name, _FILE_FLAGS, mode, dir_fd=pfd)
            self._write_file(e, reader, fd, real, stats)
            return
        if e.kind == "dir":
            try:
                os.mkdir(name, 0o700, dir_fd=pfd)
            except FileExistsError:
                old = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                if stat.S_ISDIR(old.st_mode):
                    self._chown(real, e.uid, e.gid, None)
                    self._set_xattrs(real, None, e.xattrs, clear=True)
                    self.dir_meta[real] = (e.mode, e.mtime_ns)
                    return
                if stat.S_ISLNK(old.st_mode) and self.opts.keep_dirlinks:
                    try:
                        if self._resolve(clean_name(real), False, e.name) is not None:
                            return  # --keep-dirlinks: keep the symlink to a directory
                    except CorruptLayerError:
                        pass  # dangling or not a directory: replace it like any entry
                self._remove(pfd, name, old.st_mode, real)
                os.mkdir(name, 0o700, dir_fd=pfd)
            self._chown(real, e.uid, e.gid, None, fresh=True)
            self._set_xattrs(real, None, e.xattrs, clear=False)
            self.dir_meta[real] = (e.mode, e.mtime_ns)
            return
        if e.kind in ("char", "block") and self.opts.rootless:
            self.warn_once("dev", f"skipping device node /{real} (and any further ones): "
                                  "cannot create devices when rootless")
            stats.skipped += 1
            self._layer.paths.discard(real)
            return
        self._replace(pfd, name, real)
        if e.kind == "symlink":
            os.symlink(e.linkname, name, dir_fd=pfd)
            self._meta_path(e, pfd, name, real, chmod=False)
        elif e.kind in ("char", "block"):
            kind = stat.S_IFCHR if e.kind == "char" else stat.S_IFBLK
            os.mknod(name, kind | 0o600, os.makedev(e.devmajor, e.devminor), dir_fd=pfd)
            self._meta_path(e, pfd, name, real, chmod=True)
        elif e.kind == "fifo":
            os.mkfifo(name, 0o600, dir_fd=pfd)
            self._meta_path(e, pfd, name, real, chmod=True)

    def _replace(self, pfd: int, name: str, real: str) -> None:
        """Remove whatever is at *name* (an upper entry replaces it, whatever its type)."""
        try:
            old = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        self._remove(pfd, name, old.st_mode, real)

    def _meta_path(self, e: TarEntry, pfd: int, name: str, real: str, chmod: bool) -> None:
        self._chown(real, e.uid, e.gid, None, fresh=True)
        self._set_xattrs(real, None, e.xattrs, clear=False)
        if chmod:
            os.chmod(name, e.mode, dir_fd=pfd)
        ns = (e.mtime_ns, e.mtime_ns)
        os.utime(name, ns=ns, dir_fd=pfd, follow_symlinks=False)

    def _write_file(self, e: TarEntry, reader: TarReader, fd: int, real: str,
                    stats: LayerStats) -> None:
        try:
            h = hashlib.sha256()
            while True:
                data = reader.read_data()
                if not data:
                    break
                h.update(data)
                n = os.write(fd, data)
                if n < len(data):
                    view = memoryview(data)[n:]
                    while view:
                        view = view[os.write(fd, view):]
            self.hashes[real] = h.digest()
            # order: chown (clears setuid bits and capabilities), xattrs, chmod; the
            # chmod only where creation mode (umask, special bits, rootless) or chown
            # left it wrong
            chowned = self._chown(real, e.uid, e.gid, fd, fresh=True)
            if e.xattrs:
                self._set_xattrs(real, fd, e.xattrs, clear=False)
            if chowned or self.opts.rootless or e.mode & (0o7000 | self._umask):
                os.fchmod(fd, e.mode)
            os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
        finally:
            os.close(fd)
        stats.files += 1
        stats.bytes += e.size

    def _hardlink(self, e: TarEntry, pfd: int, name: str, real: str, final: bool) -> bool:
        tcomps = clean_name(e.linkname, f"hardlink {e.name!r}: target")
        if not tcomps:
            raise UnsafeLayerError(f"hardlink {e.name!r} points at the root directory")
        got = self._dir_fd(tcomps[:-1], False, e.name)
        tname = tcomps[-1]
        try:
            if got is None:
                raise FileNotFoundError
            tfd, treal = got
            tst = os.stat(tname, dir_fd=tfd, follow_symlinks=False)
        except FileNotFoundError:
            if not final:
                return False
            raise UnsafeLayerError(
                f"hardlink {e.name!r} -> {e.linkname!r}: target does not exist in the rootfs",
                hint="a hardlink must point at a file written earlier") from None
        if stat.S_ISDIR(tst.st_mode):
            raise UnsafeLayerError(f"hardlink {e.name!r} -> {e.linkname!r} points at a directory")
        target_real = f"{treal}/{tname}" if treal else tname
        try:
            old = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            old = None
        if old is not None:
            if (old.st_dev, old.st_ino) == (tst.st_dev, tst.st_ino):
                return True  # already the same file
            self._remove(pfd, name, old.st_mode, real)
        os.link(tname, name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        h = self.hashes.get(target_real)
        if h is not None:
            self.hashes[real] = h
        return True

    # -- the end -----------------------------------------------------------------
    def finish(self, rows: Mapping[str, tuple[object, ...]] | None = None
               ) -> dict[str, os.stat_result]:
        """Apply delayed directory modes and mtimes (deepest first).

        Returns the final stat of every directory it touched, so a snapshot
        taken before (while every directory was still readable) can be fixed up.
        *rows*: that snapshot (:func:`~lamina.layer.snapshot.take_snapshot`), taken
        after the last write; a directory whose row already has its mode and mtime
        (a replayed tree's, see ``_fastpath.replay_tree``) is left alone.
        """
        self._drop_cache()
        final: dict[str, os.stat_result] = {}
        self._close_stale()
        for path in sorted(self.dir_meta, key=lambda p: p.count("/"), reverse=True):
            mode, mtime_ns = self.dir_meta[path]
            r: Any = rows.get(path) if rows is not None else None
            if (r is not None and r[1] == "d" and stat.S_IMODE(r[2]) == mode
                    and (mtime_ns < 0 or r[6] == mtime_ns)):
                continue
            try:
                fd = os.open(path, _DIR_FLAGS, dir_fd=self.root_fd) if path else os.dup(
                    self.root_fd)
            except (FileNotFoundError, NotADirectoryError):
                continue
            try:
                os.fchmod(fd, mode)
                if mtime_ns >= 0:
                    os.utime(fd, ns=(mtime_ns, mtime_ns))
                final[path] = os.fstat(fd)
            finally:
                os.close(fd)
        return final
