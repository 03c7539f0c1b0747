"""The stat snapshot of a rootfs, taken right after unpack, read by repack.

A :mod:`marshal` dump (fast C (de)serialisation; lamina-private) of a header
dict and a list of rows sorted by path::

    ("etc/passwd", "f", 33188, 0, 0, 1234, 1700000000000000000, <ctime_ns>, <ino>, <sha256>)

(path, type, st_mode, uid, gid, size, mtime_ns, ctime_ns, inode, content sha256
as 32 raw bytes for files, the target for symlinks, "" otherwise).  A later
scan compares stat data first and hashes a file only where size, mtime, ctime
or inode say it may have changed.
"""

from __future__ import annotations

import marshal
import os
import stat
from collections.abc import Iterator
from operator import itemgetter
from typing import IO

try:  # compiled walk (setup.py); same rows, no Python object per stat call
    from lamina import _fastpath
except ImportError:  # pragma: no cover - depends on the build
    _fastpath = None  # type: ignore[assignment]

TYPE_CODES = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFCHR: "c",
              stat.S_IFBLK: "b", stat.S_IFIFO: "p", stat.S_IFSOCK: "s"}


def walk(root: str) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry below *root* (not *root* itself), depth first, never following links."""
    stack = [""]
    while stack:
        rel = stack.pop()
        d = os.path.join(root, rel) if rel else root
        try:
            entries = _scandir(d)
        except PermissionError:
            # rootless bundles: a directory we own may have no owner r/x bits
            mode = os.lstat(d).st_mode
            os.chmod(d, mode | 0o500)
            try:
                entries = _scandir(d)
            finally:
                os.chmod(d, stat.S_IMODE(mode))
        for path_name, st in entries:
            path = f"{rel}/{path_name}" if rel else path_name
            yield path, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(path)


def _scandir(d: str) -> list[tuple[str, os.stat_result]]:
    with os.scandir(d) as it:
        return [(de.name, de.stat(follow_symlinks=False)) for de in it]


FORMAT = 1


def take_snapshot(root: str, hashes: dict[str, bytes]) -> dict[str, tuple[object, ...]]:
    """Stat every entry below *root*: path -> row."""
    rows: dict[str, tuple[object, ...]] = {"": row("", "d", os.lstat(root), "")}
    if _fastpath is not None and os.environ.get("LAMINA_NO_FASTPATH", "") in ("", "0"):
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for r in _fastpath.snapshot_rows(fd, hashes):
                rows[r[0]] = r   # type: ignore[index]
            return rows
        except (PermissionError, RecursionError):
            # unreadable directories (rootless) or hostile nesting: the walk below copes
            rows = {"": rows[""]}
        finally:
            os.close(fd)
    for path, st in walk(root):
        t = TYPE_CODES.get(stat.S_IFMT(st.st_mode), "?")
        extra: bytes | str = hashes.get(path, b"") if t == "f" else (
            os.readlink(os.path.join(root, path)) if t == "l" else "")
        rows[path] = row(path, t, st, extra)
    return rows


def row(path: str, t: str, st: os.stat_result, extra: bytes | str) -> tuple[object, ...]:
    return (path, t, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
            st.st_ctime_ns, st.st_ino, extra)


def write_rows(rows: list[tuple[object, ...]], out: IO[bytes]) -> None:
    # by path alone (paths are unique): the same order as comparing whole rows, faster
    marshal.dump(({"format": FORMAT}, sorted(rows, key=itemgetter(0))), out)


def read_snapshot(f: IO[bytes]) -> list[tuple[object, ...]]:
    head, rows = marshal.load(f)
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise ValueError("unknown lamina snapshot format")
    return list(rows)
