"""lamina share: stored layers as world-readable lower dirs; the real fuse-overlayfs,
run as an unprivileged user, shows the image's owners and modes again."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need_tool, run_lamina
from lamina.testing.images import build_image
from lamina.testing.layers import TarBuilder
from lamina.testing.tree import diff_manifests, tree_manifest

pytestmark = [pytest.mark.root, pytest.mark.peer]
NOBODY = 65534


def image(layout: Path) -> None:
    l1 = (TarBuilder()
          .add_dir("etc", 0o755).add_file("etc/shadow", b"root:*:1::::::\n", mode=0o640, gid=42)
          .add_file("etc/secret", b"s", mode=0o600, uid=1000, gid=1000)
          .add_dir("usr/bin", 0o755).add_file("usr/bin/su", b"#!/bin/sh\n", mode=0o4755)
          .add_hardlink("usr/bin/su2", "usr/bin/su")
          .add_dir("home/u", 0o700, uid=1000, gid=1000).add_file("home/u/f", b"f", uid=1000)
          .add_dir("tmp", 0o1777).add_symlink("lib", "usr/lib", uid=0)
          .add_dir("gone").add_file("gone/x", b"x").add_dir("opq").add_file("opq/old", b"o")
          .add_file("xa", b"x", xattrs={"user.k": b"v1"}).build())
    l2 = (TarBuilder()
          .add_whiteout("gone").add_opaque("opq").add_file("opq/new", b"n", mode=0o2755)
          .add_file("etc/shadow", b"root:!:2::::::\n", mode=0o640, gid=42)
          .add_dir("var/empty", 0o711, uid=7, gid=7).build())
    build_image(str(layout), "t", [l1, l2], compression="gzip")


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory nobody can traverse (pytest's tmp_path is 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="lamina-share-", dir="/var/tmp"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fuse_overlayfs_as_nobody(tmp_path: Path) -> Iterator[list[tuple[subprocess.Popen[str], Path]]]:
    mounts: list[tuple[subprocess.Popen[str], Path]] = []
    yield mounts
    for proc, mnt in mounts:
        # a dead FUSE server leaves a mount that ismount() cannot stat: ask /proc
        with open("/proc/self/mounts") as f:
            if any(line.split()[1] == str(mnt) for line in f):
                subprocess.run(["umount", "-l", str(mnt)], check=False)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _mount_as_nobody(mounts: list[tuple[subprocess.Popen[str], Path]], lowerdir: str,
                     mnt: Path) -> None:
    """fuse-overlayfs serving as nobody.  /dev/fuse may be root-only (containers): root
    opens it and mounts, nobody's fuse-overlayfs serves the fd (libfuse's /dev/fd/N)."""
    exe = need_tool("fuse-overlayfs")
    mnt.mkdir()
    fd = os.open("/dev/fuse", os.O_RDWR)
    try:
        subprocess.run(["mount", "-i", "-t", "fuse.fuse-overlayfs", "-o",
                        f"fd={fd},rootmode=40000,user_id={NOBODY},group_id={NOBODY},"
                        "allow_other,default_permissions,ro", "fuse-overlayfs", str(mnt)],
                       pass_fds=(fd,), check=True)
        proc = subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", exe, "-f",
             "-o", f"lowerdir={lowerdir},xattr_permissions=2", f"/dev/fd/{fd}"],
            pass_fds=(fd,), stderr=subprocess.PIPE, text=True)
    finally:
        os.close(fd)
    mounts.append((proc, mnt))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if os.listdir(mnt):
                return
        except OSError:
            pass
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    raise AssertionError("fuse-overlayfs did not come up")


def test_shared_layers_show_image_permissions_under_fuse_overlayfs(
        tmp_path: Path, public_dir: Path,
        fuse_overlayfs_as_nobody: list[tuple[subprocess.Popen[str], Path]]) -> None:
    image(tmp_path / "l")
    store = public_dir / "store"
    r = run_lamina(["import", "-q", "--store", str(store), f"{tmp_path}/l:t", "img"])
    assert r.returncode == 0, r.stderr
    r = run_lamina(["share", "--json", "--store", str(store), "img"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["made"] == 2 and len(out["lowers"]) == 2
    # on disk: readable by everyone, no setuid bit, the image's mode in the xattr
    top, bottom = (Path(p) for p in out["lowers"])
    su = bottom / "usr/bin/su"
    assert stat.S_IMODE(su.stat().st_mode) == 0o755
    assert os.getxattr(su, "user.containers.override_stat") == b"0:0:04755"
    secret = bottom / "etc/secret"
    assert stat.S_IMODE(secret.stat().st_mode) & 0o444 == 0o444
    assert os.getxattr(secret, "user.containers.override_stat") == b"1000:1000:0600"
    assert (top / "gone").exists() is False and (top / ".wh.gone").exists()
    # a second share reuses the directories; one layer alone by its ChainID
    r = run_lamina(["share", "--json", "--store", str(store), "img"])
    assert json.loads(r.stdout)["made"] == 0
    chain = "sha256:" + bottom.name
    r = run_lamina(["share", "--json", "--store", str(store), chain])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["lowers"] == [str(bottom)]

    r = run_lamina(["unpack", "-q", "--image", f"{tmp_path}/l:t", str(tmp_path / "b")])
    assert r.returncode == 0, r.stderr
    mnt = public_dir / "merged"
    _mount_as_nobody(fuse_overlayfs_as_nobody, out["lowerdir"], mnt)
    want = tree_manifest(str(tmp_path / "b/rootfs"))
    got = tree_manifest(str(mnt))
    # fuse-overlayfs shows the override xattr itself; hard links are separate inodes to it
    for e in got.values():
        e["xattrs"].pop("user.containers.override_stat", None)
    diff = diff_manifests(want, got, names=("unpack", "fuse-overlayfs"),
                          ignore_fields={"link_group"}, ignore_root=True)
    assert diff == []
    assert (mnt / "etc/shadow").read_bytes() == b"root:!:2::::::\n"
    # nobody could read the 0600 file's bytes only because the lower is shared
    r2 = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                         "cat", str(secret)], capture_output=True)
    assert r2.returncode == 0 and r2.stdout == b"s"
    st = os.stat(store)
    assert stat.S_IMODE(st.st_mode) == 0o711
    assert stat.S_IMODE(os.stat(store / "blobs").st_mode) == 0o700


def test_share_unknown_image_or_layer(tmp_path: Path) -> None:
    r = run_lamina(["share", "--store", str(tmp_path / "s"), "nope"])
    assert r.returncode == 3, r.stderr
    r = run_lamina(["share", "--store", str(tmp_path / "s"), "sha256:" + "a" * 64])
    assert r.returncode == 3, r.stderr


@pytest.mark.skipif(not os.path.isdir("/var/tmp/lamina-corpus/oci"), reason="corpus not built")
def test_corpus_app_shared_equals_full_unpack(
        tmp_path: Path, public_dir: Path,
        fuse_overlayfs_as_nobody: list[tuple[subprocess.Popen[str], Path]]) -> None:
    # real layers: hard links, setuid binaries, a whiteout below a file of the same layer
    img = "/var/tmp/lamina-corpus/oci:app"
    store = public_dir / "store"
    r = run_lamina(["import", "-q", "--store", str(store), img, "app"])
    assert r.returncode == 0, r.stderr
    r = run_lamina(["share", "--json", "--store", str(store), "app"])
    assert r.returncode == 0, r.stderr
    lowerdir = json.loads(r.stdout)["lowerdir"]
    r = run_lamina(["unpack", "-q", "--image", img, str(tmp_path / "b")])
    assert r.returncode == 0, r.stderr
    mnt = public_dir / "merged"
    _mount_as_nobody(fuse_overlayfs_as_nobody, lowerdir, mnt)
    got = tree_manifest(str(mnt))
    for e in got.values():
        e["xattrs"].pop("user.containers.override_stat", None)
    diff = diff_manifests(tree_manifest(str(tmp_path / "b/rootfs")), got,
                          names=("unpack", "fuse-overlayfs"), ignore_fields={"link_group"},
                          ignore_root=True)
    assert diff == []
