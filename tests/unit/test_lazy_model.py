"""lamina.lazy without FUSE: indexes, the merged tree against a real unpack, the stored
tree, the override_stat format."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

from lamina.errors import DigestMismatchError, UnsafeLayerError
from lamina.layer.extract import ExtractOptions, LayerStats, RootfsWriter
from lamina.layer.tarstream import TarReader
from lamina.lazy.index import ensure_index, load_index
from lamina.lazy.model import ROOT_INO, FrozenTree, Node, build_tree, dump_tree
from lamina.lazy.share import override_value
from lamina.oci.layout import OCILayout
from lamina.oci.model import Descriptor
from lamina.testing.images import build_image
from lamina.testing.layers import TarBuilder


def _layers() -> list[bytes]:
    return [
        TarBuilder().add_dir("a").add_file("a/f", b"1").add_symlink("l", "a")
        .add_file("a/g", b"2", mode=0o4711, uid=3).add_hardlink("a/h", "a/f")
        .add_dir("o").add_file("o/x", b"x").add_file("w", b"w").build(),
        TarBuilder().add_file("l/via", b"through the symlink").add_whiteout("w")
        .add_opaque("o").add_file("o/y", b"y").add_file("n/e/s/t", b"", uid=9)
        .add_whiteout("a/f").add_file("a/f", b"same layer re-add").build(),
    ]


def _image(tmp_path: Path) -> tuple[OCILayout, list[tuple[Descriptor, str]]]:
    build_image(str(tmp_path / "l"), "t", _layers(), compression=["gzip", "zstd"])
    lay = OCILayout.open(str(tmp_path / "l"))
    m = lay.resolve("t")
    cfg = lay.config_for(m)
    return lay, list(zip(m.layers, cfg.diff_ids, strict=True))


def _walk(t: FrozenTree, d: Node, path: str, out: dict[str, tuple[str, int, int, int]]) -> None:
    for name in t.names(d):
        n = t.lookup(d, name)
        assert n is not None
        p = f"{path}/{name}" if path else name
        out[p] = (n.kind, n.st_mode & 0o7777, n.uid, n.size)
        if n.kind == "dir":
            _walk(t, n, p, out)


def _disk(root: str) -> dict[str, tuple[str, int, int, int]]:
    kinds = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink"}
    out: dict[str, tuple[str, int, int, int]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            kind = kinds[stat.S_IFMT(st.st_mode)]
            size = st.st_size if kind != "dir" else 0
            out[os.path.relpath(full, root)] = (kind, st.st_mode & 0o7777, st.st_uid, size)
    return out


def test_tree_equals_the_unpacked_tree(tmp_path: Path) -> None:
    lay, pairs = _image(tmp_path)
    idx = [ensure_index(lay, d, i)[0] for d, i in pairs]
    frozen = FrozenTree.of(build_tree(idx), "sha256:x")
    got: dict[str, tuple[str, int, int, int]] = {}
    root = frozen.node(ROOT_INO)
    assert root is not None
    _walk(frozen, root, "", got)
    # the same layers through the unpacker (rootless: no root needed, owners aside)
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    w = RootfsWriter(str(rootfs), ExtractOptions(rootless=True))
    for tar in _layers():
        w.apply(TarReader(io.BytesIO(tar).read), LayerStats())
    w.finish()
    w.close()
    want = _disk(str(rootfs))
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}
    assert {k: v[3] for k, v in got.items()} == {k: v[3] for k, v in want.items()}
    assert got["a/g"][1:3] == (0o4711, 3) and got["a/f"][3] == len(b"same layer re-add")
    # hard links are one inode
    a = frozen.lookup(root, "a")
    assert a is not None
    f, h = frozen.lookup(a, "f"), frozen.lookup(a, "h")
    assert f is not None and h is not None and f.ino != h.ino  # a/f was replaced after
    assert h.nlink == 1


def test_index_is_reused_and_checked(tmp_path: Path) -> None:
    lay, pairs = _image(tmp_path)
    desc, diff_id = pairs[0]
    _idx, built = ensure_index(lay, desc, diff_id)
    assert built
    assert ensure_index(lay, desc, diff_id)[1] is False
    assert load_index(lay, desc, "sha256:" + "0" * 64) is None
    # a damaged blob: refused, and no index written for it
    desc2, diff2 = pairs[1]
    p = lay.blob_path(desc2.digest)
    data = bytearray(Path(p).read_bytes())
    data[-5] ^= 0xFF
    os.chmod(p, 0o644)
    with open(p, "wb") as f:
        f.write(data)
    with pytest.raises(DigestMismatchError):
        ensure_index(lay, desc2, diff2)
    assert load_index(lay, desc2, diff2) is None


def test_frozen_tree_round_trip_and_foreign_data(tmp_path: Path) -> None:
    lay, pairs = _image(tmp_path)
    tree = build_tree([ensure_index(lay, d, i)[0] for d, i in pairs])
    data = dump_tree(tree, "sha256:m")
    t = FrozenTree.load(data, "sha256:m")
    assert t is not None and t.count == len(tree.inodes)
    assert FrozenTree.load(data, "sha256:other") is None
    assert FrozenTree.load(data[:-3], "sha256:m") is None
    assert FrozenTree.load(b"junk", "sha256:m") is None
    assert t.node(0) is None and t.node(t.count + 1) is None
    root = t.node(ROOT_INO)
    assert root is not None and t.parent(root) is root
    link = t.lookup(root, "l")
    assert link is not None and link.kind == "symlink" and link.target == "a"


def test_hostile_names_are_refused(tmp_path: Path) -> None:
    build_image(str(tmp_path / "l"), "t",
                [TarBuilder().add_file("../escape", b"x").build()], compression="none")
    lay = OCILayout.open(str(tmp_path / "l"))
    m = lay.resolve("t")
    idx, _ = ensure_index(lay, m.layers[0], lay.config_for(m).diff_ids[0])
    with pytest.raises(UnsafeLayerError):
        build_tree([idx])


def test_override_stat_format() -> None:
    # fuse-overlayfs parses "%d:%d:%o": permission bits only, octal
    assert override_value(0, 42, 0o640) == b"0:42:0640"
    assert override_value(1000, 1000, 0o4755) == b"1000:1000:04755"
    assert override_value(0, 0, 0o100644) == b"0:0:0644"


def test_multi_frame_zstd_reads_only_the_frames_needed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zstandard

    from lamina.lazy.fetch import Fetcher
    from lamina.testing import images

    plain = images.compress

    def framed(data: bytes, codec: str) -> bytes:   # one frame per 64 KiB, like pzstd
        if codec != "zstd":
            return plain(data, codec)
        c = zstandard.ZstdCompressor(level=3)
        return b"".join(c.compress(data[i:i + 65536]) for i in range(0, len(data), 65536))

    monkeypatch.setattr(images, "compress", framed)
    files = {f"f{i}": os.urandom(50_000) for i in range(40)}
    tb = TarBuilder()
    for name, data in files.items():
        tb.add_file(name, data)
    images.build_image(str(tmp_path / "l"), "t", [tb.build()], compression="zstd")
    lay = OCILayout.open(str(tmp_path / "l"))
    m = lay.resolve("t")
    desc, diff_id = m.layers[0], lay.config_for(m).diff_ids[0]
    idx, _ = ensure_index(lay, desc, diff_id)
    assert idx.seek_path.endswith(".zframes")
    tree = FrozenTree.of(build_tree([idx]), "sha256:m")
    root = tree.node(ROOT_INO)
    assert root is not None
    fetcher = Fetcher([idx], [desc.to_json()], str(tmp_path / "cache"))
    for name in ("f30", "f0", "f39"):
        node = tree.lookup(root, name)
        assert node is not None
        assert Path(fetcher.cached(node)).read_bytes() == files[name]
    # three 50 kB files out of a 2 MB blob: a few frames each, not the whole layer
    assert fetcher.stats.files_fetched == 3
    assert fetcher.stats.blob_bytes_read < desc.size / 3


def test_index_dir_writable_by_others_is_refused(tmp_path: Path) -> None:
    from lamina.lazy.mount import index_image
    from lamina.oci.layout import ImageRef

    build_image(str(tmp_path / "l"), "t", [TarBuilder().add_file("f", b"x").build()])
    ref = ImageRef(str(tmp_path / "l"), "t")
    tree, _layers, _descs, built = index_image(ref)
    assert built == 1 and tree.count == 2
    (tmp_path / "l/.lamina-lazy").chmod(0o777)
    with pytest.raises(UnsafeLayerError, match="writable only by its owner"):
        index_image(ref)
