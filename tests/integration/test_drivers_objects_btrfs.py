"""The objects and btrfs drivers on real filesystems made by the tests.

Each test loop-mounts the filesystem it needs (xfs with reflink=1, ext4,
btrfs), puts the store and the bundles on it, and tears the mount and the
loop device down in a finalizer.  A driver's rootfs must equal what the copy
driver (``lamina unpack``) makes of the same image, and sharing must show in
the filesystem's own block counts (statvfs), not in lamina's bookkeeping.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopfs import loop_fs

from conftest import need_tool
from lamina.bundle import UnpackOptions, unpack
from lamina.drivers.base import ChainLayer, ClaimRequest
from lamina.drivers.btrfs import BtrfsDriver, is_subvolume
from lamina.drivers.btrfs import factory as btrfs_factory
from lamina.drivers.objects import PLACEMENT_ANNOTATION, ObjectsDriver
from lamina.drivers.objects import factory as objects_factory
from lamina.errors import UnsupportedError
from lamina.layer.diff import scan
from lamina.layer.snapshot import read_snapshot
from lamina.oci.layout import ImageRef
from lamina.store import Store, StoreOptions
from lamina.testing.images import build_image
from lamina.testing.layers import TarBuilder
from lamina.testing.tree import diff_manifests, tree_manifest

pytestmark = pytest.mark.root

MiB = 1 << 20


# -- fixtures ------------------------------------------------------------------------------

def _loopfs(kind: str, tmp_path: Path, size: int = 400 * MiB) -> Iterator[Path]:
    with loop_fs(kind, tmp_path, size) as mnt:
        yield mnt


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    yield from _loopfs("xfs", tmp_path)


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Path]:
    yield from _loopfs("ext4", tmp_path)


@pytest.fixture
def btrfs(tmp_path: Path) -> Iterator[Path]:
    need_tool("btrfs")
    yield from _loopfs("btrfs", tmp_path)


# -- images --------------------------------------------------------------------------------

def _blob(seed: int, size: int) -> bytes:
    return (seed.to_bytes(4, "big") * (size // 4 + 1))[:size]


def base_layer() -> bytes:
    return (TarBuilder()
            .add_dir("etc", 0o755, mtime=1000)
            .add_file("etc/passwd", b"root:x:0:0::/root:/bin/sh\nu:x:1000:1000::/:/bin/sh\n")
            .add_file("etc/shadow", b"secret", 0o600, uid=0, gid=42)
            .add_file("etc/gone", b"whited out later")
            .add_dir("opq", 0o750, uid=7, gid=8, mtime=2000)
            .add_file("opq/old1", b"1").add_file("opq/old2", b"2")
            .add_dir("usr", 0o755).add_dir("usr/lib", 0o755)
            .add_dir("dev", 0o755).add_dir("run", 0o755).add_dir("app", 0o755)
            .add_file("usr/lib/big1", _blob(1, 3 * MiB))
            .add_file("usr/lib/big2", _blob(2, 2 * MiB), 0o755, uid=1000, gid=1000)
            .add_file("usr/bin-suid", b"#!/bin/sh\n", 0o4755)
            .add_hardlink("usr/lib/big1-link", "usr/lib/big1")
            .add_symlink("usr/lib/sym", "../../etc/passwd")
            .add_symlink("abs", "/etc/shadow")
            .add_file("xattr-file", b"x", xattrs={"user.lamina": b"v1",
                                                  "trusted.lamina": b"t"})
            .add_char("dev/null", 1, 3).add_block("dev/loopx", 7, 200)
            .add_fifo("run/fifo")
            .add_file("empty", b"")
            .add_dir("ro", 0o555, mtime=3000).add_file("ro/inside", b"ro")
            .build())


def mid_layer() -> bytes:
    return (TarBuilder()
            .add_whiteout("etc/gone")
            .add_opaque("opq")
            .add_file("opq/new", b"new")
            .add_file("ro/added", b"added below a read-only dir")
            .add_file("usr/lib/big3", _blob(3, 2 * MiB))
            .add_hardlink("hl-to-lower", "etc/passwd")
            .add_file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")   # replaces the lower
            .build())


def top_layer(tag: str) -> bytes:
    return (TarBuilder()
            .add_file(f"app/{tag}", _blob(hash(tag) & 0xFFFF, MiB // 2))
            .add_whiteout("usr/bin-suid")
            .build())


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A layout with two images sharing their two lower layers (tags a, b)."""
    lay = tmp_path / "layout"
    base, mid = base_layer(), mid_layer()
    build_image(str(lay), "a", [base, mid, top_layer("a")])
    build_image(str(lay), "b", [base, mid, top_layer("b")])
    return lay


def copy_tree(layout: Path, tag: str, dest: Path) -> dict[str, dict[str, object]]:
    unpack(UnpackOptions(ImageRef(str(layout), tag), str(dest)))
    return tree_manifest(str(dest / "rootfs"), mtime=True)


def request(store: Store, name: str, bundle: Path, *, read_only: bool = False,
            annotations: dict[str, str] | None = None) -> ClaimRequest:
    img = store.image(name)
    chain = tuple(ChainLayer(x.desc, x.diff_id, x.chain_id) for x in img.layers)
    return ClaimRequest(img.manifest, img.config, chain, str(bundle), read_only=read_only,
                        annotations=annotations or {}, store=store, image=name)


def open_store(path: Path) -> Store:
    return Store.open(str(path), options=StoreOptions(fsync=False))


def used_bytes(mnt: Path) -> int:
    os.sync()
    s = os.statvfs(mnt)
    return (s.f_blocks - s.f_bfree) * s.f_frsize




# -- objects -------------------------------------------------------------------------------

def test_objects_reflinks_on_xfs(xfs: Path, images: Path) -> None:
    want = copy_tree(images, "a", xfs / "copy-a")
    with open_store(xfs / "store") as st:
        st.import_image(str(images), "a", "img:a")
        st.import_image(str(images), "b", "img:b")
        drv = objects_factory.claim(request(st, "img:a", xfs / "bundle-a"))
        assert isinstance(drv, ObjectsDriver)
        r = drv.prepare()
        assert r.files > 0
        assert drv.place.cloned >= 8        # every file with content shares extents
        assert drv.place.copied == 0 and drv.place.linked == 0
        got = tree_manifest(str(xfs / "bundle-a" / "rootfs"), mtime=True)
        # the root's mtime is "now" for every driver
        assert diff_manifests(want, got, ignore_root=True) == []
        # a second image sharing its lower layers: only metadata (and its own top file)
        before = used_bytes(xfs)
        drv_b = objects_factory.claim(request(st, "img:b", xfs / "bundle-b"))
        assert drv_b is not None
        drv_b.prepare()
        grew = used_bytes(xfs) - before
        assert grew < 2 * MiB, f"second bundle used {grew} bytes; its data is ~7.5 MiB"
        # written files are private copies: the store object is untouched
        f = xfs / "bundle-b" / "rootfs" / "usr/lib/big1"
        with open(f, "r+b") as fh:
            fh.write(b"changed")
        assert st.fsck().problems == []
        assert (xfs / "bundle-a/rootfs/usr/lib/big1").read_bytes()[:7] != b"changed"


def test_objects_read_only_hardlinks_on_ext4(ext4: Path, images: Path) -> None:
    want = copy_tree(images, "a", ext4 / "copy-a")
    with open_store(ext4 / "store") as st:
        st.import_image(str(images), "a", "img:a")
        st.import_image(str(images), "b", "img:b")
        drv = objects_factory.claim(request(st, "img:a", ext4 / "ro-a", read_only=True))
        assert isinstance(drv, ObjectsDriver)
        drv.prepare()
        assert drv.place.linked > 0 and drv.place.copied == 0
        got = tree_manifest(str(ext4 / "ro-a" / "rootfs"), mtime=True)
        # farm inodes are shared, so link groups are not the tar's: everything else is
        assert diff_manifests(want, got, ignore_fields={"link_group"}, ignore_root=True) == []
        spec = (ext4 / "ro-a" / "config.json").read_text()
        assert '"readonly": true' in spec
        before = used_bytes(ext4)
        drv_b = objects_factory.claim(request(st, "img:b", ext4 / "ro-b", read_only=True))
        assert isinstance(drv_b, ObjectsDriver)
        drv_b.prepare()
        grew = used_bytes(ext4) - before
        # b's own top file is 0.5 MiB (its farm inode); the 7 MiB below are shared
        assert grew < MiB + MiB // 2, f"second read-only bundle used {grew} bytes"
        assert drv_b.place.farm_new == 1
        a_ino = os.stat(ext4 / "ro-a/rootfs/usr/lib/big1").st_ino
        assert os.stat(ext4 / "ro-b/rootfs/usr/lib/big1").st_ino == a_ino
        # what the bundle costs alone: its directories and records, not the farm's files
        meta = json.loads((ext4 / "ro-b" / "lamina.json").read_text())
        usage = objects_factory.open(str(ext4 / "ro-b"), meta, st).usage(str(ext4 / "ro-b"))
        assert 0 < usage.bytes < MiB // 2 and usage.inodes < 40
        assert st.fsck().problems == []
        # gc may drop the farms; the bundles keep their inodes
        st.remove_ref("img:a")
        st.remove_ref("img:b")
        st.gc()
        assert (ext4 / "ro-a/rootfs/usr/lib/big2").read_bytes() == _blob(2, 2 * MiB)


def test_objects_writable_on_ext4_copies_and_refuses_links(ext4: Path, images: Path) -> None:
    want = copy_tree(images, "a", ext4 / "copy-a")
    with open_store(ext4 / "store") as st:
        st.import_image(str(images), "a", "img:a")
        drv = objects_factory.claim(request(st, "img:a", ext4 / "rw"))
        assert isinstance(drv, ObjectsDriver)
        drv.prepare()
        assert drv.place.copied > 0 and drv.place.linked == 0
        assert diff_manifests(want, tree_manifest(str(ext4 / "rw/rootfs"), mtime=True),
                              ignore_root=True) == []
        with pytest.raises(UnsupportedError, match="writable"):
            objects_factory.claim(request(st, "img:a", ext4 / "x",
                                          annotations={PLACEMENT_ANNOTATION: "link"}))
        assert not (ext4 / "x").exists()


# -- btrfs ---------------------------------------------------------------------------------

def test_btrfs_snapshots_per_chain(btrfs: Path, images: Path) -> None:
    want_a = copy_tree(images, "a", btrfs / "copy-a")
    want_b = copy_tree(images, "b", btrfs / "copy-b")
    # the reference itself on btrfs: the opaque marker hid the lower files
    assert "opq/old1" not in want_a and "opq/new" in want_a
    with open_store(btrfs / "store") as st:
        st.import_image(str(images), "a", "img:a")
        st.import_image(str(images), "b", "img:b")
        assert btrfs_factory.check_here(str(btrfs / "store")) is None
        drv = btrfs_factory.claim(request(st, "img:a", btrfs / "a"))
        assert isinstance(drv, BtrfsDriver)
        drv.prepare()
        assert len(drv.built) == 3
        assert is_subvolume(str(btrfs / "a" / "rootfs"))
        assert diff_manifests(want_a, tree_manifest(str(btrfs / "a/rootfs"), mtime=True),
                              ignore_root=True) == []
        # b shares two layers: only its top layer is built, on a snapshot of a's second
        drv_b = btrfs_factory.claim(request(st, "img:b", btrfs / "b"))
        assert isinstance(drv_b, BtrfsDriver)
        drv_b.prepare()
        assert drv_b.built == [st.image("img:b").layers[-1].chain_id]
        assert diff_manifests(want_b, tree_manifest(str(btrfs / "b/rootfs"), mtime=True),
                              ignore_root=True) == []
        # a second bundle of a: nothing built at all
        drv_a2 = btrfs_factory.claim(request(st, "img:a", btrfs / "a2"))
        assert isinstance(drv_a2, BtrfsDriver)
        drv_a2.prepare()
        assert drv_a2.built == []
        # the stored snapshot rows describe the bundle: an untouched rootfs has no change,
        # a written one exactly the written file (and its directory)
        with open(btrfs / "a2" / "lamina.snapshot", "rb") as f:
            snap = read_snapshot(f)
        assert scan(str(btrfs / "a2/rootfs"), snap).changes == []
        (btrfs / "a2/rootfs/etc/new-file").write_text("x")
        assert [c.path for c in scan(str(btrfs / "a2/rootfs"), snap).changes] == [
            "etc", "etc/new-file"]
        # bundles are independent: a's chain and other bundles do not see the write
        assert not (btrfs / "a/rootfs/etc/new-file").exists()
        assert st.fsck().problems == []
        drv_a2.remove(str(btrfs / "a2"))
        assert not (btrfs / "a2").exists()
        st.remove_ref("img:a")
        st.remove_ref("img:b")
        res = st.gc(removers={"btrfs": btrfs_factory.remover})
        assert res.counts["extractions"] == 4
        assert st.extractions() == []
        assert st.fsck().problems == []
    listed = subprocess.run(["btrfs", "subvolume", "list", str(btrfs)], check=True,
                            capture_output=True, text=True).stdout
    # what is left: the two bundles still there (a, b), nothing of the store
    assert "store" not in listed


def test_btrfs_declines_elsewhere(ext4: Path, images: Path) -> None:
    with open_store(ext4 / "store") as st:
        st.import_image(str(images), "a", "img:a")
        reason = btrfs_factory.check_here(str(ext4 / "store"))
        assert reason is not None and "btrfs" in reason
        assert btrfs_factory.claim(request(st, "img:a", ext4 / "x")) is None


# -- processes: concurrency and SIGKILL ------------------------------------------------------

_WORKER = textwrap.dedent("""
    import importlib
    import sys
    from lamina.drivers.base import ChainLayer, ClaimRequest
    from lamina.store import Store, StoreOptions
    driver, store, name, bundle, ro = sys.argv[1:6]
    with Store.open(store, options=StoreOptions(fsync=False)) as st:
        img = st.image(name)
        chain = tuple(ChainLayer(x.desc, x.diff_id, x.chain_id) for x in img.layers)
        req = ClaimRequest(img.manifest, img.config, chain, bundle, read_only=ro == "1",
                           store=st, image=name)
        importlib.import_module(f"lamina.drivers.{driver}").factory.claim(req).prepare()
""")


def _worker(driver: str, store: Path, name: str, bundle: Path,
            ro: bool = False) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", _WORKER, driver, str(store), name,
                             str(bundle), "1" if ro else "0"], stderr=subprocess.PIPE)


@pytest.mark.parametrize("kind", ["btrfs", "ext4"])
def test_concurrent_unpacks_share_layers(kind: str, tmp_path: Path, images: Path) -> None:
    if kind == "btrfs":
        need_tool("btrfs")
    gen = _loopfs(kind, tmp_path)
    mnt = next(gen)
    try:
        driver = "btrfs" if kind == "btrfs" else "objects"
        want = {t: copy_tree(images, t, mnt / f"copy-{t}") for t in ("a", "b")}
        with open_store(mnt / "store") as st:
            st.import_image(str(images), "a", "img:a")
            st.import_image(str(images), "b", "img:b")
        procs = [_worker(driver, mnt / "store", f"img:{t}", mnt / f"bundle-{t}",
                         ro=driver == "objects") for t in ("a", "b")]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err.decode()
        for t in ("a", "b"):
            got = tree_manifest(str(mnt / f"bundle-{t}/rootfs"), mtime=True)
            assert diff_manifests(want[t], got, ignore_fields={"link_group"},
                                  ignore_root=True) == []
        with open_store(mnt / "store") as st:
            # each shared chain was made once (one extraction per chain id)
            chains = {x.chain_id for t in ("a", "b") for x in st.image(f"img:{t}").layers}
            assert len(st.extractions(driver)) == len(chains) == 4
            assert st.fsck().problems == []
    finally:
        for _ in gen:
            pass


def _many_files_layer(n: int) -> bytes:
    t = TarBuilder()
    for i in range(n // 100):
        t.add_dir(f"d{i}")
        for j in range(100):
            t.add_file(f"d{i}/f{j}", f"{i}-{j}".encode() * 20)
    return t.build()


@pytest.mark.parametrize("kind", ["btrfs", "ext4"])
def test_sigkill_mid_unpack_then_retry(kind: str, tmp_path: Path) -> None:
    if kind == "btrfs":
        need_tool("btrfs")
    gen = _loopfs(kind, tmp_path)
    mnt = next(gen)
    try:
        driver = "btrfs" if kind == "btrfs" else "objects"
        lay = tmp_path / "layout"
        build_image(str(lay), "many", [base_layer(), _many_files_layer(20000)])
        want = copy_tree(lay, "many", mnt / "copy")
        with open_store(mnt / "store") as st:
            st.import_image(str(lay), "many", "img:many")
        bundle = mnt / "bundle"
        killed = False
        for delay in (0.6, 0.9, 1.3):
            p = _worker(driver, mnt / "store", "img:many", bundle, ro=driver == "objects")
            time.sleep(delay)
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
                killed = True
                break
            p.wait()
            subprocess.run(["rm", "-rf", str(bundle)], check=True)
            if driver == "btrfs":
                with open_store(mnt / "store") as st:
                    for ex in st.extractions(driver):
                        st.remove_extraction(driver, ex.chain_id, btrfs_factory.remover)
        assert killed, "the unpack finished before it could be killed"
        assert not bundle.exists(), "a killed unpack must not leave a bundle"
        p = _worker(driver, mnt / "store", "img:many", bundle, ro=driver == "objects")
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
        got = tree_manifest(str(bundle / "rootfs"), mtime=True)
        assert diff_manifests(want, got, ignore_fields={"link_group"}, ignore_root=True) == []
        leftovers = [e for e in os.listdir(mnt) if e.startswith(".bundle.lamina-")]
        assert leftovers == []
        with open_store(mnt / "store") as st:
            res = st.fsck()
            assert res.problems == [], res.problems
            assert st.gc(removers={"btrfs": btrfs_factory.remover}).counts["tmp"] == 0
    finally:
        for _ in gen:
            pass


# -- the CLI -----------------------------------------------------------------------------------

def _json_out(proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    import json
    assert proc.returncode == 0, proc.stderr
    out: dict[str, object] = json.loads(proc.stdout)
    return out


def test_cli_btrfs_and_objects(btrfs: Path, images: Path) -> None:
    from conftest import run_lamina
    store = btrfs / "store"
    lay = btrfs / "layout"
    subprocess.run(["cp", "-a", str(images), str(lay)], check=True)
    listed = _json_out(run_lamina(["drivers", "--json", "--store", str(store)]))
    by_name = {d["name"]: d for d in listed["drivers"]}  # type: ignore[attr-defined]
    assert by_name["btrfs"]["can_run"] is True
    assert by_name["objects"]["can_run"] is True
    first = _json_out(run_lamina(["unpack", "--json", "--driver", "btrfs", "--store",
                                  str(store), "--image", f"{lay}:a", str(btrfs / "a")]))
    assert first["driver"] == "btrfs" and first["reused"] == 0
    second = _json_out(run_lamina(["unpack", "--json", "--driver", "btrfs", "--store",
                                   str(store), "--image", f"{lay}:b", str(btrfs / "b")]))
    assert second["driver"] == "btrfs" and second["reused"] == 2
    ro = _json_out(run_lamina(["unpack", "--json", "--driver", "objects", "--read-only",
                               "--store", str(store), "--image", f"{lay}:b",
                               str(btrfs / "b-ro")]))
    assert ro["driver"] == "objects"
    # a change in a btrfs bundle repacks into a layer with exactly that change
    (btrfs / "a/rootfs/etc/added").write_text("added\n")
    rep = _json_out(run_lamina(["repack", "--json", "--image", f"{lay}:a2", str(btrfs / "a")]))
    assert rep["added"] == 2          # etc (its mtime changed) and etc/added
    assert run_lamina(["fsck", "--store", str(store)]).returncode == 0
    # a bundle elsewhere than the store's filesystem: btrfs refuses clearly
    bad = run_lamina(["unpack", "--driver", "btrfs", "--store", str(store), "--image",
                      f"{lay}:a", "/var/tmp/lamina-test-not-btrfs-bundle"])
    assert bad.returncode != 0
    assert "not on the store's btrfs filesystem" in bad.stderr
    assert not os.path.exists("/var/tmp/lamina-test-not-btrfs-bundle")
    # lamina gc removes the per-chain subvolumes once no ref needs them; bundles stay
    assert run_lamina(["rmi", "--store", str(store), "layout:a", "layout:b"]).returncode == 0
    gc = run_lamina(["gc", "--store", str(store)])
    assert gc.returncode == 0, gc.stderr
    left = subprocess.run(["btrfs", "subvolume", "list", "-o", str(btrfs)], check=True,
                          capture_output=True, text=True).stdout
    assert "store/" not in left, left
    assert "a/rootfs" in left and "b/rootfs" in left
    assert (btrfs / "b/rootfs/usr/lib/big3").read_bytes() == _blob(3, 2 * MiB)
    assert run_lamina(["fsck", "--store", str(store)]).returncode == 0


CORPUS = Path("/var/tmp/lamina-corpus/oci")


@pytest.mark.skipif(not (CORPUS / "index.json").is_file(), reason="no corpus")
def test_corpus_app_objects_and_btrfs_equal_copy(tmp_path: Path) -> None:
    """The corpus app image (31,600 entries, whiteouts, xattrs, hardlinks)."""
    need_tool("btrfs")
    gen = _loopfs("btrfs", tmp_path, 6 << 30)
    try:
        _corpus_case(next(gen))
    finally:
        for _ in gen:
            pass


def _corpus_case(btrfs: Path) -> None:
    want = copy_tree(CORPUS, "app", btrfs / "copy")
    with open_store(btrfs / "store") as st:
        st.import_image(str(CORPUS), "app", "app:1")
        for name, fac, ro in (("btrfs", btrfs_factory, False),
                              ("objects", objects_factory, False),
                              ("objects-ro", objects_factory, True)):
            drv = fac.claim(request(st, "app:1", btrfs / name, read_only=ro))
            assert drv is not None
            drv.prepare()
            got = tree_manifest(str(btrfs / name / "rootfs"), mtime=True)
            assert diff_manifests(want, got, ignore_root=True,
                                  ignore_fields={"link_group"} if ro else ()) == [], name
        assert st.fsck(quick=True).problems == []
