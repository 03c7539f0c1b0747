"""The unpack command as users run it: exit codes, JSON, interrupts, platforms, rootless."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import LAMINA, run_lamina
from lamina.testing.images import build_image, build_index_image
from lamina.testing.layers import TarBuilder
from lamina.testing.tree import diff_manifests, tree_manifest


def small(layout: Path, tag: str = "t") -> None:
    build_image(str(layout), tag, [TarBuilder().add_dir("etc")
                                   .add_file("etc/hello", b"hi\n").build()],
                config={"Cmd": ["/bin/true"]})


def many_files(layout: Path, n: int = 30000) -> None:
    tb = TarBuilder()
    for d in range(30):
        tb.add_dir(f"d{d}")
    for i in range(n):
        tb.add_file(f"d{i % 30}/f{i}", b"x" * 512)
    build_image(str(layout), "big", [tb.build()], compression="gzip")


def test_json_summary_and_bundle_files(tmp_path: Path) -> None:
    small(tmp_path / "l")
    r = run_lamina(["unpack", "--json", "--image", f"{tmp_path}/l:t", str(tmp_path / "b")])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["layers"] == 1 and out["files"] == 1 and out["bundle"] == str(tmp_path / "b")
    assert out["manifest"].startswith("sha256:")
    assert sorted(os.listdir(tmp_path / "b")) == ["config.json", "lamina.json",
                                                  "lamina.snapshot", "rootfs"]
    assert (tmp_path / "b/rootfs/etc/hello").read_text() == "hi\n"
    meta = json.loads((tmp_path / "b/lamina.json").read_text())
    assert meta["manifest"] == out["manifest"] and len(meta["diff_ids"]) == 1


def test_existing_bundle_and_missing_tag(tmp_path: Path) -> None:
    small(tmp_path / "l")
    (tmp_path / "b").mkdir()
    (tmp_path / "b/x").write_text("keep")
    r = run_lamina(["unpack", "--image", f"{tmp_path}/l:t", str(tmp_path / "b")])
    assert r.returncode == 8 and "already exists" in r.stderr
    assert (tmp_path / "b/x").read_text() == "keep"
    r = run_lamina(["unpack", "--json", "--image", f"{tmp_path}/l:nope", str(tmp_path / "c")])
    assert r.returncode == 3
    err = json.loads(r.stdout)
    assert err["error"] == "not-found" and "t" in err["hint"]
    assert not (tmp_path / "c").exists()
    r = run_lamina(["unpack", "--image", f"{tmp_path}/nolayout:t", str(tmp_path / "c")])
    assert r.returncode == 3 and "not an OCI image layout" in r.stderr
    r = run_lamina(["unpack", "--bogus"])
    assert r.returncode == 2


def test_empty_existing_dir_is_accepted(tmp_path: Path) -> None:
    small(tmp_path / "l")
    (tmp_path / "b").mkdir()
    r = run_lamina(["unpack", "-q", "--image", f"{tmp_path}/l:t", str(tmp_path / "b")])
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert (tmp_path / "b/rootfs/etc/hello").exists()


def test_platform_selection_from_an_index(tmp_path: Path) -> None:
    layers = {arch: [TarBuilder().add_file("arch", arch.encode()).build()]
              for arch in ("amd64", "arm64", "s390x")}
    build_index_image(str(tmp_path / "l"), "multi",
                      [(("linux", a), layers[a]) for a in layers])
    for arch in ("arm64", "s390x"):
        b = tmp_path / f"b-{arch}"
        r = run_lamina(["unpack", "--platform", f"linux/{arch}", "--image",
                        f"{tmp_path}/l:multi", str(b)])
        assert r.returncode == 0, r.stderr
        assert (b / "rootfs/arch").read_text() == arch
    r = run_lamina(["unpack", "--platform", "linux/mips64", "--image", f"{tmp_path}/l:multi",
                    str(tmp_path / "nope")])
    assert r.returncode == 3 and "linux/arm64" in r.stderr


def _interrupt(tmp_path: Path, sig: int) -> tuple[int, Path]:
    many_files(tmp_path / "l")
    bundle = tmp_path / "b"
    p = subprocess.Popen([*LAMINA, "unpack", "-q", "--image", f"{tmp_path}/l:big", str(bundle)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # wait until extraction has visibly started, then interrupt
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(e.name.startswith(".b.lamina-") and (Path(e.path) / "rootfs/d0").exists()
               for e in os.scandir(tmp_path)):
            break
        time.sleep(0.01)
    p.send_signal(sig)
    p.communicate(timeout=60)
    return p.returncode, bundle


def test_sigterm_leaves_nothing(tmp_path: Path) -> None:
    rc, bundle = _interrupt(tmp_path, signal.SIGTERM)
    assert rc == 130
    assert not bundle.exists()
    assert [e for e in os.listdir(tmp_path) if e.startswith(".b.")] == []


def test_sigkill_then_retry(tmp_path: Path) -> None:
    rc, bundle = _interrupt(tmp_path, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert not bundle.exists()  # nothing that looks like a bundle
    stale = [e for e in os.listdir(tmp_path) if e.startswith(".b.lamina-")]
    assert len(stale) == 1 and not (tmp_path / stale[0] / "lamina.json").exists()
    r = run_lamina(["unpack", "-q", "--image", f"{tmp_path}/l:big", str(bundle)])
    assert r.returncode == 0, r.stderr
    assert len(os.listdir(bundle / "rootfs/d0")) == 1000
    assert [e for e in os.listdir(tmp_path) if e.startswith(".b.")] == []  # stale stage reclaimed


def _as_nobody(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) not installed")
    env = dict(os.environ, HOME=str(cwd), PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                           *LAMINA, *args], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.fixture
def world_path() -> Iterator[Path]:
    """A directory every user can reach (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="lamina-test-", dir="/var/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_rootless_as_an_unprivileged_user(world_path: Path, require_root: None) -> None:
    work = world_path / "work"
    work.mkdir()
    build_image(str(work / "l"), "t", [
        TarBuilder().add_dir("etc").add_file("etc/owned", b"x", uid=1000, gid=42)
        .add_file("etc/suid", b"x", mode=0o4755).add_char("dev-null", 1, 3)
        .add_dir("ro", mode=0o555).add_file("ro/f", b"in a read-only dir").build()])
    shutil.chown(work, 65534, 65534)
    for root, dirs, files in os.walk(work):
        for n in dirs + files:
            shutil.chown(os.path.join(root, n), 65534, 65534)
    r = _as_nobody(["unpack", "--image", f"{work}/l:t", str(work / "b")], work)
    assert r.returncode == 10 and "--rootless" in r.stderr
    r = _as_nobody(["unpack", "--rootless", "--image", f"{work}/l:t", str(work / "b")], work)
    assert r.returncode == 0, r.stderr
    assert "device node" in r.stderr
    rootfs = work / "b/rootfs"
    st = os.stat(rootfs / "etc/owned")
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    assert os.getxattr(rootfs / "etc/owned", "user.rootlesscontainers") == b"\x08\xe8\x07\x10\x2a"
    assert os.stat(rootfs / "etc/suid").st_mode & 0o7777 == 0o4755
    assert not (rootfs / "dev-null").exists()
    assert os.stat(rootfs / "ro").st_mode & 0o777 == 0o555
    cfg = json.loads((work / "b/config.json").read_text())
    assert {"type": "user"} in cfg["linux"]["namespaces"]
    assert cfg["linux"]["uidMappings"] == [{"containerID": 0, "hostID": 65534, "size": 1}]


def test_uid_map(tmp_path: Path, require_root: None) -> None:
    build_image(str(tmp_path / "l"), "t", [TarBuilder().add_file("f", b"x", uid=5, gid=6)
                                           .add_file("g", b"y").build()])
    r = run_lamina(["unpack", "--uid-map", "0:100000:65536", "--gid-map", "0:200000:65536",
                    "--image", f"{tmp_path}/l:t", str(tmp_path / "b")])
    assert r.returncode == 0, r.stderr
    st = os.stat(tmp_path / "b/rootfs/f")
    assert (st.st_uid, st.st_gid) == (100005, 200006)
    assert os.stat(tmp_path / "b/rootfs/g").st_uid == 100000
    r = run_lamina(["unpack", "--uid-map", "0:100000:3", "--image", f"{tmp_path}/l:t",
                    str(tmp_path / "c")])
    assert r.returncode == 7 and "uid 5" in r.stderr
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("comp", ["gzip", "zstd", "none", "nd-gzip", "nd-zstd", "docker-gzip"])
def test_every_layer_media_type(tmp_path: Path, comp: str) -> None:
    l1 = TarBuilder().add_dir("a").add_file("a/f", os.urandom(70000)).build()
    l2 = TarBuilder().add_whiteout("a/f").add_file("a/g", b"g").build()
    build_image(str(tmp_path / "ref"), "t", [l1, l2], compression="none")
    build_image(str(tmp_path / "l"), "t", [l1, l2], compression=comp)
    assert run_lamina(["unpack", "-q", "--image", f"{tmp_path}/ref:t",
                       str(tmp_path / "r")]).returncode == 0
    r = run_lamina(["unpack", "-q", "--image", f"{tmp_path}/l:t", str(tmp_path / "b")])
    assert r.returncode == 0, r.stderr
    assert diff_manifests(tree_manifest(str(tmp_path / "r/rootfs")),
                          tree_manifest(str(tmp_path / "b/rootfs"))) == []
    assert sorted(os.listdir(tmp_path / "b/rootfs/a")) == ["g"]
