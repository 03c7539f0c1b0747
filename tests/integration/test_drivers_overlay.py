"""The copy and overlay drivers on real overlay mounts, through the real CLI.

- the overlay driver's merged rootfs equals the copy driver's rootfs on an image
  covering whiteouts, opaque directories, hardlinks (also to lower layers),
  xattrs, devices, symlinked parents and implicit directories;
- a second image sharing lower layers extracts only its new layer;
- ``lamina umount`` removes the mount and keeps the changes;
- repack reads the upper directory: the new layer unpacks (lamina and umoci)
  to the edited tree, and ``--refresh-bundle`` makes the next repack contain
  only the next changes;
- concurrent unpacks sharing layers, SIGKILL in the middle of an unpack then
  retry, ``lamina fsck`` clean afterwards, no stray mounts;
- ``lamina drivers`` and driver errors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopfs import loop_fs, shared_extents

from conftest import LAMINA, need_tool, run_lamina
from lamina.drivers.manage import bundle_driver
from lamina.store import Store
from lamina.testing.images import build_image
from lamina.testing.layers import TarBuilder
from lamina.testing.tree import diff_manifests, tree_manifest

pytestmark = [pytest.mark.root]


def _layers() -> list[bytes]:
    l1 = (TarBuilder()
          .add_dir("etc").add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
          .add_file("etc/removeme", b"x").add_file("etc/keep", b"keep", mode=0o600, uid=7, gid=8)
          .add_dir("usr").add_dir("usr/lib", mode=0o750, uid=3)
          .add_file("usr/lib/libfoo", b"foo" * 1000, xattrs={"user.tag": b"lower"})
          .add_hardlink("usr/lib/libfoo.1", "usr/lib/libfoo")
          .add_symlink("lib", "usr/lib")
          .add_dir("dev").add_char("dev/null", 1, 3).add_block("dev/sda", 8, 0).add_fifo("dev/p")
          .add_dir("gone").add_file("gone/a", b"a").add_dir("gone/sub").add_file("gone/sub/b")
          .add_dir("opq", mode=0o711).add_file("opq/old1", b"1").add_file("opq/old2", b"2")
          .add_dir("both").add_file("both/lower", b"l")
          .add_file("bin-suid", b"#!", mode=0o4755)
          .build())
    l2 = (TarBuilder()
          .add_whiteout("gone")
          .add_whiteout("etc/removeme")
          .add_opaque("opq").add_file("opq/new", b"new")
          .add_file("etc/keep", b"changed", mode=0o640, uid=9, gid=9)
          .add_hardlink("usr/lib/libhl", "usr/lib/libfoo")      # to a lower layer's file
          .add_file("lib/vialink", b"through the symlinked parent")
          .add_file("implicit/deep/file", b"no parent entries")
          .add_dir("both").add_file("both/upper", b"u").add_whiteout("both")
          .add_file("etc/x", b"x", xattrs={"user.a": b"1", "trusted.t": b"2"})
          .build())
    l3 = (TarBuilder()
          .add_dir("usr/lib", mode=0o755)
          .add_file("usr/lib/libfoo", b"bar", xattrs={"user.tag": b"upper"})
          .add_whiteout("dev/p")
          .add_file("top", b"top")
          .build())
    return [l1, l2, l3]


@pytest.fixture
def layout(tmp_path: Path) -> str:
    lay = str(tmp_path / "layout")
    l1, l2, l3 = _layers()
    build_image(lay, "two", [l1, l2])
    build_image(lay, "three", [l1, l2, l3])
    other = TarBuilder().add_file("other", b"o").add_whiteout("top").build()
    build_image(lay, "sibling", [l1, l2, other])
    return lay


@pytest.fixture(params=["kernel", "fuse"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Kernel overlayfs, or fuse-overlayfs (the rootless fallback, forced as root)."""
    if request.param == "fuse":
        need_tool("fuse-overlayfs")
        monkeypatch.setenv("LAMINA_OVERLAY_FUSE", "1")
    return str(request.param)


@pytest.fixture
def bundles(tmp_path: Path) -> Iterator[list[str]]:
    """Bundle paths to create; every mount below them is removed at the end."""
    made: list[str] = []
    yield made
    for b in made:
        subprocess.run(["umount", "-l", os.path.join(b, "rootfs")], capture_output=True)


def _unpack(store: str, image: str, bundle: str, *extra: str) -> dict[str, object]:
    r = run_lamina(["unpack", "--driver", "overlay", "--store", store, "--image", image,
                    "--json", *extra, bundle])
    assert r.returncode == 0, r.stderr + r.stdout
    out: dict[str, object] = json.loads(r.stdout)
    return out


def _copy_unpack(image: str, bundle: str) -> None:
    r = run_lamina(["unpack", "--image", image, bundle])
    assert r.returncode == 0, r.stderr


def _mounts_under(path: str) -> list[str]:
    with open("/proc/self/mounts", encoding="utf-8") as f:
        return [line for line in f if path in line]


def test_overlay_rootfs_equals_copy(require_root: None, mode: str, layout: str,
                                    tmp_path: Path, bundles: list[str]) -> None:
    store = str(tmp_path / "store")
    for tag in ("two", "three"):
        ov, cp = str(tmp_path / f"ov-{tag}"), str(tmp_path / f"cp-{tag}")
        bundles.append(ov)
        res = _unpack(store, f"{layout}:{tag}", ov)
        assert res["driver"] == "overlay"
        assert os.path.ismount(os.path.join(ov, "rootfs"))
        kind = json.loads(Path(ov, "lamina.json").read_text())["mounts"][0]["type"]
        assert kind == ("overlay" if mode == "kernel" else "fuse.fuse-overlayfs")
        _copy_unpack(f"{layout}:{tag}", cp)
        a = tree_manifest(os.path.join(cp, "rootfs"))
        b = tree_manifest(os.path.join(ov, "rootfs"))
        assert diff_manifests(a, b, names=("copy", "overlay")) == []
        # the cases are really there
        assert "gone" not in b and "etc/removeme" not in b and "opq/old1" not in b
        # a hardlink to a lower layer's file keeps the whole group (libfoo.1 too)
        group = "usr/lib/libfoo" if tag == "two" else "usr/lib/libfoo.1"
        assert b["usr/lib/libhl"].get("link_group") == group
        assert b["usr/lib/libfoo.1"].get("link_group") == group
        assert "usr/lib/vialink" in b and "lib" in b and b["lib"]["type"] == "symlink"
        with open(os.path.join(ov, "config.json")) as f:
            assert json.load(f)["root"]["path"] == "rootfs"
    # the top layer's store extraction holds only that layer, in overlay format
    meta = json.loads(Path(tmp_path / "ov-three" / "lamina.json").read_text())
    top = Path(store) / "extract" / "overlay" / meta["chain_ids"][2].split(":")[1] / "diff"
    assert sorted(os.listdir(top)) == ["dev", "top", "usr"]
    wh = os.lstat(top / "dev" / "p")
    assert os.major(wh.st_rdev) == 0 and os.minor(wh.st_rdev) == 0


def test_shared_lower_layers_are_extracted_once(require_root: None, layout: str,
                                                tmp_path: Path, bundles: list[str]) -> None:
    store = str(tmp_path / "store")
    a, b, c = (str(tmp_path / n) for n in ("a", "b", "c"))
    bundles.extend([a, b, c])
    assert _unpack(store, f"{layout}:two", a)["reused"] == 0
    t1 = os.stat(Path(store) / "extract" / "overlay").st_mtime_ns
    res = _unpack(store, f"{layout}:three", b)
    assert res["reused"] == 2 and res["layers"] == 3
    res = _unpack(store, f"{layout}:sibling", c)
    assert res["reused"] == 2
    assert len(os.listdir(Path(store) / "extract" / "overlay")) == 4
    assert t1 > 0
    assert "top" not in os.listdir(os.path.join(c, "rootfs"))
    assert "other" in os.listdir(os.path.join(c, "rootfs"))


def test_umount_keeps_changes(require_root: None, layout: str, tmp_path: Path,
                              bundles: list[str]) -> None:
    store, b = str(tmp_path / "store"), str(tmp_path / "b")
    bundles.append(b)
    _unpack(store, f"{layout}:two", b)
    with bundle_driver(b) as drv:
        assert drv is not None and drv.name == "overlay"
        assert drv.mounts()[0].target == os.path.join(b, "rootfs")
        before = drv.usage(b)
        Path(b, "rootfs", "new").write_text("n")
        Path(b, "rootfs", "big").write_bytes(b"b" * (2 << 20))
        after = drv.usage(b)
    assert before.bytes < (1 << 20) and after.bytes - before.bytes >= 2 << 20  # upper only
    r = run_lamina(["umount", b])
    assert r.returncode == 0, r.stderr
    assert not os.path.ismount(os.path.join(b, "rootfs"))
    assert os.listdir(os.path.join(b, "rootfs")) == []
    assert Path(b, "upper", "new").read_text() == "n"
    assert _mounts_under(b) == []
    # idempotent; and a directory that is not a lamina bundle or mount is an error
    assert run_lamina(["umount", "--store", store, b]).returncode == 0
    r = run_lamina(["umount", str(tmp_path)])
    assert r.returncode == 3 and "not a lamina mount" in r.stderr


def _edit(root: str) -> None:
    Path(root, "added").write_text("added")
    Path(root, "etc", "passwd").write_text("root:x:0:0::/:/bin/sh\nu:x:5:5::/:/bin/sh\n")
    os.unlink(os.path.join(root, "etc", "keep"))
    shutil.rmtree(os.path.join(root, "both"))
    shutil.rmtree(os.path.join(root, "usr", "lib"))
    os.mkdir(os.path.join(root, "usr", "lib"))                   # removed and re-created
    Path(root, "usr", "lib", "fresh").write_text("fresh")
    os.chmod(os.path.join(root, "opq"), 0o700)
    os.chown(os.path.join(root, "opq", "new"), 11, 12)
    os.link(os.path.join(root, "added"), os.path.join(root, "added-link"))
    os.setxattr(os.path.join(root, "etc", "x"), "user.b", b"3")
    os.symlink("etc/passwd", os.path.join(root, "pw"))


def test_repack_reads_upper(require_root: None, mode: str, layout: str, tmp_path: Path,
                            bundles: list[str]) -> None:
    store, b = str(tmp_path / "store"), str(tmp_path / "b")
    bundles.append(b)
    _unpack(store, f"{layout}:two", b)
    rootfs = os.path.join(b, "rootfs")
    _edit(rootfs)
    edited = tree_manifest(rootfs)
    r = run_lamina(["repack", "--image", f"{layout}:edited", "--json", b])
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["layer"] and res["whiteouts"] >= 2
    cp = str(tmp_path / "check")
    _copy_unpack(f"{layout}:edited", cp)
    got = tree_manifest(os.path.join(cp, "rootfs"))
    assert diff_manifests(edited, got, names=("edited", "repacked")) == []
    # umoci reads the layer the same way
    umoci = need_tool("umoci")
    ub = str(tmp_path / "umoci")
    p = subprocess.run([umoci, "unpack", "--image", f"{layout}:edited", ub],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    uman = tree_manifest(os.path.join(ub, "rootfs"))
    assert diff_manifests(edited, uman, names=("edited", "umoci"), ignore_root=True) == []


@pytest.mark.parametrize("fs", ["tmp", "xfs"])
def test_repack_into_store_streams_the_changes(require_root: None, fs: str, layout: str,
                                               tmp_path: Path, bundles: list[str]) -> None:
    """``repack --image store:...`` sends the upper dir's changes as a splitdirfdstream
    naming the changed files: the store gets the very layer a layout repack writes
    (same diff_id), its image unpacks to the edited tree, and on a reflink
    filesystem the new objects share the bundle's extents (no data written)."""
    with contextlib.ExitStack() as stack:
        base = tmp_path if fs == "tmp" else stack.enter_context(loop_fs(fs, tmp_path))
        store, b = str(base / "store"), str(base / "b")
        bundles.append(b)
        _unpack(store, f"{layout}:two", b)
        rootfs = os.path.join(b, "rootfs")
        _edit(rootfs)
        big = os.urandom(1 << 20)
        Path(rootfs, "big").write_bytes(big)
        edited = tree_manifest(rootfs)
        env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000")
        r = run_lamina(["repack", "--image", f"store:{store}:edited:v1", "--json", b], env=env)
        assert r.returncode == 0, r.stderr
        into_store = json.loads(r.stdout)
        r = run_lamina(["repack", "--image", f"{layout}:edited", "--json", b], env=env)
        assert r.returncode == 0, r.stderr
        into_layout = json.loads(r.stdout)
        assert into_store["diff_id"] == into_layout["diff_id"]
        assert into_store["added"] == into_layout["added"] > 0
        assert into_store["whiteouts"] == into_layout["whiteouts"] >= 2

        cp = str(tmp_path / "check")
        r = run_lamina(["unpack", "--driver", "copy", "--store", store, "--image",
                        "edited:v1", cp])
        assert r.returncode == 0, r.stderr
        got = tree_manifest(os.path.join(cp, "rootfs"))
        assert diff_manifests(edited, got, names=("edited", "store repack")) == []
        with Store.open(store, create=False) as st:
            assert len(st.image("edited:v1").layers) == 3
            obj = st.object_path("sha256:" + hashlib.sha256(big).hexdigest())
            if fs != "tmp":
                assert shared_extents(Path(obj))    # cloned from the upper dir's file
        r = run_lamina(["fsck", "--store", store, "--json"])
        assert r.returncode == 0 and json.loads(r.stdout)["ok"], r.stdout
        r = run_lamina(["umount", b])     # before its filesystem goes
        assert r.returncode == 0, r.stderr


def test_repack_refresh_then_repack_again(require_root: None, layout: str, tmp_path: Path,
                                          bundles: list[str]) -> None:
    store, b = str(tmp_path / "store"), str(tmp_path / "b")
    bundles.append(b)
    _unpack(store, f"{layout}:two", b)
    rootfs = os.path.join(b, "rootfs")
    Path(rootfs, "first").write_text("1")
    r = run_lamina(["repack", "--image", f"{layout}:r1", "--refresh-bundle", "--json", b])
    assert r.returncode == 0, r.stderr
    assert os.path.ismount(rootfs) and os.listdir(os.path.join(b, "upper")) == []
    Path(rootfs, "second").write_text("2")
    os.unlink(os.path.join(rootfs, "first"))
    edited = tree_manifest(rootfs)
    r = run_lamina(["repack", "--image", f"{layout}:r2", "--json", b])
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["added"] == 1 and res["whiteouts"] == 1       # only the second round
    cp = str(tmp_path / "check")
    _copy_unpack(f"{layout}:r2", cp)
    assert diff_manifests(edited, tree_manifest(os.path.join(cp, "rootfs"))) == []


def test_concurrent_unpacks_share_layers(require_root: None, layout: str, tmp_path: Path,
                                         bundles: list[str]) -> None:
    store = str(tmp_path / "store")
    r = run_lamina(["import", "--store", store, f"{layout}:two", "base:1"])
    assert r.returncode == 0, r.stderr
    procs = []
    for i, tag in enumerate(["three", "sibling", "three", "sibling"]):
        b = str(tmp_path / f"b{i}")
        bundles.append(b)
        procs.append(subprocess.Popen(
            [*LAMINA, "unpack", "--driver", "overlay", "--store", store, "--image",
             f"{layout}:{tag}", "--json", b], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len(os.listdir(Path(store) / "extract" / "overlay")) == 4
    ref = tree_manifest(str(tmp_path / "b0" / "rootfs"))
    assert diff_manifests(ref, tree_manifest(str(tmp_path / "b2" / "rootfs"))) == []
    r = run_lamina(["fsck", "--store", store])
    assert r.returncode == 0, r.stdout + r.stderr


def test_sigkill_mid_unpack_then_retry(require_root: None, tmp_path: Path,
                                       bundles: list[str]) -> None:
    lay = str(tmp_path / "big")
    base = TarBuilder().add_file("base", b"b").build()
    tb = TarBuilder()
    for i in range(40):
        tb.add_file(f"d{i % 7}/f{i}", os.urandom(4 << 20))
    build_image(lay, "big", [base, tb.build()], compression="gzip")
    store, b = str(tmp_path / "store"), str(tmp_path / "b")
    bundles.append(b)
    r = run_lamina(["import", "--store", store, f"{lay}:big"])
    assert r.returncode == 0, r.stderr
    p = subprocess.Popen([*LAMINA, "unpack", "--driver", "overlay", "--store", store,
                          "--image", f"{lay}:big", b], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    tmp = Path(store) / "tmp"
    deadline = time.monotonic() + 60
    staged = False
    while time.monotonic() < deadline and p.poll() is None:
        # the top layer is being written through the detached overlay
        if any(Path(tmp, d, e).is_dir() for d in os.listdir(tmp) for e in
               (os.listdir(Path(tmp, d)) if Path(tmp, d).is_dir() else [])
               if e.startswith("extract-")):
            staged = True
            time.sleep(0.3)
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert staged, "the unpack finished before it could be killed"
    assert not os.path.exists(b)
    assert _mounts_under(store) == []          # the detached mount died with the process
    res = _unpack(store, f"{lay}:big", b)
    assert res["reused"] == 1
    assert len(os.listdir(os.path.join(b, "rootfs", "d0"))) == 6
    r = run_lamina(["fsck", "--store", store])
    assert r.returncode == 0, r.stdout + r.stderr


def test_drivers_command_and_errors(tmp_path: Path, layout: str) -> None:
    r = run_lamina(["drivers", "--json", "--store", str(tmp_path / "s")])
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    names = [d["name"] for d in doc["drivers"]]
    assert names.index("overlay") < names.index("copy")
    copy = next(d for d in doc["drivers"] if d["name"] == "copy")
    assert copy["can_run"] is True and copy["reason"] is None and copy["origin"] == "lamina"
    ov = next(d for d in doc["drivers"] if d["name"] == "overlay")
    assert ov["capabilities"]["mounts"] is True and ov["capabilities"]["needs_store"] is True
    assert ov["can_run"] is (os.geteuid() == 0) or ov["reason"]
    r = run_lamina(["drivers"])
    assert r.returncode == 0 and "can run here" in r.stdout
    r = run_lamina(["unpack", "--driver", "nosuch", "--image", f"{layout}:two",
                    str(tmp_path / "x")])
    assert r.returncode == 2 and "unknown driver 'nosuch'" in r.stderr
    r = run_lamina(["unpack", "--annotation", "novalue", "--image", f"{layout}:two",
                    str(tmp_path / "x")])
    assert r.returncode == 2 and "KEY=VALUE" in r.stderr
    assert not os.path.exists(tmp_path / "x")


def test_copy_driver_from_store_and_layout(layout: str, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    a, b, c = (str(tmp_path / n) for n in ("a", "b", "c"))
    r = run_lamina(["unpack", "--image", f"{layout}:three", a])
    assert r.returncode == 0, r.stderr
    r = run_lamina(["unpack", "--driver", "copy", "--store", store, "--image",
                    f"{layout}:three", "--json", b])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["driver"] == "copy"
    r = run_lamina(["unpack", "--driver", "copy", "--store", store, "--image", "layout:three",
                    c])
    assert r.returncode == 0, r.stderr
    ta = tree_manifest(os.path.join(a, "rootfs"))
    assert diff_manifests(ta, tree_manifest(os.path.join(b, "rootfs"))) == []
    assert diff_manifests(ta, tree_manifest(os.path.join(c, "rootfs"))) == []
    assert json.loads(Path(c, "lamina.json").read_text())["driver"] == "copy"


def test_gc_keeps_mounted_chains(require_root: None, layout: str, tmp_path: Path,
                                 bundles: list[str]) -> None:
    store, b = str(tmp_path / "store"), str(tmp_path / "b")
    bundles.append(b)
    _unpack(store, f"{layout}:three", b)
    ex = Path(store) / "extract" / "overlay"
    assert len(os.listdir(ex)) == 3
    r = run_lamina(["rmi", "--store", store, "layout:three"])
    assert r.returncode == 0, r.stderr
    assert run_lamina(["gc", "--store", store]).returncode == 0
    assert len(os.listdir(ex)) == 3                       # mounted: the chain is a GC root
    assert Path(b, "rootfs", "top").read_text() == "top"    # still readable
    assert Path(b, "rootfs", "usr", "lib", "libfoo.1").read_bytes() == b"foo" * 1000
    assert run_lamina(["umount", b]).returncode == 0
    r = run_lamina(["gc", "--store", store])
    assert r.returncode == 0, r.stderr
    assert os.listdir(ex) == []
    assert run_lamina(["fsck", "--store", store]).returncode == 0


def test_rootless_ownership_equals_copy(require_root: None, layout: str, tmp_path: Path,
                                        bundles: list[str]) -> None:
    """--rootless: ownership in the user.rootlesscontainers xattr, devices skipped,
    the same through the overlay as in a copy; repack reads it back."""
    store, ov, cp = (str(tmp_path / n) for n in ("store", "ov", "cp"))
    bundles.append(ov)
    _unpack(store, f"{layout}:three", ov, "--rootless")
    r = run_lamina(["unpack", "--rootless", "--image", f"{layout}:three", cp])
    assert r.returncode == 0, r.stderr
    a, b = tree_manifest(os.path.join(cp, "rootfs")), tree_manifest(os.path.join(ov, "rootfs"))
    assert diff_manifests(a, b, names=("copy", "overlay")) == []
    assert "user.rootlesscontainers" in b["etc/keep"].get("xattrs", {})
    Path(ov, "rootfs", "etc", "keep").write_text("edited")
    r = run_lamina(["repack", "--image", f"{layout}:rl", "--json", ov])
    assert r.returncode == 0, r.stderr
    chk = str(tmp_path / "chk")
    _copy_unpack(f"{layout}:rl", chk)
    st = os.lstat(os.path.join(chk, "rootfs", "etc", "keep"))
    assert (st.st_uid, st.st_gid) == (9, 9)          # the image's owner, from the xattr


def test_read_only_bundle(require_root: None, mode: str, layout: str, tmp_path: Path,
                          bundles: list[str]) -> None:
    store, b = str(tmp_path / "store"), str(tmp_path / "b")
    bundles.append(b)
    _unpack(store, f"{layout}:two", b, "--read-only")
    assert Path(b, "rootfs", "etc", "keep").read_bytes() == b"changed"
    with pytest.raises(OSError) as e:
        Path(b, "rootfs", "new").write_text("x")
    assert e.value.errno == 30                                   # EROFS
    assert json.loads(Path(b, "lamina.json").read_text())["options"]["read_only"] is True


def test_damaged_store_blob_is_a_clear_error(require_root: None, layout: str, tmp_path: Path,
                                             bundles: list[str]) -> None:
    store, b = str(tmp_path / "store"), str(tmp_path / "b")
    bundles.append(b)
    r = run_lamina(["import", "--store", store, f"{layout}:two", "img:1"])
    assert r.returncode == 0, r.stderr
    idx = json.loads(Path(layout, "index.json").read_text())
    mdesc = next(m for m in idx["manifests"]
                 if m["annotations"]["org.opencontainers.image.ref.name"] == "two")
    manifest = json.loads(Path(layout, "blobs", "sha256", mdesc["digest"][7:]).read_bytes())
    blob = Path(store, "blobs", "sha256", manifest["layers"][1]["digest"][7:])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.unlink()                          # a new file: the layout's hardlink stays intact
    blob.write_bytes(bytes(data))
    r = run_lamina(["unpack", "--driver", "overlay", "--store", store, "--image", "img:1", b])
    assert r.returncode in (5, 6), r.stderr          # digest mismatch (or corrupt stream)
    assert "error" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(b)
    ex = Path(store, "extract", "overlay")
    assert len(os.listdir(ex)) == 1                  # the bottom layer only, complete
    assert _mounts_under(store) == []
