"""Layer semantics of RootfsWriter (rootless, so no root needed)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from lamina.errors import CorruptLayerError, UnsafeLayerError
from lamina.layer.extract import ExtractOptions, LayerStats, RootfsWriter
from lamina.layer.idmap import ROOTLESS_XATTR, decode_rootless
from lamina.layer.tarstream import TarReader
from lamina.testing.extract import apply_layers

Member = tuple[str, bytes, dict[str, object]]


def layer(*members: tuple[str, str] | tuple[str, str, dict[str, object]]) -> bytes:
    """members: (kind, name[, attrs]); kind f(ile) d(ir) l(symlink) h(ardlink) p(fifo)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for m in members:
            kind, name = m[0], m[1]
            attrs: dict[str, object] = dict(m[2]) if len(m) > 2 else {}  # type: ignore[misc]
            data = attrs.pop("data", b"") if kind == "f" else b""
            assert isinstance(data, bytes)
            ti = tarfile.TarInfo(name)
            ti.type = {"f": tarfile.REGTYPE, "d": tarfile.DIRTYPE, "l": tarfile.SYMTYPE,
                       "h": tarfile.LNKTYPE, "p": tarfile.FIFOTYPE}[kind]
            ti.mode = 0o755 if kind == "d" else 0o644
            ti.size = len(data)
            ti.mtime = 1_600_000_000
            for k, v in attrs.items():
                setattr(ti, k, v)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def apply(root: Path, *layers: bytes, keep_dirlinks: bool = False) -> None:
    apply_layers(root, *layers, keep_dirlinks=keep_dirlinks)


def tree(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath, n)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            elif p.is_fifo():
                out[rel] = "fifo"
            else:
                out[rel] = p.read_bytes().decode()
    return out


def test_whiteouts_hide_only_lower_layers_whatever_the_order(tmp_path: Path) -> None:
    lower = layer(("d", "a"), ("f", "a/old", {"data": b"1"}), ("f", "a/keep", {"data": b"k"}),
                  ("d", "b"), ("f", "b/x", {"data": b"x"}), ("f", "c", {"data": b"c"}))
    upper = layer(("f", "a/new", {"data": b"2"}), ("f", "a/.wh..wh..opq"),  # opaque after
                  ("f", "b/.wh..wh..opq"), ("f", "b/y", {"data": b"y"}),     # opaque before
                  ("f", "c", {"data": b"C"}), ("f", ".wh.c"))               # whiteout after
    apply(tmp_path / "r", lower, upper)
    assert tree(tmp_path / "r") == {"a": "dir", "a/new": "2", "b": "dir", "b/y": "y", "c": "C"}


def test_whiteout_of_a_directory_spanning_layers(tmp_path: Path) -> None:
    l1 = layer(("d", "usr"), ("d", "usr/share"), ("f", "usr/share/a", {"data": b"a"}))
    l2 = layer(("d", "usr/share/sub"), ("f", "usr/share/sub/b", {"data": b"b"}))
    l3 = layer(("f", "usr/.wh.share"))
    apply(tmp_path / "r", l1, l2, l3)
    assert tree(tmp_path / "r") == {"usr": "dir"}


def test_type_changes(tmp_path: Path) -> None:
    l1 = layer(("d", "x"), ("f", "x/f", {"data": b"f"}), ("f", "y", {"data": b"y"}),
               ("d", "z"))
    l2 = layer(("f", "x", {"data": b"now a file"}), ("d", "y"), ("l", "z", {"linkname": "y"}))
    apply(tmp_path / "r", l1, l2)
    assert tree(tmp_path / "r") == {"x": "now a file", "y": "dir", "z": "-> y"}


def test_hardlinks_within_across_and_before_target(tmp_path: Path) -> None:
    l1 = layer(("f", "lower", {"data": b"L"}))
    l2 = layer(("h", "early", {"linkname": "late"}), ("f", "late", {"data": b"T"}),
               ("h", "again", {"linkname": "lower"}))
    apply(tmp_path / "r", l1, l2)
    r = tmp_path / "r"
    assert os.stat(r / "early").st_ino == os.stat(r / "late").st_ino
    assert os.stat(r / "again").st_ino == os.stat(r / "lower").st_ino
    assert os.stat(r / "lower").st_nlink == 2


def test_parent_symlinks_are_followed_inside_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    l1 = layer(("l", "abs", {"linkname": str(outside)}), ("l", "up", {"linkname": "../../.."}))
    l2 = layer(("f", "abs/pwned", {"data": b"1"}), ("f", "up/pwned2", {"data": b"2"}))
    apply(tmp_path / "r", l1, l2)
    assert list(outside.iterdir()) == []
    assert (tmp_path / "r" / outside.relative_to("/") / "pwned").read_bytes() == b"1"
    assert (tmp_path / "r" / "pwned2").read_bytes() == b"2"


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "a/.wh.x/y", ".wh..", ".wh."])
def test_hostile_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsafeLayerError):
        apply(tmp_path / "r", layer(("d", "a"), ("f", name, {"data": b"x"})))
    assert not (tmp_path / "evil").exists()


def test_hardlink_to_outside_or_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsafeLayerError):
        apply(tmp_path / "r1", layer(("h", "x", {"linkname": "../../etc/passwd"})))
    with pytest.raises(UnsafeLayerError, match="directory"):
        apply(tmp_path / "r2", layer(("d", "d"), ("h", "x", {"linkname": "d"})))
    with pytest.raises(UnsafeLayerError, match="does not exist"):
        apply(tmp_path / "r3", layer(("h", "x", {"linkname": "etc/passwd"})))


def test_hardlink_through_symlink_parent_stays_inside(tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.write_text("secret")
    l1 = layer(("l", "s", {"linkname": str(tmp_path)}))
    with pytest.raises(UnsafeLayerError):
        apply(tmp_path / "r", l1, layer(("h", "x", {"linkname": "s/secret"})))


def test_symlink_loop_is_an_error_not_a_hang(tmp_path: Path) -> None:
    l1 = layer(("l", "a", {"linkname": "b"}), ("l", "b", {"linkname": "a"}))
    with pytest.raises(UnsafeLayerError, match="symbolic links"):
        apply(tmp_path / "r", l1, layer(("f", "a/x")))


def test_file_parent_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CorruptLayerError, match="not a directory"):
        apply(tmp_path / "r", layer(("f", "f"), ("f", "f/x")))


def test_keep_dirlinks(tmp_path: Path) -> None:
    l1 = layer(("d", "real"), ("l", "link", {"linkname": "real"}))
    l2 = layer(("d", "link"), ("f", "link/f", {"data": b"1"}))
    apply(tmp_path / "keep", l1, l2, keep_dirlinks=True)
    assert tree(tmp_path / "keep") == {"real": "dir", "real/f": "1", "link": "-> real"}
    apply(tmp_path / "plain", l1, l2)
    assert tree(tmp_path / "plain") == {"real": "dir", "link": "dir", "link/f": "1"}


def test_rootless_records_ownership_in_xattr(tmp_path: Path) -> None:
    apply(tmp_path / "r", layer(("f", "owned", {"uid": 1000, "gid": 5}), ("f", "root")))
    r = tmp_path / "r"
    assert decode_rootless(os.getxattr(r / "owned", ROOTLESS_XATTR)) == (1000, 5)
    assert ROOTLESS_XATTR not in os.listxattr(r / "root")
    assert os.stat(r / "owned").st_uid == os.geteuid()


def test_modes_and_mtimes(tmp_path: Path) -> None:
    apply(tmp_path / "r", layer(("d", "ro", {"mode": 0o555}), ("f", "ro/f", {"mode": 0o4711}),
                               ("d", "t", {"mode": 0o1777})))
    r = tmp_path / "r"
    assert (os.stat(r / "ro").st_mode & 0o7777) == 0o555
    assert (os.stat(r / "ro/f").st_mode & 0o7777) == 0o4711
    assert (os.stat(r / "t").st_mode & 0o7777) == 0o1777
    assert os.stat(r / "ro").st_mtime == 1_600_000_000


def test_removed_directories_leave_dir_meta_and_nothing_else_does(tmp_path: Path) -> None:
    # names that sort between "a/b" and "a/b/..." (or just after) must survive the
    # removal of a/b; directories added after a removal are indexed for the next one
    root = tmp_path / "r"
    root.mkdir()
    w = RootfsWriter(str(root), ExtractOptions(rootless=True))
    lower = ["a", "a/b", "a/b/c", "a/b/c/d", "a/b!x", "a/b.d", "a/bc", "a/b0", "a/b0/b", "z"]
    try:
        w.apply(TarReader(io.BytesIO(layer(*(("d", n) for n in lower))).read), LayerStats())
        assert set(w.dir_meta) == set(lower)
        w.apply(TarReader(io.BytesIO(layer(("f", "a/.wh.b"), ("d", "a/b2"), ("d", "a/b2/e"),
                                           ("d", "a/b0/x"))).read), LayerStats())
        assert set(w.dir_meta) == {"a", "a/b!x", "a/b.d", "a/bc", "a/b0", "a/b0/b", "a/b0/x",
                                   "z", "a/b2", "a/b2/e"}
        w.apply(TarReader(io.BytesIO(layer(("f", ".wh.z"), ("f", "a/.wh.b2"),
                                           ("f", "a/b0/.wh..wh..opq"))).read), LayerStats())
        assert set(w.dir_meta) == {"a", "a/b!x", "a/b.d", "a/bc", "a/b0"}
        assert sorted(tree(root)) == ["a", "a/b!x", "a/b.d", "a/b0", "a/bc"]
    finally:
        w.close()
