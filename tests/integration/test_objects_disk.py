"""Disk use of the objects driver on real filesystems: what a bundle shares with the
store, counted by the filesystem (statvfs, inode numbers), not by lamina.

* ext4 (no reflinks), read-only bundles: a link farm inode is the store object's
  own inode (adopted), so the data is on disk once for the store and every
  read-only bundle; the object still holds its content (export verifies it).
* xfs: writable bundles share extents; objects are never adopted there.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopfs import loop_fs, shared_extents

from lamina.drivers import materialize, objects
from lamina.drivers.base import ChainLayer, ClaimRequest
from lamina.drivers.materialize import StoreRootfsWriter, records_enabled
from lamina.drivers.objects import ObjectsDriver
from lamina.drivers.objects import factory as objects_factory
from lamina.layer.extract import fastpath_enabled
from lamina.layer.snapshot import read_snapshot
from lamina.store import Store, StoreOptions
from lamina.testing.extract import apply_layers
from lamina.testing.images import build_image
from lamina.testing.layers import TarBuilder
from lamina.testing.tree import diff_manifests, tree_manifest

pytestmark = pytest.mark.root

MiB = 1 << 20


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Path]:
    with loop_fs("ext4", tmp_path) as mnt:
        yield mnt


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    with loop_fs("xfs", tmp_path) as mnt:
        yield mnt


def _data(seed: int, size: int) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32) + b"!" * (size % 32)


def _layers() -> list[bytes]:
    lower = TarBuilder().add_dir("usr", 0o755, mtime=5)
    for i in range(300):        # 300 x 20 KiB: 6 MiB of data
        lower.add_file(f"usr/f{i}", _data(i, 20 << 10), 0o755 if i % 2 else 0o644,
                       uid=i % 3, gid=i % 5, mtime=1000 + i)
    lower.add_file("usr/suid", _data(999, 4096), 0o4755)
    lower.add_file("usr/xattr", _data(998, 4096), xattrs={"user.k": b"v"})
    lower.add_file("usr/dup-a", _data(7, 20 << 10), 0o600, mtime=1)   # same content as f7
    upper = TarBuilder().add_file("usr/f3", b"replaced", 0o640, mtime=77).add_whiteout("usr/f4")
    return [lower.build(), upper.build()]


def _prepare(store: Store, bundle: Path) -> ObjectsDriver:
    img = store.image("img:t")
    chain = tuple(ChainLayer(x.desc, x.diff_id, x.chain_id) for x in img.layers)
    req = ClaimRequest(img.manifest, img.config, chain, str(bundle), read_only=True,
                       store=store, image="img:t")
    drv = objects_factory.claim(req)
    assert isinstance(drv, ObjectsDriver)
    drv.prepare()
    return drv


def _used(mnt: Path) -> int:
    os.sync()
    s = os.statvfs(mnt)
    return (s.f_blocks - s.f_bfree) * s.f_frsize


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_ext4_read_only_bundles_adopt_the_objects(ext4: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  compiled: bool) -> None:
    if compiled and not fastpath_enabled():
        pytest.skip("fast path not built here")
    if not compiled:
        monkeypatch.setenv("LAMINA_NO_FASTPATH", "1")
    layers = _layers()
    build_image(str(tmp_path / "lay"), "t", layers)
    apply_layers(tmp_path / "want", *layers, rootless=False)
    with Store.open(str(ext4 / "store"), options=StoreOptions(fsync=False)) as st:
        st.import_image(str(tmp_path / "lay"), "t", "img:t")
        before = _used(ext4)
        drv = _prepare(st, ext4 / "ro1")
        grew = _used(ext4) - before
        # every object but the two that need a copy (xattrs; a second metadata set
        # for the same content) became its farm inode: no second copy of 6 MiB
        assert drv.place.adopted >= 299
        assert grew < MiB, f"the read-only bundle and its farms used {grew} bytes"
        got = tree_manifest(str(ext4 / "ro1/rootfs"), mtime=True)
        want = tree_manifest(str(tmp_path / "want"), mtime=True)
        assert diff_manifests(want, got, ignore_fields={"link_group"}, ignore_root=True) == []
        hexd = hashlib.sha256(_data(10, 20 << 10)).hexdigest()
        obj = os.stat(Path(st.objects_dir) / hexd[:2] / hexd[2:])
        f10 = os.stat(ext4 / "ro1/rootfs/usr/f10")
        assert obj.st_ino == f10.st_ino and obj.st_mode & 0o7777 == 0o644
        assert (obj.st_uid, obj.st_gid, obj.st_mtime_ns) == (1, 0, 1010 * 10**9)
        assert os.stat(ext4 / "ro1/rootfs/usr/suid").st_mode & 0o7777 == 0o4755
        # the objects still are the layers' content: export rebuilds the exact tars
        for la in st.image("img:t").layers:
            out = io.BytesIO()
            assert st.export_layer(la.diff_id, out) == la.diff_id
        assert st.fsck().problems == []
        # a second bundle links the same inodes; a writable one copies from them
        drv2 = _prepare(st, ext4 / "ro2")
        assert drv2.place.adopted == 0 and drv2.place.farm_new == 0
        assert os.stat(ext4 / "ro2/rootfs/usr/f10").st_ino == f10.st_ino
        st.remove_ref("img:t")
        st.gc()
        assert (ext4 / "ro1/rootfs/usr/f10").read_bytes() == _data(10, 20 << 10)


def test_xfs_objects_are_never_adopted(xfs: Path, tmp_path: Path) -> None:
    build_image(str(tmp_path / "lay"), "t", _layers())
    with Store.open(str(xfs / "store"), options=StoreOptions(fsync=False)) as st:
        st.import_image(str(tmp_path / "lay"), "t", "img:t")
        drv = _prepare(st, xfs / "ro")
        assert drv.place.adopted == 0 and drv.place.farm_new > 290
        hexd = hashlib.sha256(_data(10, 20 << 10)).hexdigest()
        obj = os.stat(Path(st.objects_dir) / hexd[:2] / hexd[2:])
        assert obj.st_nlink == 1 and obj.st_mode & 0o7777 == 0o444


def _prepare_writable(store: Store, name: str, bundle: Path) -> ObjectsDriver:
    img = store.image(name)
    chain = tuple(ChainLayer(x.desc, x.diff_id, x.chain_id) for x in img.layers)
    req = ClaimRequest(img.manifest, img.config, chain, str(bundle), store=store, image=name)
    drv = objects_factory.claim(req)
    assert isinstance(drv, ObjectsDriver)
    drv.prepare()
    return drv


def test_xfs_writable_replay_under_an_opaque_layer(xfs: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A writable bundle replayed from a record below an opaque layer (app-opaque
    after app): what the layer hides is not made (pruned), yet the bundle is the one
    replaying all of it makes: same counts in lamina.json (cloned), same snapshot,
    every file a reflink of its object, directories with their modes and mtimes."""
    if not records_enabled():
        pytest.skip("tree records need the compiled fast path")
    lower = TarBuilder().add_dir("usr", 0o755, mtime=5).add_dir("usr/o", 0o775, mtime=6)
    for i in range(40):
        lower.add_file(f"usr/o/d{i % 4}/f{i}", _data(i, 8192), 0o755 if i % 2 else 0o644,
                       uid=i % 3, gid=i % 2, mtime=100 + i)
    for i in range(20):
        lower.add_file(f"usr/k{i}", _data(100 + i, 8192), 0o644, mtime=200 + i)
    (lower.add_dir("usr/ro", 0o555, mtime=9).add_file("usr/ro/f", _data(300, 4096))
     .add_dir("usr/t", 0o1777, mtime=10).add_file("usr/e", b"", mtime=11))
    top = (TarBuilder().add_dir("usr/o", 0o775, mtime=7).add_opaque("usr/o")
           .add_file("usr/o/new", _data(400, 4096), mtime=8))
    layers = [lower.build(), top.build()]
    build_image(str(tmp_path / "lay"), "t", layers)
    apply_layers(tmp_path / "want", *layers)
    dropped: list[int] = []
    real = StoreRootfsWriter.replay

    def spy(self: StoreRootfsWriter, entries: list[materialize.RecordEntry], fds: list[int],
            hidden: object = ()) -> None:
        dropped.append(len(hidden))  # type: ignore[arg-type]
        real(self, entries, fds, hidden)  # type: ignore[arg-type]

    monkeypatch.setattr(StoreRootfsWriter, "replay", spy)
    monkeypatch.setattr(objects, "RECORD_MIN", 10)     # records the lower layer

    def bundle(st: Store, name: str) -> tuple[dict[str, object], list[tuple[object, ...]]]:
        drv = _prepare_writable(st, "img:t", xfs / name)
        assert drv.reused == 1          # the lower layer's record
        meta = json.loads((xfs / name / "lamina.json").read_text())["objects"]
        with open(xfs / name / "lamina.snapshot", "rb") as f:
            rows = [r[:7] + r[9:] for r in read_snapshot(f) if r[0]]   # not ctime, inode
        assert diff_manifests(tree_manifest(str(tmp_path / "want"), mtime=True),
                              tree_manifest(str(xfs / name / "rootfs"), mtime=True),
                              names=("want", name), ignore_root=True) == []
        return meta, rows

    with Store.open(str(xfs / "store"), options=StoreOptions(fsync=False)) as st:
        st.import_image(str(tmp_path / "lay"), "t", "img:t")
        _prepare_writable(st, "img:t", xfs / "first")
        assert dropped == []
        pruned = bundle(st, "pruned")
        assert dropped == [44]      # usr/o's 40 files and 4 directories
        monkeypatch.setattr(objects, "prune_hidden", lambda *a: None)
        whole = bundle(st, "whole")
    assert dropped[-1] == 0
    assert pruned == whole
    # as if made and removed again: usr/k*, usr/ro/f, usr/o's 40 files, usr/o/new
    assert pruned[0]["cloned"] == 20 + 1 + 40 + 1 and pruned[0]["copied"] == 0
    for p in (xfs / "pruned/rootfs/usr").rglob("*"):
        if p.is_file() and p.stat().st_size:
            assert shared_extents(p), p
