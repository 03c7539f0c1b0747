"""Applying stored layers from tar-splits + objects (no root: rootless writers),
and the objects/btrfs drivers' choices and claims."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.drivers.base import ChainLayer, ClaimRequest
from lamina.drivers.btrfs import factory as btrfs_factory
from lamina.drivers.materialize import SplitTarReader, StoreRootfsWriter, apply_split
from lamina.drivers.objects import PLACEMENT_ANNOTATION, choose_placement
from lamina.drivers.objects import factory as objects_factory
from lamina.errors import CorruptLayerError, NotFoundError, UnsupportedError, UsageError
from lamina.layer.extract import ExtractOptions, LayerStats
from lamina.layer.tarstream import TarEntry
from lamina.store import Store, StoreOptions
from lamina.stream.splitdirfdstream import DataReader, StreamWriter, from_tar
from lamina.testing.extract import apply_layers
from lamina.testing.images import build_image
from lamina.testing.layers import TarBuilder
from lamina.testing.tree import diff_manifests, tree_manifest

ROOTLESS = ExtractOptions(rootless=True)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(str(tmp_path / "store"), options=StoreOptions(fsync=False)) as st:
        yield st


def _layers() -> list[bytes]:
    lower = (TarBuilder()
             .add_dir("etc", 0o755, mtime=100)
             .add_file("etc/a", b"alpha", 0o640)
             .add_file("etc/b", b"beta" * 3000)
             .add_dir("o", 0o700, mtime=200).add_file("o/x", b"x").add_file("o/y", b"y")
             .add_hardlink("etc/a-link", "etc/a")
             .add_symlink("etc/s", "a")
             .add_file("empty", b"")
             .add_file("xa", b"xattr", xattrs={"user.k": b"v"})
             .add_dir("ro", 0o555, mtime=300).add_file("ro/f", b"f")
             .build())
    upper = (TarBuilder()
             .add_whiteout("etc/b")
             .add_opaque("o")
             .add_file("o/z", b"z")
             .add_file("ro/g", b"written below a read-only directory")
             .add_file("etc/a", b"replaced")
             .build())
    return [lower, upper]


def _split_with_inline(tmp_path: Path, tar: bytes, objects: Path) -> Path:
    """A tar-split whose even-sized files are objects and odd-sized ones inline."""
    objects.mkdir(exist_ok=True)
    out = tmp_path / "layer.tar-split"

    def place(e: TarEntry, data: DataReader) -> tuple[int, str] | None:
        if e.size % 2:
            return None
        name = f"obj{len(os.listdir(objects))}"
        (objects / name).write_bytes(data(e.size))
        return 0, name

    with open(out, "wb") as f:
        from_tar(io.BytesIO(tar), StreamWriter(f), place)
    return out


@pytest.mark.parametrize("placement", ["clone", "copy"])
def test_layers_from_splits_equal_extracted_layers(tmp_path: Path, store: Store,
                                                   placement: str) -> None:
    layers = _layers()
    build_image(str(tmp_path / "lay"), "t", layers)
    store.import_image(str(tmp_path / "lay"), "t", "img:t")
    apply_layers(tmp_path / "want", *layers)
    root = tmp_path / "got"
    root.mkdir()
    w = StoreRootfsWriter(str(root), ROOTLESS, store.objects_fd, placement)  # type: ignore[arg-type]
    try:
        for la in store.image("img:t").layers:
            apply_split(w, store.tar_split_path(la.diff_id), LayerStats())
        w.finish()
    finally:
        w.close()
    assert diff_manifests(tree_manifest(str(tmp_path / "want"), mtime=True),
                          tree_manifest(str(root), mtime=True), ignore_root=True) == []
    # the hashes repack needs come from the object names, nothing was read to hash
    assert w.hashes["etc/a"] == hashlib.sha256(b"replaced").digest()
    assert w.place.cloned + w.place.copied == 9      # files with content


def test_one_writer_per_layer_keeps_lower_directory_times(tmp_path: Path,
                                                          store: Store) -> None:
    """As the btrfs driver applies layers (a new writer on a snapshot of the one below)."""
    layers = _layers()
    build_image(str(tmp_path / "lay"), "t", layers)
    store.import_image(str(tmp_path / "lay"), "t", "img:t")
    apply_layers(tmp_path / "want", *layers)
    root = tmp_path / "got"
    root.mkdir()
    for la in store.image("img:t").layers:
        w = StoreRootfsWriter(str(root), ROOTLESS, store.objects_fd, "clone",
                              keep_lower_dirs=True)
        try:
            apply_split(w, store.tar_split_path(la.diff_id), LayerStats())
            w.finish()
        finally:
            w.close()
    want = tree_manifest(str(tmp_path / "want"), mtime=True)
    got = tree_manifest(str(root), mtime=True)
    assert got["ro"]["mtime_ns"] == 300 * 10**9       # written into by the upper layer
    assert diff_manifests(want, got, ignore_root=True) == []


def test_link_placement_shares_farm_inodes(tmp_path: Path, store: Store) -> None:
    layers = _layers()
    build_image(str(tmp_path / "lay"), "t", layers)
    store.import_image(str(tmp_path / "lay"), "t", "img:t")
    apply_layers(tmp_path / "want", *layers)
    roots = []
    for n in range(2):
        root = tmp_path / f"got{n}"
        root.mkdir()
        w = StoreRootfsWriter(str(root), ROOTLESS, store.objects_fd, "link")
        try:
            for i, la in enumerate(store.image("img:t").layers):
                farm = tmp_path / f"farm{i}"
                farm.mkdir(exist_ok=True)
                w.set_farm(str(farm))
                apply_split(w, store.tar_split_path(la.diff_id), LayerStats())
                w.set_farm(None)
            w.finish()
        finally:
            w.close()
        assert w.place.farm_new == (9 if n == 0 else 0)
        assert w.place.linked == 9
        roots.append(root)
    assert diff_manifests(tree_manifest(str(tmp_path / "want")), tree_manifest(str(roots[1])),
                          ignore_root=True) == []
    assert os.stat(roots[0] / "etc/a").st_ino == os.stat(roots[1] / "etc/a").st_ino
    assert os.stat(roots[0] / "etc/a").st_mode & 0o777 == 0o644


def test_inline_chunks_and_object_chunks_mix(tmp_path: Path) -> None:
    tar = (TarBuilder().add_file("odd", b"abc").add_file("even", b"abcd")
           .add_file("big-odd", b"z" * 70001).add_file("big-even", b"q" * 70000).build())
    objects = tmp_path / "objects"
    split = _split_with_inline(tmp_path, tar, objects)
    apply_layers(tmp_path / "want", tar)
    root = tmp_path / "got"
    root.mkdir()
    ofd = os.open(objects, os.O_RDONLY | os.O_DIRECTORY)
    try:
        w = StoreRootfsWriter(str(root), ROOTLESS, ofd, "copy")
        try:
            apply_split(w, str(split), LayerStats())
            w.finish()
        finally:
            w.close()
    finally:
        os.close(ofd)
    assert w.place.copied == 2
    assert diff_manifests(tree_manifest(str(tmp_path / "want"), mtime=True),
                          tree_manifest(str(root), mtime=True), ignore_root=True) == []


def test_damaged_splits_are_clear_errors(tmp_path: Path) -> None:
    tar = TarBuilder().add_file("f", b"data").build()
    objects = tmp_path / "objects"
    split = _split_with_inline(tmp_path, tar, objects)
    ofd = os.open(objects, os.O_RDONLY | os.O_DIRECTORY)
    try:
        (objects / "obj0").write_bytes(b"longer data")     # size differs from the header
        root = tmp_path / "r1"
        root.mkdir()
        w = StoreRootfsWriter(str(root), ROOTLESS, ofd)
        with pytest.raises(CorruptLayerError):
            apply_split(w, str(split), LayerStats())
        w.close()
        (objects / "obj0").unlink()                         # object gone
        root = tmp_path / "r2"
        root.mkdir()
        w = StoreRootfsWriter(str(root), ROOTLESS, ofd)
        with pytest.raises(NotFoundError):
            apply_split(w, str(split), LayerStats())
        w.close()
    finally:
        os.close(ofd)
    # a split that ends where the file's content should be
    with open(split, "rb") as f:
        data = f.read()
    cut = tmp_path / "cut.tar-split"
    cut.write_bytes(data[:517])
    with open(cut, "rb") as f, pytest.raises(CorruptLayerError):
        list(SplitTarReader(f))


# -- choices and claims ----------------------------------------------------------------------

def _request(tmp_path: Path, store: Store | None, **kw: object) -> ClaimRequest:
    build_image(str(tmp_path / "lay"), "t", [TarBuilder().add_file("f", b"1").build()])
    if store is None:
        from lamina.oci.layout import OCILayout
        from lamina.store.ids import chain_ids
        lay = OCILayout.open(str(tmp_path / "lay"))
        m = lay.resolve("t", None)
        cfg = lay.config_for(m)
        ch = chain_ids(cfg.diff_ids)
        chain = tuple(ChainLayer(d, cfg.diff_ids[i], ch[i]) for i, d in enumerate(m.layers))
        return ClaimRequest(m, cfg, chain, str(tmp_path / "b"), layout=lay,
                            **kw)  # type: ignore[arg-type]
    store.import_image(str(tmp_path / "lay"), "t", "img:t")
    img = store.image("img:t")
    chain = tuple(ChainLayer(x.desc, x.diff_id, x.chain_id) for x in img.layers)
    return ClaimRequest(img.manifest, img.config, chain, str(tmp_path / "b"), store=store,
                        **kw)  # type: ignore[arg-type]


def test_placement_choice(tmp_path: Path, store: Store) -> None:
    req = _request(tmp_path, store)
    assert choose_placement(req, True) == "clone"
    ro = _request(tmp_path, store, read_only=True)
    assert choose_placement(ro, True) == "link"
    assert choose_placement(ro, False) == "clone"   # links cannot cross filesystems
    copy = _request(tmp_path, store, annotations={PLACEMENT_ANNOTATION: "copy"})
    assert choose_placement(copy, True) == "copy"
    with pytest.raises(UsageError, match="must be one of"):
        objects_factory.claim(_request(tmp_path, store,
                                       annotations={PLACEMENT_ANNOTATION: "hard"}))
    with pytest.raises(UnsupportedError, match="writable"):
        objects_factory.claim(_request(tmp_path, store,
                                       annotations={PLACEMENT_ANNOTATION: "link"}))


def test_objects_needs_a_store(tmp_path: Path) -> None:
    req = _request(tmp_path, None)
    assert objects_factory.claim(req) is None
    assert objects_factory.check_here(None) == "needs a store (--store)"
    with pytest.raises(UsageError, match="store"):
        objects_factory.claim(_request(tmp_path, None, forced=True))


def test_btrfs_declines_without_btrfs(tmp_path: Path, store: Store) -> None:
    assert btrfs_factory.claim(_request(tmp_path, None)) is None
    assert btrfs_factory.claim(_request(tmp_path, store, rootless=True)) is None
    with pytest.raises(UsageError, match="btrfs driver cannot"):
        btrfs_factory.claim(_request(tmp_path, store, rootless=True, forced=True))
    reason = btrfs_factory.check_here(store.path)
    assert reason is not None


def test_lower_directory_times_kept_through_a_symlink(tmp_path: Path, store: Store) -> None:
    """usrmerge: the upper layer writes lib/x where lib -> usr/lib."""
    lower = (TarBuilder().add_dir("usr", 0o755, mtime=10).add_dir("usr/lib", 0o751, mtime=20)
             .add_symlink("lib", "usr/lib").add_file("usr/lib/a", b"a").build())
    upper = TarBuilder().add_file("lib/x", b"x").build()
    build_image(str(tmp_path / "lay"), "t", [lower, upper])
    store.import_image(str(tmp_path / "lay"), "t", "img:t")
    apply_layers(tmp_path / "want", lower, upper)
    root = tmp_path / "got"
    root.mkdir()
    for la in store.image("img:t").layers:
        w = StoreRootfsWriter(str(root), ROOTLESS, store.objects_fd, keep_lower_dirs=True)
        try:
            apply_split(w, store.tar_split_path(la.diff_id), LayerStats())
            w.finish()
        finally:
            w.close()
    got = tree_manifest(str(root), mtime=True)
    assert got["usr/lib"]["mtime_ns"] == 20 * 10**9
    assert diff_manifests(tree_manifest(str(tmp_path / "want"), mtime=True), got,
                          ignore_root=True) == []
