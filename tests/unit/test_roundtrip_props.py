"""Property tests: unpack -> change the rootfs -> repack -> unpack gives the changed tree.

(a) a random tree (files with random bytes, directories, symlinks, hard links,
    every permission bit including setuid/setgid/sticky, random owners and
    mtimes, ``user.*`` xattrs, odd names) written into the rootfs of an
    unpacked empty image;
(b) random edits (add, remove, modify, chmod, chown, rename, ...) on the
    unpacked rootfs of an image whose random tree was built by the test kit.

After ``repack`` and a fresh ``unpack`` of the new tag, ``tree_manifest``
(with mtimes; only the rootfs directory's own mtime is left out: no layer
entry describes it) must be equal.  Runs the library in-process (the CLI is
covered by the integration tests) and needs root for real owners.

"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lamina.bundle import UnpackOptions, unpack
from lamina.oci.layout import ImageRef
from lamina.repack import RepackOptions, repack
from lamina.testing.images import build_image
from lamina.testing.layers import DIRTYPE, LNKTYPE, REGTYPE, SYMTYPE, RawEntry, TarBuilder
from lamina.testing.tree import Manifest, diff_manifests, tree_manifest

pytestmark = pytest.mark.usefixtures("require_root")

# no example database: it would be written to .hypothesis/ in the work tree.
# LAMINA_PROP_EXAMPLES=500 for a longer hunt.
SETTINGS = settings(max_examples=int(os.environ.get("LAMINA_PROP_EXAMPLES", "25")),
                    deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- strategies ------------------------------------------------------------------------------

# odd but legal names: spaces, newline, backslash, non-ASCII, RTL override, and
# \udcff = the byte 0xff (not UTF-8; surrogateescape)
_CHARS = [*"abcxyzABC019-_.,+= ~@#%\n\\", "é", "ü", "☃", "\u202e", "\udcff"]
short_names = st.text(alphabet=st.sampled_from(_CHARS), min_size=1, max_size=10)
long_names = st.integers(100, 200).map(lambda n: "L" * n)
names = st.one_of(short_names, short_names, short_names, long_names).filter(
    lambda s: s not in (".", "..") and not s.startswith(".wh."))
modes = st.one_of(st.integers(0, 0o7777),
                  st.sampled_from([0o644, 0o755, 0o4755, 0o2755, 0o1777, 0o6711, 0o000]))
ids = st.one_of(st.sampled_from([0, 0, 1, 1000, 65534]), st.integers(0, 3_000_000))
mtimes = st.one_of(
    st.integers(0, 4_000_000_000).map(lambda s: s * 1_000_000_000),          # whole seconds
    st.integers(0, 4_000_000_000 * 1_000_000_000),                          # any ns
)
xattr_names = st.text(alphabet=st.sampled_from(list("abcdefgh.-_0123")), min_size=1,
                      max_size=12).map(lambda s: "user." + s)
xattrs = st.dictionaries(xattr_names, st.binary(max_size=40), max_size=3)


@dataclass
class Node:
    path: str
    kind: str                      # file, dir, symlink, hardlink
    data: bytes = b""
    target: str = ""               # symlink target / hardlink target path
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)


@st.composite
def trees(draw: st.DrawFn, max_entries: int = 30) -> list[Node]:
    nodes: list[Node] = []
    taken: set[str] = set()
    dirs = [""]
    files: list[str] = []
    for _ in range(draw(st.integers(0, max_entries))):
        parent = draw(st.sampled_from(dirs))
        path = f"{parent}/{draw(names)}" if parent else draw(names)
        if path in taken or len(path.encode("utf-8", "surrogateescape")) > 1000:
            continue
        taken.add(path)
        kind = draw(st.sampled_from(["file", "file", "file", "dir", "dir", "symlink",
                                     "hardlink"]))
        if kind == "hardlink" and not files:
            kind = "file"
        n = Node(path, kind, mode=draw(modes), uid=draw(ids), gid=draw(ids),
                 mtime_ns=draw(mtimes))
        if kind == "file":
            n.data = draw(st.one_of(st.binary(max_size=300),
                                    st.integers(0, 70_000).map(lambda k: b"z" * k)))
            n.xattrs = draw(xattrs)
            files.append(path)
        elif kind == "dir":
            n.xattrs = draw(xattrs)
            dirs.append(path)
        elif kind == "symlink":
            n.target = draw(st.one_of(st.sampled_from(sorted(taken)),
                                      names, st.just("/etc/../../x")))
        else:
            n.target = draw(st.sampled_from(files))
        nodes.append(n)
    return nodes


def write_tree(root: Path, nodes: list[Node]) -> None:
    """Create *nodes* below *root* with every attribute, directories' mtimes last."""
    for n in nodes:
        p = root / n.path
        if n.kind == "dir":
            p.mkdir()
        elif n.kind == "file":
            p.write_bytes(n.data)
        elif n.kind == "symlink":
            os.symlink(n.target, p)
        else:
            os.link(root / n.target, p)
    for n in nodes:
        p = root / n.path
        if n.kind == "hardlink":
            continue
        os.chown(p, n.uid, n.gid, follow_symlinks=False)
        if n.kind != "symlink":
            os.chmod(p, n.mode)          # after chown, which clears setuid/setgid
            for k, v in n.xattrs.items():
                os.setxattr(p, k, v)
        if n.kind != "dir":
            os.utime(p, ns=(n.mtime_ns, n.mtime_ns), follow_symlinks=False)
    for n in sorted((n for n in nodes if n.kind == "dir"), key=lambda n: -n.path.count("/")):
        os.utime(root / n.path, ns=(n.mtime_ns, n.mtime_ns))


def tree_layer(nodes: list[Node]) -> bytes:
    """The same tree as a layer, written by the test kit (not by lamina)."""
    t = TarBuilder()
    for n in nodes:
        sec, frac = divmod(n.mtime_ns, 1_000_000_000)
        pax: dict[str, str | bytes | int] = {"mtime": f"{sec}.{frac:09d}"} if frac else {}
        if n.kind == "hardlink":
            t.add_raw(RawEntry(n.path, LNKTYPE, linkname=n.target))
            continue
        typ = {"dir": DIRTYPE, "file": REGTYPE, "symlink": SYMTYPE}[n.kind]
        t.add_raw(RawEntry(n.path + ("/" if n.kind == "dir" else ""), typ, n.data,
                           mode=0o777 if n.kind == "symlink" else n.mode, uid=n.uid, gid=n.gid,
                           mtime=sec, linkname=n.target, xattrs=n.xattrs or None, pax=pax))
    return t.build()


# -- lamina, in-process ---------------------------------------------------------------------


def do_unpack(layout: Path, tag: str, bundle: Path) -> None:
    unpack(UnpackOptions(ImageRef(str(layout), tag), str(bundle)))


def do_repack(layout: Path, tag: str, bundle: Path) -> None:
    repack(RepackOptions(ImageRef(str(layout), tag), str(bundle)))


def manifest(root: Path) -> Manifest:
    m = tree_manifest(str(root), mtime=True)
    m["."].pop("mtime_ns")
    return m


def assert_round_trip(layout: Path, bundle: Path, tag: str, out: Path) -> None:
    do_repack(layout, tag, bundle)
    do_unpack(layout, tag, out)
    diff = diff_manifests(manifest(bundle / "rootfs"), manifest(out / "rootfs"),
                          names=("edited", "repacked"))
    assert not diff, "\n".join(diff)


# -- (a) random trees --------------------------------------------------------------------------


@SETTINGS
@given(nodes=trees())
def test_random_tree_round_trips(nodes: list[Node]) -> None:
    with tempfile.TemporaryDirectory(prefix="lamina-prop-") as tmp:
        t = Path(tmp)
        build_image(str(t / "layout"), "empty", [TarBuilder().build()])
        do_unpack(t / "layout", "empty", t / "b1")
        write_tree(t / "b1/rootfs", nodes)
        assert_round_trip(t / "layout", t / "b1", "filled", t / "b2")


def test_a_renamed_directory_keeps_its_hardlink_to_an_unchanged_file(tmp_path: Path) -> None:
    """Found by (b): the rename moves one name of a link group and changes no inode, so
    the other name, unchanged, must go into the layer too or the group is cut in two."""
    tar = (TarBuilder().add_dir("a").add_file("keep", b"shared\n").add_hardlink("a/link", "keep")
           .add_dir("b").build())
    build_image(str(tmp_path / "layout"), "t", [tar])
    do_unpack(tmp_path / "layout", "t", tmp_path / "b1")
    root = tmp_path / "b1/rootfs"
    os.rename(root / "a", root / "b/moved")
    assert os.stat(root / "b/moved/link").st_ino == os.stat(root / "keep").st_ino
    assert_round_trip(tmp_path / "layout", tmp_path / "b1", "edited", tmp_path / "b2")
    out = tmp_path / "b2/rootfs"
    assert os.stat(out / "b/moved/link").st_ino == os.stat(out / "keep").st_ino


def test_negative_subsecond_mtime_round_trips(tmp_path: Path) -> None:
    """-1.5 s is pax ``mtime=-1.5``; lamina's tar writer splits it with divmod into
    (-2, 0.5) and writes ``-2.5``, which every reader (its own included) takes for
    -2.5 s.  (Pre-1970 sub-second mtimes are why (a) draws only mtimes >= 0.)"""
    build_image(str(tmp_path / "layout"), "empty", [TarBuilder().build()])
    do_unpack(tmp_path / "layout", "empty", tmp_path / "b1")
    root = tmp_path / "b1/rootfs"
    for name, ns in (("neg-frac", -1_500_000_000), ("neg-whole", -2_000_000_000),
                     ("neg-tiny", -1), ("pos-frac", 1_500_000_000)):
        (root / name).write_bytes(name.encode())
        os.utime(root / name, ns=(ns, ns))
    assert_round_trip(tmp_path / "layout", tmp_path / "b1", "neg", tmp_path / "b2")


# -- (b) random edits on an unpacked random tree ----------------------------------------------


def entries(root: Path) -> list[str]:
    """Every path below *root*, relative, sorted."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for n in dirs + files:
            out.append(n if rel == "." else f"{rel}/{n}")
    return sorted(out)


def dirs_of(root: Path) -> list[str]:
    return [""] + [p for p in entries(root) if (root / p).is_dir() and not (root / p).is_symlink()]


def remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def new_path(data: st.DataObject, root: Path) -> str:
    parent = data.draw(st.sampled_from(dirs_of(root)), label="parent")
    name = data.draw(names, label="name")
    return f"{parent}/{name}" if parent else name


OPS = ["add_file", "add_dir", "add_symlink", "add_pair", "remove", "modify", "chmod", "chown",
       "utime", "rename", "rename", "retype", "recreate_dir", "dir_xattr"]


def apply_edit(data: st.DataObject, root: Path) -> str:
    op = data.draw(st.sampled_from(OPS), label="op")
    existing = entries(root)
    if op.startswith("add_") or not existing:
        path = new_path(data, root)
        p = root / path
        if os.path.lexists(p):
            return "skip"
        if op == "add_dir":
            p.mkdir()
            os.chmod(p, data.draw(modes))
        elif op == "add_symlink":
            os.symlink(data.draw(names), p)
        else:
            p.write_bytes(data.draw(st.binary(max_size=200)))
            os.chown(p, data.draw(ids), data.draw(ids))
            os.chmod(p, data.draw(modes))
            if op == "add_pair":
                other = root / new_path(data, root)
                if not os.path.lexists(other):
                    os.link(p, other)
        return f"{op} {path}"
    path = data.draw(st.sampled_from(existing), label="path")
    p = root / path
    st_ = os.lstat(p)
    kind = stat.S_IFMT(st_.st_mode)
    if op == "remove":
        remove(p)
    elif op == "modify":
        if kind != stat.S_IFREG:
            return "skip"
        with open(p, "r+b" if data.draw(st.booleans()) else "wb") as f:
            f.write(data.draw(st.binary(min_size=1, max_size=200)))
    elif op == "chmod":
        if kind == stat.S_IFLNK:
            return "skip"
        os.chmod(p, data.draw(modes))
    elif op == "chown":
        os.chown(p, data.draw(ids), data.draw(ids), follow_symlinks=False)
    elif op == "utime":
        t = data.draw(mtimes)
        os.utime(p, ns=(t, t), follow_symlinks=False)
    elif op == "rename":
        dest = new_path(data, root)
        if dest == path or dest.startswith(path + "/") or os.path.lexists(root / dest):
            return "skip"
        os.rename(p, root / dest)
        return f"rename {path} -> {dest}"
    elif op == "retype":
        remove(p)
        if kind == stat.S_IFDIR:
            p.write_bytes(b"was a directory")
        elif kind == stat.S_IFREG:
            p.mkdir()
            (p / "child").write_bytes(b"was a file")
        else:
            p.mkdir()
    elif op == "recreate_dir":
        if kind != stat.S_IFDIR:
            return "skip"
        shutil.rmtree(p)
        p.mkdir()
        if data.draw(st.booleans()):
            (p / data.draw(names)).write_bytes(b"new content")
    elif op == "dir_xattr":
        if kind not in (stat.S_IFDIR, stat.S_IFREG):
            return "skip"   # the kernel refuses user.* xattrs on symlinks and fifos
        os.setxattr(p, data.draw(xattr_names), data.draw(st.binary(max_size=20)))
    return f"{op} {path}"


@SETTINGS
@given(nodes=trees(max_entries=20), data=st.data())
def test_random_edits_round_trip(nodes: list[Node], data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory(prefix="lamina-prop-") as tmp:
        t = Path(tmp)
        build_image(str(t / "layout"), "tree", [tree_layer(nodes)])
        do_unpack(t / "layout", "tree", t / "b1")
        root = t / "b1/rootfs"
        # the test kit's layer and lamina's unpack agree with write_tree (sanity)
        (t / "direct").mkdir()
        write_tree(t / "direct", nodes)
        diff = diff_manifests(manifest(t / "direct"), manifest(root), ignore_root=True,
                              names=("direct", "unpacked"))
        assert not diff, "\n".join(diff)
        done = [apply_edit(data, root) for _ in range(data.draw(st.integers(1, 12), label="n"))]
        for d in done:
            event(d.split()[0])
        assert_round_trip(t / "layout", t / "b1", "edited", t / "b2")
