"""A thin, read-only pyfuse3 adapter over :class:`lamina.lazy.model.FrozenTree`.

Every answer comes from the in-memory model except file contents, which
:class:`~lamina.lazy.fetch.Fetcher` fetches on the first ``read`` (not on
``open``: ``stat``/``open``/``close`` fetch nothing).  The tree never changes
while mounted, so the kernel may cache entries, attributes and pages for long.

``getxattr(root, "user.lamina.lazy.stats")`` answers the fetch counters as JSON;
the name is not listed, so tree walks do not see it.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
from typing import Any

from lamina.lazy import load_pyfuse3

load_pyfuse3()
import pyfuse3  # noqa: E402 - now in its asyncio mode

from lamina.errors import LaminaError  # noqa: E402
from lamina.lazy.fetch import Fetcher  # noqa: E402
from lamina.lazy.model import ROOT_INO, FrozenTree, Node  # noqa: E402

STATS_XATTR = "user.lamina.lazy.stats"
_TIMEOUT = 3600.0
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT
log = logging.getLogger("lamina.lazy")


def _err(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


class LazyOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: FrozenTree, fetcher: Fetcher) -> None:
        super().__init__()
        self.tree = tree
        self.fetcher = fetcher
        self._open: dict[int, tuple[Node, int]] = {}   # fh -> (node, cache fd or -1)
        self._next_fh = 1

    def _node(self, inode: int) -> Node:
        n = self.tree.node(inode)
        if n is None:
            raise _err(errno.ENOENT)
        return n

    def _attrs(self, n: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = n.ino
        a.generation = 0
        a.entry_timeout = _TIMEOUT
        a.attr_timeout = _TIMEOUT
        a.st_mode = n.st_mode
        a.st_nlink = n.nlink
        a.st_uid = n.uid
        a.st_gid = n.gid
        a.st_rdev = os.makedev(*n.rdev)
        a.st_size = n.size if n.kind != "dir" else 4096
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 511) // 512
        ns = max(n.mtime_ns, 0)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = ns
        return a

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode))

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: Any = None) -> pyfuse3.EntryAttributes:
        d = self._node(parent_inode)
        if d.kind != "dir":
            raise _err(errno.ENOTDIR)
        if name == b".":
            return self._attrs(d)
        if name == b"..":
            return self._attrs(self.tree.parent(d))
        n = self.tree.lookup(d, os.fsdecode(name))
        if n is None:
            raise _err(errno.ENOENT)
        return self._attrs(n)

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        n = self._node(inode)
        if n.kind != "symlink":
            raise _err(errno.EINVAL)
        return os.fsencode(n.target)

    async def opendir(self, inode: int, ctx: Any) -> int:
        if self._node(inode).kind != "dir":
            raise _err(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        d = self._node(fh)
        names = self.tree.names(d)      # sorted: offsets stay valid across calls
        for i in range(start_id, len(names)):
            n = self.tree.lookup(d, names[i])
            assert n is not None
            if not pyfuse3.readdir_reply(token, os.fsencode(names[i]), self._attrs(n), i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        n = self._node(inode)
        if flags & _WRITE:
            raise _err(errno.EROFS)
        if n.kind != "file":
            raise _err(errno.EISDIR if n.kind == "dir" else errno.EINVAL)
        fh = self._next_fh
        self._next_fh += 1
        self._open[fh] = (n, -1)
        fi = pyfuse3.FileInfo(fh=fh)
        fi.keep_cache = True
        return fi

    async def read(self, fh: int, off: int, size: int) -> bytes:
        n, fd = self._open[fh]
        if n.size == 0 or off >= n.size:
            return b""
        if fd < 0:
            try:
                # off the event loop: lookups and cached reads go on during a fetch
                path = await asyncio.to_thread(self.fetcher.cached, n)
            except LaminaError as e:
                log.error("fetching inode %d: %s", n.ino, e.message)
                raise _err(errno.EIO) from None
            except OSError as e:    # the cache's disk: an unhandled error would end the mount
                log.error("fetching inode %d: %s", n.ino, e)
                raise _err(errno.EIO) from None
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self._open[fh] = (n, fd)
        return os.pread(fd, size, off)

    async def release(self, fh: int) -> None:
        _n, fd = self._open.pop(fh, (None, -1))
        if fd >= 0:
            os.close(fd)

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        n = self._node(inode)
        key = os.fsdecode(name)
        if inode == ROOT_INO and key == STATS_XATTR:
            return json.dumps(self.fetcher.stats.to_json()).encode()
        v = n.xattrs.get(key)
        if v is None:
            raise _err(pyfuse3.ENOATTR)
        return v

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return [os.fsencode(k) for k in self._node(inode).xattrs]

    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        return True     # default_permissions: the kernel checks modes itself

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (self.tree.total_size + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = self.tree.count
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s


