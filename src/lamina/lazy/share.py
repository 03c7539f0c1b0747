"""Stored layers as read-only lower directories other users can mount.

``lamina share IMAGE`` (or ``lamina share CHAIN_ID`` for one layer) writes,
for each layer of a stored image, the layer's own entries (its diff, not the
merged tree) into the store's extraction
directory ``extract/share/<chain id hex>``, in the layout fuse-overlayfs reads
as a lower layer: OCI whiteouts stay ``.wh.NAME`` files and opaque markers
``.wh..wh..opq`` files, which fuse-overlayfs honours in lower directories.

Every user must be able to read them, so on disk files are ``mode | 0444``
and directories ``mode | 0555``, owned by the sharer, without setuid/setgid/
sticky bits and without ``security.*`` xattrs (a root-owned, world-executable
setuid or file-capability binary on the host would be a privilege escalation).
The image's real owner and permission bits are kept in the
``user.containers.override_stat`` xattr, in the format fuse-overlayfs parses
(``override_mode`` in its utils.c, 1.10): ``"UID:GID:MODE"`` with MODE in octal
holding the permission bits only (``"0:42:0640"``); the file type comes from
the inode.  fuse-overlayfs enables the override for a lower layer when the
layer's root directory carries the xattr, and applies it to regular files and
directories only (1.10; 1.15 adds devices).  Hence:

- symlinks, FIFOs: created with the image's owner (``lchown``), as root;
- device nodes: created with mode 0000 and owned by root (a device node
  readable by every host user could expose host devices); the image's mode
  is not visible through fuse-overlayfs 1.10.

Sharing opens the store to traversal: ``STORE``, ``STORE/extract`` and
``STORE/extract/share`` become ``0711`` (enter, not list); ``blobs/`` and the
database files are set to owner-only so nothing else becomes readable.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lamina.errors import UnsafeLayerError, UnsupportedError
from lamina.layer import whiteout as wh
from lamina.layer.extract import clean_name
from lamina.layer.tarstream import TarEntry, TarReader

if TYPE_CHECKING:
    from lamina.store import Store

OVERRIDE_XATTR = "user.containers.override_stat"
DRIVER = "share"
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def override_value(uid: int, gid: int, mode: int) -> bytes:
    """The xattr value fuse-overlayfs reads: ``UID:GID:0MODE`` (permission bits)."""
    return f"{uid}:{gid}:0{mode & 0o7777:o}".encode()


@dataclass
class ShareResult:
    image: str
    lowers: list[str] = field(default_factory=list)     # top layer first
    made: int = 0                                       # layers written now

    @property
    def lowerdir(self) -> str:
        return ":".join(self.lowers)

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "lowers": self.lowers, "made": self.made,
                "lowerdir": self.lowerdir}


class _DiffWriter:
    """Writes one layer's entries, as they are, below *root* (see module doc)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.root_fd = os.open(root, _DIR)
        self._euid = os.geteuid()
        os.chmod(root, 0o755)
        os.setxattr(self.root_fd, OVERRIDE_XATTR, override_value(0, 0, 0o755))

    def close(self) -> None:
        os.close(self.root_fd)

    def _parent(self, comps: tuple[str, ...], entry: str) -> int:
        fd = os.dup(self.root_fd)
        try:
            for c in comps:
                try:
                    nfd = os.open(c, _DIR, dir_fd=fd)
                except FileNotFoundError:
                    # implicit parent, as unpack makes it: 0755 root
                    os.mkdir(c, 0o755, dir_fd=fd)
                    nfd = os.open(c, _DIR, dir_fd=fd)
                    os.setxattr(nfd, OVERRIDE_XATTR, override_value(0, 0, 0o755))
                except (NotADirectoryError, OSError) as e:
                    if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    raise UnsupportedError(
                        f"entry {entry!r}: parent {c!r} is not a directory of this layer",
                        hint="a shared layer holds its own entries; writing through a "
                             "symlink of the layer is not supported") from None
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def apply(self, reader: TarReader) -> None:
        for e in reader:
            if e.kind == "skip":
                continue
            comps = clean_name(e.name)
            if not comps:
                if e.kind == "dir":
                    os.fchmod(self.root_fd, (e.mode & 0o777) | 0o555)
                    os.setxattr(self.root_fd, OVERRIDE_XATTR,
                                override_value(e.uid, e.gid, e.mode))
                    self._xattrs(self.root_fd, e)
                continue
            try:
                pfd = self._parent(comps[:-1], e.name)
            except UnsupportedError:
                if comps[-1].startswith(wh.PREFIX):
                    continue    # a whiteout below a non-directory hides nothing (as unpack)
                raise
            try:
                self._entry(e, reader, pfd, comps[-1])
            finally:
                os.close(pfd)

    def _remove(self, pfd: int, name: str) -> None:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=pfd)
        else:
            os.unlink(name, dir_fd=pfd)

    def _xattrs(self, fd: int, e: TarEntry) -> None:
        for k, v in e.xattrs.items():
            if k.startswith("security.") or k == OVERRIDE_XATTR:
                continue
            os.setxattr(fd, k, v)

    def _entry(self, e: TarEntry, reader: TarReader, pfd: int, name: str) -> None:
        if e.kind == "dir":
            try:
                os.mkdir(name, 0o755, dir_fd=pfd)
            except FileExistsError:
                if not stat.S_ISDIR(os.stat(name, dir_fd=pfd, follow_symlinks=False).st_mode):
                    self._remove(pfd, name)
                    os.mkdir(name, 0o755, dir_fd=pfd)
            fd = os.open(name, _DIR, dir_fd=pfd)
            try:
                os.fchmod(fd, (e.mode & 0o777) | 0o555)
                os.setxattr(fd, OVERRIDE_XATTR, override_value(e.uid, e.gid, e.mode))
                self._xattrs(fd, e)
                os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
            finally:
                os.close(fd)
            return
        self._remove(pfd, name)
        if e.kind == "file":
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=pfd)
            try:
                while data := reader.read_data():
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                os.fchmod(fd, (e.mode & 0o777) | 0o444)
                os.setxattr(fd, OVERRIDE_XATTR, override_value(e.uid, e.gid, e.mode))
                self._xattrs(fd, e)
                os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
            finally:
                os.close(fd)
        elif e.kind == "hardlink":
            tcomps = clean_name(e.linkname, f"hardlink {e.name!r}: target")
            if not tcomps:
                raise UnsafeLayerError(f"hardlink {e.name!r} points at the root directory")
            tfd = self._parent(tcomps[:-1], e.name)
            try:
                os.link(tcomps[-1], name, src_dir_fd=tfd, dst_dir_fd=pfd,
                        follow_symlinks=False)
            except FileNotFoundError:
                raise UnsupportedError(
                    f"hardlink {e.name!r} -> {e.linkname!r}: the target is not in this layer",
                    hint="a shared layer cannot link to a lower layer's file") from None
            finally:
                os.close(tfd)
        elif e.kind == "symlink":
            os.symlink(e.linkname, name, dir_fd=pfd)
            if self._euid == 0:
                os.chown(name, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
        elif e.kind == "fifo":
            os.mkfifo(name, 0o600, dir_fd=pfd)
            if self._euid == 0:
                os.chown(name, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
            os.chmod(name, (e.mode & 0o777) | 0o444, dir_fd=pfd)
        elif e.kind in ("char", "block"):
            kind = stat.S_IFCHR if e.kind == "char" else stat.S_IFBLK
            os.mknod(name, kind, os.makedev(e.devmajor, e.devminor), dir_fd=pfd)
            os.chmod(name, 0, dir_fd=pfd)


def _open_for_traversal(store: Store) -> None:
    for p in (store.path, os.path.join(store.path, "extract"),
              os.path.join(store.path, "extract", DRIVER)):
        os.makedirs(p, 0o700, exist_ok=True)
        os.chmod(p, 0o711)
    for name in ("blobs", "lamina.db", "lamina.db-wal", "lamina.db-shm"):
        p = os.path.join(store.path, name)
        try:
            mode = stat.S_IMODE(os.stat(p).st_mode)
        except FileNotFoundError:
            continue
        os.chmod(p, mode & 0o700)


def share_image(store: Store, name: str) -> ShareResult:
    """Write (or reuse) the shared lower directory of every layer of image *name*;
    *name* may also be one layer's ChainID (``sha256:...``) to share that layer alone."""
    if name.startswith("sha256:"):
        diff_ids = store.chain(name)        # NotFoundError when the store lacks it
        pairs = [(name, diff_ids[-1])]
        res = ShareResult(name)
    else:
        img = store.image(name)
        pairs = [(la.chain_id, la.diff_id) for la in img.layers]
        res = ShareResult(img.name)
    with store.session():
        _open_for_traversal(store)
        for chain_id, diff_id in pairs:
            with store.extraction_lock(DRIVER, chain_id):
                ex = store.extraction(DRIVER, chain_id)
                if ex is None or ex.state != "ready" or not os.path.isdir(ex.path):
                    if ex is not None:
                        store.remove_extraction(DRIVER, chain_id)
                    with store.stage_extraction(DRIVER, chain_id) as stage:
                        _write_layer(store, diff_id, stage)
                    res.made += 1
                    ex = store.extraction(DRIVER, chain_id)
                    assert ex is not None
                res.lowers.append(ex.path)
    res.lowers.reverse()
    return res


def _write_layer(store: Store, diff_id: str, stage: str) -> None:
    # the layer tar rebuilt (and verified against its diff_id) by the store
    with tempfile.TemporaryFile(dir=os.path.join(store.path, "tmp")) as tmp:
        store.export_layer(diff_id, tmp)
        tmp.seek(0)
        w = _DiffWriter(stage)
        try:
            w.apply(TarReader(tmp.read))
        finally:
            w.close()
