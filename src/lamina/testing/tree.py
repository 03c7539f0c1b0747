"""Describe a directory tree completely, to compare two unpacked root filesystems.

:func:`tree_manifest` maps every path below a root (relative, ``"."`` for the
root itself) to a dict of what an unpacker is responsible for: type,
permission bits (with setuid/setgid/sticky), owner, size and sha256 of file
contents, symlink targets, device numbers, every xattr (hex values; except
``security.selinux``, which the host's policy sets), and hard-link groups.

Hard links are described by a label, not inode numbers: every non-directory
sharing its ``(st_dev, st_ino)`` with another path of the tree gets
``"link_group"`` = the lexicographically smallest path of its group, so two
trees built independently compare equal when they link the same paths.

Symlinks are never followed.  :func:`diff_manifests` lists the differences in
readable lines (empty when the trees are equal).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Collection
from typing import Any

Manifest = dict[str, dict[str, Any]]

DEFAULT_IGNORED_XATTRS = frozenset({"security.selinux"})

_TYPES = [
    (stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
    (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
]


def file_type(mode: int) -> str:
    for pred, name in _TYPES:
        if pred(mode):
            return name
    return f"unknown({stat.S_IFMT(mode):o})"


def _sha256(path: bytes) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def read_xattrs(path: str | bytes, ignore: Collection[str] = DEFAULT_IGNORED_XATTRS,
                ) -> dict[str, str]:
    """Every xattr of *path* (not following symlinks) as ``{name: hex value}``."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out: dict[str, str] = {}
    for name in sorted(names):
        if name in ignore:
            continue
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False).hex()
        except OSError as e:
            if e.errno == errno.ENODATA:  # removed meanwhile
                continue
            raise
    return out


def tree_manifest(root: str, *, include_root: bool = True, mtime: bool = False,
                  ignore_xattrs: Collection[str] = DEFAULT_IGNORED_XATTRS) -> Manifest:
    """The manifest of everything below *root* (see the module docstring).

    Keys are paths relative to *root* (``str``; undecodable bytes kept with
    ``surrogateescape``), ``"."`` is the root itself unless *include_root* is
    false.  With *mtime* each entry also records ``mtime_ns``.
    """
    broot = os.fsencode(root)
    out: Manifest = {}
    inodes: dict[tuple[int, int], list[str]] = {}

    def describe(path: bytes, rel: str, st: os.stat_result) -> None:
        kind = file_type(st.st_mode)
        e: dict[str, Any] = {"type": kind, "mode": st.st_mode & 0o7777,
                             "uid": st.st_uid, "gid": st.st_gid}
        if kind == "file":
            e["size"] = st.st_size
            e["sha256"] = _sha256(path)
        elif kind == "symlink":
            e["target"] = os.fsdecode(os.readlink(path))
        elif kind in ("char", "block"):
            e["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
        e["xattrs"] = read_xattrs(path, ignore_xattrs)
        if mtime:
            e["mtime_ns"] = st.st_mtime_ns
        if kind != "dir":
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
        out[rel] = e

    def walk(path: bytes, rel: str) -> None:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda d: d.name)
        for d in entries:
            child_rel = os.fsdecode(d.name) if rel == "." else rel + "/" + os.fsdecode(d.name)
            st = d.stat(follow_symlinks=False)
            describe(d.path, child_rel, st)
            if stat.S_ISDIR(st.st_mode):
                walk(d.path, child_rel)

    st = os.lstat(broot)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(root)
    if include_root:
        describe(broot, ".", st)
    walk(broot, ".")
    for paths in inodes.values():
        if len(paths) > 1:
            label = min(paths)
            for p in paths:
                out[p]["link_group"] = label
    return dict(sorted(out.items()))


def _fmt(v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and v > 7:
        return f"{v} (0o{v:o})"
    return repr(v)


def diff_manifests(a: Manifest, b: Manifest, *, ignore_root: bool = False,
                   ignore_fields: Collection[str] = (), names: tuple[str, str] = ("a", "b"),
                   ) -> list[str]:
    """Readable differences between two manifests (``[]`` when equal).

    *ignore_root* skips the ``"."`` entry; *ignore_fields* skips fields
    (e.g. ``{"mtime_ns"}``) everywhere; *names* label the two sides.
    """
    na, nb = names
    out: list[str] = []
    for path in sorted(set(a) | set(b)):
        if ignore_root and path == ".":
            continue
        ea, eb = a.get(path), b.get(path)
        if ea is None:
            assert eb is not None
            out.append(f"{path}: only in {nb} ({eb.get('type')})")
            continue
        if eb is None:
            out.append(f"{path}: only in {na} ({ea.get('type')})")
            continue
        for k in sorted(set(ea) | set(eb)):
            if k in ignore_fields:
                continue
            va, vb = ea.get(k), eb.get(k)
            if va == vb:
                continue
            if k == "mode" and isinstance(va, int) and isinstance(vb, int):
                out.append(f"{path}: mode {na}=0o{va:04o} {nb}=0o{vb:04o}")
            elif k == "xattrs" and isinstance(va, dict) and isinstance(vb, dict):
                for x in sorted(set(va) | set(vb)):
                    if va.get(x) != vb.get(x):
                        out.append(f"{path}: xattr {x} {na}={va.get(x)!r} {nb}={vb.get(x)!r}")
            else:
                out.append(f"{path}: {k} {na}={_fmt(va)} {nb}={_fmt(vb)}")
    return out
