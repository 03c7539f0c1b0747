"""The merged tree of an image, in memory, built from layer indexes alone.

One model (inodes, directory entries, attributes, xattrs, symlink targets,
hard links) with the layer chain applied exactly as
:class:`lamina.layer.extract.RootfsWriter` applies it to a disk: parent
symlinks followed inside the root, implicit parents ``0755 root:root``,
whiteouts hiding only lower layers whatever their position in the layer,
opaque directories, a directory entry over a directory updating it in place,
hard links sharing one inode.  The FUSE adapter (:mod:`lamina.lazy.fuse`)
only reads this model; no file content is needed to build it.
"""

from __future__ import annotations

import stat
import struct
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from lamina.errors import CorruptLayerError, UnsafeLayerError
from lamina.layer import whiteout as wh
from lamina.layer.extract import clean_name
from lamina.lazy.index import LayerIndex, Member

ROOT_INO = 1
_MAX_SYMLINKS = 40
_FMT = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK,
        "char": stat.S_IFCHR, "block": stat.S_IFBLK, "fifo": stat.S_IFIFO}


@dataclass(slots=True, eq=False)
class Node:
    ino: int
    kind: str                   # file, dir, symlink, char, block, fifo
    mode: int                   # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    target: str = ""            # symlink target
    rdev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)
    layer: int = -1             # file data: index of its layer, offset, sha256
    offset: int = 0
    sha256: str = ""
    children: dict[str, Node] | None = None     # directories
    parent: Node | None = None                  # directories: for ".."
    nlink: int = 1

    @property
    def st_mode(self) -> int:
        return _FMT[self.kind] | (0o777 if self.kind == "symlink" else self.mode)


class Tree:
    """The merged tree; :meth:`apply` layers bottom first, then :meth:`finish`."""

    def __init__(self) -> None:
        self._next = ROOT_INO
        self.root = self._new("dir", 0o755, 0, 0, 0)
        self.root.parent = self.root
        self.inodes: dict[int, Node] = {}
        self._layer = wh.LayerPaths()

    def _new(self, kind: str, mode: int, uid: int, gid: int, mtime_ns: int) -> Node:
        n = Node(self._next, kind, mode, uid, gid, mtime_ns)
        self._next += 1
        if kind == "dir":
            n.children = {}
        return n

    # -- resolution (mirrors lamina.layer.extract.resolve_scoped) -------------------------
    def _resolve(self, comps: Sequence[str], create: bool, entry: str,
                 ) -> tuple[tuple[str, ...], Node] | None:
        real: list[str] = []
        nodes: list[Node] = [self.root]
        todo = list(reversed(comps))
        links = 0
        while todo:
            c = todo.pop()
            if c == "..":
                if real:
                    real.pop()
                    nodes.pop()
                continue
            cur = nodes[-1]
            assert cur.children is not None
            n = cur.children.get(c)
            if n is None:
                if not create:
                    return None
                n = self._new("dir", 0o755, 0, 0, 0)
                n.parent = cur
                cur.children[c] = n
            elif n.kind == "symlink":
                links += 1
                if links > _MAX_SYMLINKS:
                    raise UnsafeLayerError(f"entry {entry!r}: too many levels of symbolic links",
                                           hint="the layer contains a symlink loop")
                if n.target.startswith("/"):
                    real, nodes = [], [self.root]
                todo.extend(reversed([p for p in n.target.split("/") if p and p != "."]))
                continue
            elif n.kind != "dir":
                raise CorruptLayerError(
                    f"entry {entry!r}: path component {'/'.join((*real, c))!r} is not a "
                    "directory",
                    hint="the layer writes beneath a non-directory without replacing it")
            real.append(c)
            nodes.append(n)
        return tuple(real), nodes[-1]

    def _clear_lower(self, d: Node, name: str, real: str) -> None:
        assert d.children is not None
        n = d.children.get(name)
        if n is None:
            return
        if not self._layer.keeps(real):
            del d.children[name]
            return
        if n.children is not None:
            for child in list(n.children):
                self._clear_lower(n, child, f"{real}/{child}")

    # -- layers -----------------------------------------------------------------------
    def apply(self, layer: int, members: Sequence[Member]) -> None:
        self._layer = wh.LayerPaths()
        pending: list[tuple[Member, tuple[str, ...]]] = []
        for m in members:
            if m.kind == "skip":
                continue
            comps = clean_name(m.name)
            if wh.is_marker(m.name, comps):
                self._whiteout(comps, m.name)
                continue
            if not comps:
                if m.kind != "dir":
                    raise UnsafeLayerError(f"entry {m.name!r} would replace the root directory")
                r = self.root
                r.uid, r.gid, r.mode, r.mtime_ns = m.uid, m.gid, m.mode, m.mtime_ns
                r.xattrs = dict(m.xattrs)
                continue
            got = self._resolve(comps[:-1], True, m.name)
            assert got is not None
            preal, parent = got
            name = comps[-1]
            self._layer.mark("/".join((*preal, name)))
            if m.kind == "hardlink":
                if not self._hardlink(m, parent, name, final=False):
                    pending.append((m, comps[:-1]))
                continue
            self._entry(layer, m, parent, name)
        for m, pcomps in pending:
            got = self._resolve(pcomps, True, m.name)
            assert got is not None
            self._hardlink(m, got[1], clean_name(m.name)[-1], final=True)

    def _whiteout(self, comps: tuple[str, ...], raw: str) -> None:
        base = comps[-1]
        if base == wh.OPAQUE:
            got = self._resolve(comps[:-1], True, raw)
            assert got is not None
            dreal, d = got
            real = "/".join(dreal)
            if real:
                self._layer.mark(real)
            assert d.children is not None
            for child in list(d.children):
                self._clear_lower(d, child, f"{real}/{child}" if real else child)
            return
        target = wh.hidden_name(base, raw)
        if target is None:
            return
        try:
            got = self._resolve(comps[:-1], False, raw)
        except CorruptLayerError:
            got = None
        if got is None:
            return
        preal, parent = got
        self._clear_lower(parent, target, "/".join((*preal, target)))

    def _entry(self, layer: int, m: Member, parent: Node, name: str) -> None:
        assert parent.children is not None
        old = parent.children.get(name)
        if m.kind == "dir" and old is not None and old.kind == "dir":
            old.uid, old.gid, old.mode, old.mtime_ns = m.uid, m.gid, m.mode, m.mtime_ns
            old.xattrs = dict(m.xattrs)
            return
        if m.kind not in _FMT:
            raise CorruptLayerError(f"entry {m.name!r}: unknown type {m.kind!r}")
        n = self._new(m.kind, m.mode, m.uid, m.gid, m.mtime_ns)
        n.xattrs = dict(m.xattrs)
        if m.kind == "file":
            n.size, n.layer, n.offset, n.sha256 = m.size, layer, m.offset, m.sha256
        elif m.kind == "symlink":
            n.target = m.linkname
            n.size = len(m.linkname.encode("utf-8", "surrogateescape"))
        elif m.kind in ("char", "block"):
            n.rdev = (m.devmajor, m.devminor)
        elif m.kind == "dir":
            n.parent = parent
        parent.children[name] = n

    def _hardlink(self, m: Member, parent: Node, name: str, final: bool) -> bool:
        tcomps = clean_name(m.linkname, f"hardlink {m.name!r}: target")
        if not tcomps:
            raise UnsafeLayerError(f"hardlink {m.name!r} points at the root directory")
        got = self._resolve(tcomps[:-1], False, m.name)
        target = None
        if got is not None:
            assert got[1].children is not None
            target = got[1].children.get(tcomps[-1])
        if target is None:
            if not final:
                return False
            raise UnsafeLayerError(
                f"hardlink {m.name!r} -> {m.linkname!r}: target does not exist in the rootfs",
                hint="a hardlink must point at a file written earlier")
        if target.kind == "dir":
            raise UnsafeLayerError(f"hardlink {m.name!r} -> {m.linkname!r} points at a directory")
        assert parent.children is not None
        parent.children[name] = target
        return True

    def finish(self) -> None:
        """Number the reachable inodes and count links (call after the last layer)."""
        self.inodes = {}
        for n in self.walk():
            if n.ino in self.inodes:
                n.nlink += 1
                continue
            self.inodes[n.ino] = n
            if n.children is not None:
                n.nlink = 2 + sum(1 for c in n.children.values() if c.children is not None)
            else:
                n.nlink = 1

    def walk(self) -> Iterator[Node]:
        """Every directory entry's node (a hard-linked node once per link), root first."""
        stack = [self.root]
        yield self.root
        while stack:
            d = stack.pop()
            assert d.children is not None
            for c in d.children.values():
                yield c
                if c.children is not None:
                    c.parent = d
                    stack.append(c)


def build_tree(layers: Sequence[LayerIndex]) -> Tree:
    t = Tree()
    for i, li in enumerate(layers):
        t.apply(i, li.members)
    t.finish()
    return t


# -- the merged tree on disk -------------------------------------------------------------
# A mount of an image already indexed needs neither the member lists nor the layer walk:
# the merged tree is kept per manifest (LAYOUT/.lamina-lazy/tree-<hex>) as one marshal
# record per inode (builtins only) behind an offset table, so mounting reads one file
# and decodes only the inodes the kernel asks about.
_MAGIC = b"LAMINA-LAZY-TREE\n"
TREE_VERSION = 1


def dump_tree(tree: Tree, manifest: str) -> bytes:
    import marshal
    order = list(tree.inodes.values())
    dense = {n.ino: i + ROOT_INO for i, n in enumerate(order)}
    offsets = array("Q", [0])
    rows: list[bytes] = []
    pos = 0
    total = 0
    for n in order:
        kids = None
        if n.children is not None:
            names = sorted(n.children)
            kids = (names, [dense[n.children[k].ino] for k in names])
        parent = dense[n.parent.ino] if n.parent is not None else ROOT_INO
        row = marshal.dumps((n.kind, n.mode, n.uid, n.gid, n.mtime_ns, n.size, n.target,
                             n.rdev, n.xattrs, n.layer, n.offset, n.sha256, n.nlink, parent,
                             kids))
        rows.append(row)
        pos += len(row)
        offsets.append(pos)
        if n.kind == "file":
            total += n.size
    head = marshal.dumps((TREE_VERSION, manifest, len(order), total))
    return b"".join([_MAGIC, struct.pack("<I", len(head)), head, offsets.tobytes(), *rows])


class FrozenTree:
    """A merged tree read from :func:`dump_tree` bytes, inodes decoded on demand."""

    def __init__(self, data: bytes, count: int, total: int, table: int, rows: int) -> None:
        self.manifest = ""
        self.path = ""              # where it was read from, when it was
        self._data = data
        self.count = count
        self.total_size = total
        self._off = array("Q")
        self._off.frombytes(data[table:rows])
        self._rows = rows
        self._nodes: dict[int, Node] = {}
        self._kids: dict[int, dict[str, int]] = {}
        self._names: dict[int, list[str]] = {}
        self._parent: dict[int, int] = {}

    @classmethod
    def load(cls, data: bytes, manifest: str) -> FrozenTree | None:
        """The tree in *data* if it is *manifest*'s (else None: rebuild it)."""
        import marshal
        if not data.startswith(_MAGIC):
            return None
        try:
            p = len(_MAGIC)
            (hlen,) = struct.unpack_from("<I", data, p)
            version, digest, count, total = marshal.loads(data[p + 4:p + 4 + hlen])
        except (ValueError, EOFError, TypeError, struct.error):
            return None
        if version != TREE_VERSION or digest != manifest:
            return None
        table = p + 4 + hlen
        rows = table + 8 * (count + 1)
        if len(data) < rows:
            return None
        t = cls(data, count, total, table, rows)
        if t._off[-1] != len(data) - rows:
            return None
        t.manifest = manifest
        return t

    def node(self, ino: int) -> Node | None:
        n = self._nodes.get(ino)
        if n is not None:
            return n
        i = ino - ROOT_INO
        if not 0 <= i < self.count:
            return None
        import marshal
        r = marshal.loads(self._data[self._rows + self._off[i]:self._rows + self._off[i + 1]])
        n = Node(ino, r[0], r[1], r[2], r[3], r[4], r[5], r[6], tuple(r[7]), r[8], r[9],
                 r[10], r[11], None, None, r[12])
        if r[14] is not None:
            self._names[ino] = r[14][0]
            self._kids[ino] = dict(zip(r[14][0], r[14][1], strict=True))
        self._parent[ino] = r[13]
        self._nodes[ino] = n
        return n

    def lookup(self, d: Node, name: str) -> Node | None:
        ino = self._kids.get(d.ino, {}).get(name)
        return None if ino is None else self.node(ino)

    def names(self, d: Node) -> list[str]:
        return self._names.get(d.ino, [])

    def parent(self, d: Node) -> Node:
        p = self.node(self._parent.get(d.ino, ROOT_INO))
        assert p is not None
        return p

    @classmethod
    def of(cls, tree: Tree, manifest: str) -> FrozenTree:
        t = cls.load(dump_tree(tree, manifest), manifest)
        assert t is not None
        return t
