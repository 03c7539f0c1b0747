"""The compiled path for stored layers (_fastpath.place_files) changes speed, never
results: the same tree, hashes and farm inodes as the Python path."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.drivers.materialize import StoreRootfsWriter, apply_split
from lamina.layer import extract
from lamina.layer.extract import ExtractOptions, LayerStats
from lamina.store import Store, StoreOptions
from lamina.testing.extract import apply_layers
from lamina.testing.images import build_image
from lamina.testing.layers import TarBuilder
from lamina.testing.tree import diff_manifests, tree_manifest

pytestmark = pytest.mark.skipif(not extract.fastpath_enabled(),
                                reason="fast path not built here")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(str(tmp_path / "store"), options=StoreOptions(fsync=False)) as st:
        yield st


def _layers() -> list[bytes]:
    lower = (TarBuilder()
             .add_dir("usr", 0o755, mtime=10).add_dir("usr/lib", 0o755, mtime=20)
             .add_symlink("lib", "usr/lib")
             .add_dir("srv", 0o1777, uid=1000, gid=1000, mtime=30)
             .add_dir("srv/ro", 0o555, mtime=40).add_file("srv/ro/inside", b"in ro")
             .add_file("srv/replaced-by-link", b"f"))
    for i in range(600):
        lower.add_file(f"usr/lib/f{i:04d}", os.urandom(i * 7 % 5000), mtime=1000 + i)
    for i in range(40):     # identical files: one farm inode for all of them
        lower.add_file(f"usr/share/same{i}", b"same content", mtime=5)
    lower = (lower
             .add_file("etc/suid", b"s", 0o4755).add_file("etc/sticky-ro", b"t", 0o1444)
             .add_file("etc/owned", b"o", 0o640, uid=1000, gid=1000)
             .add_file("etc/empty", b"")
             .add_file("etc/x", b"with xattrs", xattrs={"user.a": b"1"})
             .add_file("lib/through-symlink", b"via lib")
             .add_file("etc/caf\udce9", b"latin-1 name")
             .add_file("etc/" + "long" * 40, b"long name")
             .add_hardlink("etc/hard", "usr/lib/f0003"))
    upper = (TarBuilder()
             .add_file("usr/lib/f0001", b"replaced")        # EEXIST: Python replaces it
             .add_whiteout("usr/lib/f0002")
             .add_file("usr/lib/new", b"new")
             .add_dir("srv", 0o750, mtime=50)                # existing dir: new metadata
             .add_symlink("srv/replaced-by-link", "ro/inside")
             .add_dir("opt/new/deeper", 0o700))               # implicit parents
    for i in range(200):
        upper.add_file(f"opt/new/deeper/g{i}", b"g" * i, mtime=2000 + i)
    return [lower.build(), upper.build()]


def _apply(root: Path, store: Store, opts: ExtractOptions, placement: str,
           farms: Path | None) -> tuple[StoreRootfsWriter, int]:
    root.mkdir()
    w = StoreRootfsWriter(str(root), opts, store.objects_fd, placement)  # type: ignore[arg-type]
    fast = 0
    try:
        for i, la in enumerate(store.image("img:t").layers):
            if farms is not None:
                (farms / str(i)).mkdir(parents=True, exist_ok=True)
                w.set_farm(str(farms / str(i)))
            stats = LayerStats()
            apply_split(w, store.tar_split_path(la.diff_id), stats)
            w.set_farm(None)
            fast += stats.fast
        w.finish()
    finally:
        w.close()
    return w, fast


def _manifest(root: Path) -> dict[str, dict[str, object]]:
    m = tree_manifest(str(root), mtime=True)
    for p in ("opt", "opt/new", "usr/share", "etc"):   # implicit: made "now"
        m[p].pop("mtime_ns", None)
    return m


@pytest.mark.parametrize("placement", ["clone", "copy", "link"])
@pytest.mark.parametrize("rootless", [True, False], ids=["rootless", "root"])
def test_compiled_and_python_paths_agree(tmp_path: Path, store: Store,
                                         monkeypatch: pytest.MonkeyPatch, placement: str,
                                         rootless: bool) -> None:
    if not rootless and os.geteuid() != 0:
        pytest.skip("needs root")
    layers = _layers()
    build_image(str(tmp_path / "lay"), "t", layers)
    store.import_image(str(tmp_path / "lay"), "t", "img:t")
    opts = ExtractOptions(rootless=rootless)
    link = placement == "link"
    wf, fast = _apply(tmp_path / "fast", store, opts, placement,
                      tmp_path / "farms-fast" if link else None)
    monkeypatch.setenv("LAMINA_NO_FASTPATH", "1")
    ws, slow = _apply(tmp_path / "slow", store, opts, placement,
                      tmp_path / "farms-slow" if link else None)
    assert slow == 0
    assert fast > 800, "the compiled path did not take the plain members"
    diff = diff_manifests(_manifest(tmp_path / "slow"), _manifest(tmp_path / "fast"),
                          ignore_root=True, names=("python", "compiled"))
    assert not diff, "\n".join(diff)
    assert wf.hashes == ws.hashes
    assert "usr/lib/through-symlink" in wf.hashes   # real path, not the archive's
    # both placed the same files the same way (how each was placed is counted alike)
    assert (wf.place.cloned + wf.place.copied, wf.place.linked, wf.place.farm_new) == \
        (ws.place.cloned + ws.place.copied, ws.place.linked, ws.place.farm_new)
    if link:
        # farm inodes are named alike by both paths, one per distinct content+metadata
        assert sorted(os.listdir(tmp_path / "farms-fast/0")) == \
            sorted(os.listdir(tmp_path / "farms-slow/0"))
        same = {os.stat(tmp_path / f"fast/usr/share/same{i}").st_ino for i in range(40)}
        assert len(same) == 1
        # bundle + farm (+ the store's name where the object's inode was adopted)
        assert os.stat(tmp_path / "fast/usr/lib/f0005").st_nlink in (2, 3)
    apply_layers(tmp_path / "want", *layers, rootless=rootless)
    diff = diff_manifests(_manifest(tmp_path / "want"), _manifest(tmp_path / "fast"),
                          ignore_root=True, ignore_fields={"link_group"} if link else (),
                          names=("unpack", "compiled"))
    assert not diff, "\n".join(diff)


def test_a_second_bundle_links_the_farm_inodes_the_first_made(tmp_path: Path,
                                                              store: Store) -> None:
    build_image(str(tmp_path / "lay"), "t", _layers())
    store.import_image(str(tmp_path / "lay"), "t", "img:t")
    opts = ExtractOptions(rootless=True)
    w1, _ = _apply(tmp_path / "a", store, opts, "link", tmp_path / "farms")
    w2, _ = _apply(tmp_path / "b", store, opts, "link", tmp_path / "farms")
    assert w1.place.farm_new > 600 and w2.place.farm_new == 0
    assert w2.place.linked == w1.place.linked
    assert os.stat(tmp_path / "a/usr/lib/f0100").st_ino == \
        os.stat(tmp_path / "b/usr/lib/f0100").st_ino
    assert not [n for n in os.listdir(tmp_path / "farms/0") if n.startswith(".")]


def test_damaged_object_goes_to_the_python_path_and_its_error(tmp_path: Path,
                                                              store: Store) -> None:
    from lamina.errors import CorruptLayerError
    build_image(str(tmp_path / "lay"), "t", _layers())
    store.import_image(str(tmp_path / "lay"), "t", "img:t")
    import hashlib
    hexd = hashlib.sha256(b"via lib").hexdigest()
    obj = Path(store.objects_dir) / hexd[:2] / hexd[2:]
    os.chmod(obj, 0o644)
    obj.write_bytes(b"via lib, longer now")         # the size no longer matches
    with pytest.raises(CorruptLayerError):
        _apply(tmp_path / "r", store, ExtractOptions(rootless=True), "clone", None)
