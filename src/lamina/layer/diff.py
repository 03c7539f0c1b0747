"""What changed in a rootfs since its snapshot, as the entries of a new layer.

The scan is stat-first: an entry whose type, mode, owner, size, mtime, ctime
and inode all match the snapshot is unchanged without being read.  When the
whole bundle was copied (the rootfs directory has a new inode), inode numbers
and ctimes mean nothing: files with the same metadata are then hashed and
compared with the snapshot's content hashes, and xattrs are assumed kept.

Output rules (what umoci and the image-spec's changeset rules expect):

- added and modified paths become full entries, sorted, parents first;
- a removed path becomes ``.wh.NAME``; a removed directory is one whiteout,
  not one per child;
- a directory that was removed and re-created (new inode) is emitted with an
  opaque marker ``.wh..wh..opq`` followed by all of its current content;
- regular files sharing an inode are emitted once, the other names as
  hardlinks to the first (sorted) name; when one name of such a file is
  emitted, all its names are (a directory renamed with one name of a link
  group inside changes no inode, and the layer would otherwise cut the group
  in two, as umoci 0.4.7's repack does).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

from lamina.errors import BundleError
from lamina.layer import whiteout as wh
from lamina.layer.idmap import ROOTLESS_XATTR, IdMapping, decode_rootless
from lamina.layer.snapshot import TYPE_CODES, row, walk

# snapshot row indexes
_T, _MODE, _UID, _GID, _SIZE, _MTIME, _CTIME, _INO, _EXTRA = range(1, 10)


@dataclass
class Change:
    path: str                    # rootfs-relative, no leading "/"
    kind: str                    # file, dir, symlink, hardlink, char, block, fifo, whiteout, opaque
    st: os.stat_result | None = None
    linkname: str = ""           # symlink target or hardlink target path
    uid: int = 0                 # container ids
    gid: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)


@dataclass
class ScanResult:
    changes: list[Change]
    skipped_sockets: list[str]
    # path -> (row) for the new snapshot; filled for every entry seen
    rows: list[tuple[object, ...]]


def unmap_id(host_id: int, mappings: tuple[IdMapping, ...]) -> int:
    if not mappings:
        return host_id
    for m in mappings:
        if m.host <= host_id < m.host + m.size:
            return m.container + host_id - m.host
    return host_id


def _sha256(path: str) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


def kind_of(mode: int) -> str:
    return {"f": "file", "d": "dir", "l": "symlink", "c": "char", "b": "block", "p": "fifo",
            "s": "socket"}.get(TYPE_CODES.get(stat.S_IFMT(mode), "?"), "unknown")


def scan(rootfs: str, snapshot: list[tuple[object, ...]], *, rootless: bool = False,
         uid_map: tuple[IdMapping, ...] = (), gid_map: tuple[IdMapping, ...] = (),
         only: Collection[str] | None = None) -> ScanResult:
    """The changes of *rootfs* against *snapshot*.

    *only* (a ``repack.delta-list`` hook's answer) restricts the scan to those
    rootfs-relative paths, everything below them and their parent directories
    (whose mtime an added or removed child changes, as a full scan would see);
    every other path is taken as unchanged and keeps its snapshot row.  A
    listed path that is gone is a removal.  The root is always compared.
    """
    old = {str(r[0]): r for r in snapshot}
    kept: list[tuple[object, ...]] = []
    if only is not None:
        scope = set(only)
        parents = {a for p in scope for a in _ancestors(p)} - scope
        kept = [r for p, r in old.items()
                if p and p not in parents and not _in_scope(p, scope)]
        old = {p: r for p, r in old.items()
               if not p or p in parents or _in_scope(p, scope)}
    seen: set[str] = set()
    changed: list[tuple[str, os.stat_result]] = []
    opaque_dirs: list[str] = []
    sockets: list[str] = []
    rows: list[tuple[object, ...]] = []
    replaced_under: list[str] = []   # prefixes of re-created directories
    ex_dirs: set[str] = set()         # directories now something else: children go with them
    groups: dict[tuple[int, int], list[tuple[str, os.stat_result]]] = {}  # names of nlink > 1
    root_st = os.lstat(rootfs)
    root_prev = old.pop("", None)
    # a bundle copied elsewhere (cp -a, rsync) has new inode numbers and ctimes
    # everywhere: then only metadata and content hashes can say what changed
    copied = root_prev is not None and root_prev[_INO] != root_st.st_ino
    if root_prev is not None and not (
            root_prev[_MODE] == root_st.st_mode and root_prev[_UID] == root_st.st_uid
            and root_prev[_GID] == root_st.st_gid and (copied or (
                root_prev[_CTIME] == root_st.st_ctime_ns
                and root_prev[_MTIME] == root_st.st_mtime_ns))):
        changed.append(("", root_st))
    rows.append(row("", "d", root_st, ""))

    for path, st in walk(rootfs) if only is None else _walk_only(rootfs, only):
        seen.add(path)
        t = TYPE_CODES.get(stat.S_IFMT(st.st_mode), "?")
        full = os.path.join(rootfs, path)
        if t == "s":
            sockets.append(path)
            continue
        if path.rpartition("/")[2].startswith(wh.PREFIX):
            raise BundleError(
                f"/{path}: names starting with {wh.PREFIX!r} are reserved for whiteouts and "
                "cannot be stored in a layer", hint="rename or remove the file, then repack")
        prev = old.get(path)
        extra: bytes | str = ""
        if t == "l":
            extra = os.readlink(full)
        is_changed = True
        if prev is not None and prev[_T] == t:
            same_meta = (prev[_MODE] == st.st_mode and prev[_UID] == st.st_uid
                         and prev[_GID] == st.st_gid and prev[_MTIME] == st.st_mtime_ns)
            # same inode and ctime: nothing about the inode changed (ctime moves on
            # any chmod, chown, xattr change, link or rename)
            same_inode = copied or (prev[_INO] == st.st_ino and prev[_CTIME] == st.st_ctime_ns)
            if t == "d":
                if not copied and prev[_INO] != st.st_ino and not _under(path, replaced_under):
                    opaque_dirs.append(path)     # removed and re-created
                    replaced_under.append(path + "/")
                else:
                    is_changed = not (same_meta and same_inode)
            elif t == "f":
                pe = prev[_EXTRA]
                extra = pe if isinstance(pe, bytes) else b""
                if same_meta and prev[_SIZE] == st.st_size:
                    if not copied:
                        is_changed = not same_inode
                    else:
                        digest = _sha256(full)
                        is_changed = digest != prev[_EXTRA]
                        extra = digest
            elif t == "l":
                is_changed = not (same_meta and same_inode and extra == prev[_EXTRA])
            else:
                is_changed = not (same_meta and same_inode)
        if prev is not None and prev[_T] == "d" and t != "d":
            ex_dirs.add(path)
        if is_changed or _under(path, replaced_under):
            changed.append((path, st))
        elif t == "f" and st.st_nlink > 1:
            groups.setdefault((st.st_dev, st.st_ino), []).append((path, st))
        rows.append(row(path, t, st, extra))
    if groups:     # the unchanged names of an emitted file's link group go with it
        changed += [m for path, st in changed if stat.S_ISREG(st.st_mode) and st.st_nlink > 1
                    for m in groups.pop((st.st_dev, st.st_ino), ())]

    # removals: collapse a removed tree to its top; nothing below a replaced dir
    removed = sorted(p for p in old if p not in seen)
    whiteouts: list[str] = []
    gone: set[str] = set(ex_dirs)
    for p in removed:
        parent = p.rpartition("/")[0]
        if parent in gone or _under(p, replaced_under):
            gone.add(p)
            continue
        gone.add(p)
        whiteouts.append(p)

    out: list[Change] = []
    first_of_inode: dict[tuple[int, int], str] = {}
    changed.sort(key=lambda x: sort_key(x[0]))  # a hardlink's target must come first
    for path, st in changed:
        kind = kind_of(st.st_mode)
        full = os.path.join(rootfs, path)
        xattrs = read_xattrs(full)
        uid, gid = unmap_id(st.st_uid, uid_map), unmap_id(st.st_gid, gid_map)
        if rootless:
            raw = xattrs.pop(ROOTLESS_XATTR, None)
            uid, gid = decode_rootless(raw) if raw is not None else (0, 0)
        c = Change(path, kind, st, uid=uid, gid=gid, xattrs=xattrs)
        if kind == "symlink":
            c.linkname = os.readlink(full)
        elif kind == "file" and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            if key in first_of_inode:
                c.kind = "hardlink"
                c.linkname = first_of_inode[key]
            else:
                first_of_inode[key] = path
        out.append(c)
    for d in opaque_dirs:
        out.append(Change(d + "/" + wh.OPAQUE, "opaque"))
    for p in whiteouts:
        parent, _, name = p.rpartition("/")
        out.append(Change(f"{parent}/{wh.PREFIX}{name}" if parent else wh.PREFIX + name,
                          "whiteout"))
    out.sort(key=lambda c: sort_key(c.path))
    rows.extend(kept)
    rows.sort()
    return ScanResult(out, sockets, rows)


def _in_scope(path: str, scope: set[str]) -> bool:
    """*path* is in *scope* or below one of its paths."""
    return path in scope or any(a in scope for a in _ancestors(path))


def _ancestors(path: str) -> Iterator[str]:
    i = path.rfind("/")
    while i > 0:
        yield path[:i]
        i = path.rfind("/", 0, i)


def _walk_only(rootfs: str, paths: Collection[str]) -> Iterator[tuple[str, os.stat_result]]:
    """The entries of *paths* and their parent directories, and for listed
    directories everything below them.

    A path whose parent is not a real directory inside the rootfs (missing, or
    a symlink that could lead out of it) does not exist for the scan: it is
    never stat()ed through the link.
    """
    scope = set(paths)
    done: set[str] = set()
    for a in sorted({a for p in scope for a in _ancestors(p)} - scope, key=sort_key):
        parent = a.rpartition("/")[0]
        if _in_scope(a, scope) or (parent and not _real_dir(rootfs, parent)):
            continue
        try:  # the entry alone (it may now be a symlink or a file), nothing below it
            yield a, os.lstat(os.path.join(rootfs, a))
        except (FileNotFoundError, NotADirectoryError):
            pass
    for p in sorted(scope, key=sort_key):
        if _in_scope(p, done):
            continue  # below a directory walked already
        parent = p.rpartition("/")[0]
        if parent and not _real_dir(rootfs, parent):
            continue
        try:
            st = os.lstat(os.path.join(rootfs, p))
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            continue
        yield p, st
        if stat.S_ISDIR(st.st_mode):
            done.add(p)
            for sub, sst in walk(os.path.join(rootfs, p)):
                yield f"{p}/{sub}", sst


def _real_dir(rootfs: str, rel: str) -> bool:
    cur = rootfs
    for comp in rel.split("/"):
        cur = os.path.join(cur, comp)
        try:
            if not stat.S_ISDIR(os.lstat(cur).st_mode):
                return False
        except OSError:
            return False
    return True


def sort_key(path: str) -> tuple[bytes, ...]:
    # component-wise, so a directory's entries directly follow it
    return tuple(p.encode("utf-8", "surrogateescape") for p in path.split("/"))


def _under(path: str, prefixes: list[str]) -> bool:
    return any(path.startswith(p) for p in prefixes)


def read_xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out: dict[str, bytes] = {}
    for n in sorted(names):
        if n.startswith("security.selinux"):
            continue
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False)
        except OSError:
            continue
    return out


def iter_paths(changes: list[Change]) -> Iterator[str]:
    return (c.path for c in changes)
