"""lamina mount --driver lazy: the FUSE tree equals a full unpack, contents are fetched
only when read, and the mount goes away on every exit path."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lazy_mounts import guard_lazy_mounts, unmount, unmount_all

from conftest import run_lamina
from lamina.oci.layout import OCILayout
from lamina.testing.images import build_image
from lamina.testing.layers import TarBuilder
from lamina.testing.tree import diff_manifests, tree_manifest

pytestmark = [pytest.mark.root]
CORPUS = "/var/tmp/lamina-corpus/oci"
STATS = "user.lamina.lazy.stats"


@pytest.fixture(scope="module", autouse=True)
def no_leftover_mounts() -> Iterator[None]:
    yield from guard_lazy_mounts()


@pytest.fixture
def run_env(tmp_path: Path) -> dict[str, str]:
    return {"LAMINA_RUN_DIR": str(tmp_path / "run")}


@pytest.fixture
def mounted(run_env: dict[str, str]) -> Iterator[list[Path]]:
    """Mount points made by a test; each is unmounted in the finalizer."""
    points: list[Path] = []
    yield points
    unmount_all(points, run_env)


def _mount(layout: str, mnt: Path, env: dict[str, str], *extra: str) -> dict[str, object]:
    mnt.mkdir(exist_ok=True)
    r = run_lamina(["mount", "--json", *extra, layout, str(mnt)], env=env)
    assert r.returncode == 0, r.stderr
    assert os.path.ismount(mnt)
    out: dict[str, object] = json.loads(r.stdout)
    return out


def _stats(mnt: Path) -> dict[str, int]:
    got: dict[str, int] = json.loads(os.getxattr(mnt, STATS))
    return got


def _unpack(layout: str, bundle: Path) -> Path:
    r = run_lamina(["unpack", "-q", "--image", layout, str(bundle)])
    assert r.returncode == 0, r.stderr
    return bundle / "rootfs"


def layered_image(layout: Path, compression: list[str]) -> None:
    """Three layers exercising what a merged view must get right."""
    big = os.urandom(3 << 20)
    l1 = (TarBuilder()
          .add_dir("etc", 0o755).add_file("etc/os-release", b"ID=test\n")
          .add_file("etc/shadow", b"root:*:1::::::\n", mode=0o640, gid=42)
          .add_dir("usr/bin", 0o755).add_file("usr/bin/tool", b"#!/bin/sh\n", mode=0o4755)
          .add_hardlink("usr/bin/tool2", "usr/bin/tool")
          .add_symlink("bin", "usr/bin").add_file("usr/big", big)
          .add_dir("gone").add_file("gone/a", b"a").add_dir("opq").add_file("opq/old", b"o")
          .add_file("replaced", b"file").add_char("dev-null", 1, 3)
          .add_fifo("fifo", mode=0o600)
          .add_file("xa", b"x", xattrs={"user.k": b"v1", "trusted.t": b"\x00\x01"})
          .add_dir("sticky", 0o1777, uid=1000, gid=1000).build())
    l2 = (TarBuilder()
          .add_whiteout("gone").add_opaque("opq").add_file("opq/new", b"n")
          .add_dir("replaced", 0o700, uid=5)
          .add_file("bin/via-link", b"written through a parent symlink")
          .add_file("implicit/deep/file", b"parents are implicit", uid=7, gid=8)
          .add_file("usr/big2", big[: 1 << 20] + b"tail").build())
    l3 = (TarBuilder()
          .add_file("etc/os-release", b"ID=top\n", mode=0o600)
          .add_whiteout("usr/bin/tool2").add_hardlink("etc/tool-link", "usr/bin/tool")
          .add_dir("etc", 0o750, uid=3, xattrs={"user.dir": b"d"})
          .add_symlink("dangling", "/nowhere").build())
    build_image(str(layout), "t", [l1, l2, l3], compression=compression)


@pytest.mark.parametrize("compression", [["gzip", "gzip", "gzip"], ["zstd", "none", "gzip"]])
def test_tree_matches_full_unpack(tmp_path: Path, run_env: dict[str, str],
                                  mounted: list[Path], compression: list[str]) -> None:
    layered_image(tmp_path / "l", compression)
    img = f"{tmp_path}/l:t"
    full = _unpack(img, tmp_path / "b")
    mnt = tmp_path / "mnt"
    mounted.append(mnt)
    out = _mount(img, mnt, run_env)
    assert out["indexes_built"] == 3 and out["layers"] == 3
    # stat, readdir, readlink and xattrs alone fetch nothing
    for root, _dirs, files in os.walk(mnt):
        for f in files:
            os.lstat(os.path.join(root, f))
    assert _stats(mnt)["files_fetched"] == 0 and _stats(mnt)["blob_bytes_read"] == 0
    diff = diff_manifests(tree_manifest(str(full)), tree_manifest(str(mnt)),
                          names=("unpack", "lazy"))
    assert diff == []
    # hard links share the inode, the tree is read-only
    assert os.stat(mnt / "usr/bin/tool").st_ino == os.stat(mnt / "etc/tool-link").st_ino
    assert os.stat(mnt / "usr/bin/tool").st_nlink == 2
    with pytest.raises(OSError) as ei:
        (mnt / "etc/new").write_text("x")
    assert ei.value.errno == errno.EROFS
    unmount(mnt, run_env)


def test_only_read_files_are_fetched(tmp_path: Path, run_env: dict[str, str],
                                     mounted: list[Path]) -> None:
    layered_image(tmp_path / "l", ["gzip", "gzip", "gzip"])
    img = f"{tmp_path}/l:t"
    r = run_lamina(["lazy-index", "--json", img])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["built"] == 3
    mnt = tmp_path / "mnt"
    mounted.append(mnt)
    out = _mount(img, mnt, run_env, "--no-index")
    assert out["indexes_built"] == 0
    assert _stats(mnt)["files_fetched"] == 0
    with open(mnt / "etc/os-release", "rb") as f:   # open alone fetches nothing
        assert _stats(mnt)["files_fetched"] == 0
        assert f.read() == b"ID=top\n"
    s = _stats(mnt)
    assert s["files_fetched"] == 1 and s["file_bytes_fetched"] == 7
    total = sum(p.stat().st_size for p in (tmp_path / "l/blobs/sha256").iterdir())
    # the 3 MiB random file's layer is ~3 MiB compressed; a 7-byte file costs far less
    assert 0 < s["blob_bytes_read"] < total / 10
    # the tail of a big file: inflated from the nearest checkpoint, verified
    assert (mnt / "usr/big2").read_bytes()[-4:] == b"tail"
    s2 = _stats(mnt)
    assert s2["files_fetched"] == 2 and s2["file_bytes_fetched"] == 7 + (1 << 20) + 4
    # a second read comes from the cache
    assert (mnt / "etc/os-release").read_bytes() == b"ID=top\n"
    assert _stats(mnt)["blob_bytes_read"] == s2["blob_bytes_read"]
    unmount(mnt, run_env)


def test_corrupt_content_is_an_io_error(tmp_path: Path, run_env: dict[str, str],
                                        mounted: list[Path]) -> None:
    data = b"genuine content " * 100
    build_image(str(tmp_path / "l"), "t", [TarBuilder().add_file("f", data).build()],
                compression="none")
    img = f"{tmp_path}/l:t"
    assert run_lamina(["lazy-index", img]).returncode == 0
    blob = next(p for p in (tmp_path / "l/blobs/sha256").iterdir() if p.stat().st_size > 1024)
    raw = blob.read_bytes()
    i = raw.index(data)
    blob.write_bytes(raw[:i] + b"X" + raw[i + 1:])   # after indexing: the blob was swapped
    mnt = tmp_path / "mnt"
    mounted.append(mnt)
    _mount(img, mnt, run_env, "--no-index")
    with pytest.raises(OSError) as ei:
        (mnt / "f").read_bytes()
    assert ei.value.errno == errno.EIO
    assert _stats(mnt)["files_fetched"] == 0
    unmount(mnt, run_env)


def test_bad_input_is_refused_before_mounting(tmp_path: Path, run_env: dict[str, str]) -> None:
    layered_image(tmp_path / "l", ["gzip", "gzip", "gzip"])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = run_lamina(["mount", "--no-index", f"{tmp_path}/l:t", str(mnt)], env=run_env)
    assert r.returncode == 3 and "lazy-index" in r.stderr
    r = run_lamina(["mount", f"{tmp_path}/l:nope", str(mnt)], env=run_env)
    assert r.returncode == 3
    # a damaged blob: the index build verifies the digest and writes nothing
    blob = max((tmp_path / "l/blobs/sha256").iterdir(), key=lambda p: p.stat().st_size)
    blob.write_bytes(blob.read_bytes()[:-10])
    r = run_lamina(["mount", f"{tmp_path}/l:t", str(mnt)], env=run_env)
    assert r.returncode == 5, r.stderr
    assert not os.path.ismount(mnt)
    assert not any(p.name.endswith(".json") and blob.name in p.name
                   for p in (tmp_path / "l/.lamina-lazy").iterdir())
    r = run_lamina(["mount", f"{tmp_path}/l:t", str(tmp_path / "missing")], env=run_env)
    assert r.returncode == 2


def _daemon_pid(out: dict[str, object]) -> int:
    pid = out["pid"]
    assert isinstance(pid, int)
    return pid


def _wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_sigterm_and_external_umount_unmount_cleanly(tmp_path: Path, run_env: dict[str, str],
                                                    mounted: list[Path]) -> None:
    layered_image(tmp_path / "l", ["gzip", "gzip", "gzip"])
    img = f"{tmp_path}/l:t"
    cache = tmp_path / "cache"
    stats = tmp_path / "stats.json"
    mnt = tmp_path / "mnt"
    mounted.append(mnt)
    out = _mount(img, mnt, run_env, "--stats", str(stats))
    assert (mnt / "etc/os-release").read_bytes() == b"ID=top\n"
    pid = _daemon_pid(out)
    os.kill(pid, signal.SIGTERM)
    assert _wait_gone(pid)
    assert not os.path.ismount(mnt)
    assert json.loads(stats.read_text())["files_fetched"] == 1
    assert isinstance(out["cache"], str) and not os.path.exists(out["cache"])  # private cache
    # umount(8) from outside: the daemon notices and exits; a kept cache stays
    out = _mount(img, mnt, run_env, "--cache", str(cache))
    assert (mnt / "usr/bin/tool").read_bytes() == b"#!/bin/sh\n"
    subprocess.run(["umount", str(mnt)], check=True)
    assert _wait_gone(_daemon_pid(out))
    assert any(len(p.name) == 64 for p in cache.iterdir())
    # SIGKILL: the mount is dead; lamina umount still removes it and the private cache
    out = _mount(img, mnt, run_env)
    assert (mnt / "etc/os-release").read_bytes() == b"ID=top\n"
    os.kill(_daemon_pid(out), signal.SIGKILL)
    assert _wait_gone(_daemon_pid(out))
    assert isinstance(out["cache"], str) and os.path.isdir(out["cache"])
    unmount(mnt, run_env)
    assert not os.path.exists(out["cache"])


def test_writable_overlay_on_top(tmp_path: Path, run_env: dict[str, str],
                                 mounted: list[Path]) -> None:
    layered_image(tmp_path / "l", ["gzip", "gzip", "gzip"])
    img = f"{tmp_path}/l:t"
    mnt, state = tmp_path / "mnt", tmp_path / "state"
    mounted.append(mnt)
    out = _mount(img, mnt, run_env, "--writable", str(state))
    assert out["lower"] == str(state / "lower")
    (mnt / "etc/added").write_text("new\n")
    with open(mnt / "etc/os-release", "a") as f:   # copy-up reads the lazy lower
        f.write("X=1\n")
    os.unlink(mnt / "usr/big")
    assert (state / "upper/etc/added").read_text() == "new\n"
    assert (state / "upper/etc/os-release").read_text() == "ID=top\nX=1\n"
    assert os.stat(state / "upper/usr/big", follow_symlinks=False).st_rdev == 0  # whiteout
    pid = _daemon_pid(out)
    unmount(mnt, run_env)
    assert _wait_gone(pid)
    assert not os.path.ismount(state / "lower")
    assert (state / "upper/etc/added").exists()


@pytest.mark.skipif(not os.path.isdir(CORPUS), reason="corpus not built")
def test_corpus_app_matches_full_unpack(tmp_path: Path, run_env: dict[str, str],
                                        mounted: list[Path]) -> None:
    # a private layout (hard-linked blobs): indexes must not land in the shared corpus
    lay = tmp_path / "oci"
    shutil.copytree(CORPUS, lay, copy_function=os.link)
    img = f"{lay}:app"
    full = _unpack(img, tmp_path / "b")
    mnt = tmp_path / "mnt"
    mounted.append(mnt)
    _mount(img, mnt, run_env)
    assert (mnt / "etc/os-release").read_text().startswith("PRETTY_NAME=")
    s = _stats(mnt)
    total = sum(p.stat().st_size for p in (lay / "blobs/sha256").iterdir())
    assert s["files_fetched"] == 1 and s["blob_bytes_read"] < total * 0.05
    diff = diff_manifests(tree_manifest(str(full)), tree_manifest(str(mnt)),
                          names=("unpack", "lazy"))
    assert diff == []
    unmount(mnt, run_env)


def test_lazy_driver_bundle_repack(tmp_path: Path) -> None:
    layered_image(tmp_path / "l", ["gzip", "zstd", "gzip"])
    img = f"{tmp_path}/l:t"
    bundle = tmp_path / "b"
    r = run_lamina(["unpack", "--driver", "lazy", "--image", img, str(bundle)])
    try:
        assert r.returncode == 0, r.stderr
        meta = json.loads((bundle / "lamina.json").read_text())
        assert meta["driver"] == "lazy" and os.path.ismount(bundle / "rootfs")
        assert json.loads((bundle / "config.json").read_text())["root"]["path"] == "rootfs"
        (bundle / "rootfs/etc/added").write_text("new\n")
        os.unlink(bundle / "rootfs/usr/big")
        r = run_lamina(["repack", "--image", f"{tmp_path}/l:t2", str(bundle)])
        assert r.returncode == 0, r.stderr
    finally:
        assert run_lamina(["umount", str(bundle)]).returncode == 0
    assert not os.path.ismount(bundle / "rootfs") and not os.path.ismount(bundle / "lower")
    # the repacked image, unpacked in full, has the change on top of the original tree
    old = tree_manifest(str(_unpack(img, tmp_path / "b1")))
    new = tree_manifest(str(_unpack(f"{tmp_path}/l:t2", tmp_path / "b2")))
    assert sorted(set(new) - set(old)) == ["etc/added"]
    assert sorted(set(old) - set(new)) == ["usr/big"]
    # a store image is refused clearly
    r = run_lamina(["unpack", "--driver", "lazy", "--store", str(tmp_path / "s"),
                    "--image", img, str(tmp_path / "b3")])
    assert r.returncode == 9 and "store" in r.stderr
    assert not (tmp_path / "b3").exists()


def test_lookup_hook_provides_a_missing_blob(tmp_path: Path, run_env: dict[str, str],
                                             mounted: list[Path]) -> None:
    tb = TarBuilder().add_dir("etc").add_file("etc/a", b"alpha\n").add_file("etc/b", b"beta\n")
    build_image(str(tmp_path / "l"), "t", [tb.build()], compression="gzip")
    img = f"{tmp_path}/l:t"
    assert run_lamina(["lazy-index", img]).returncode == 0
    # the layer blob leaves the layout (as if pulled lazily); another layout has it
    other = tmp_path / "other/blobs/sha256"
    other.mkdir(parents=True)
    layer = OCILayout.open(str(tmp_path / "l")).resolve("t").layers[0]
    blob = tmp_path / "l/blobs/sha256" / layer.hex
    blob.rename(other / blob.name)
    log = tmp_path / "hook.log"
    hook = tmp_path / "fetch-layer"
    hook.write_text(f"#!/bin/sh\ncat >> {log}\necho >> {log}\necho {tmp_path / 'other'}\n")
    hook.chmod(0o755)
    hooks = tmp_path / "hooks.toml"
    hooks.write_text(f'[["lookup"]]\npath = "{hook}"\n')
    mnt = tmp_path / "mnt"
    mounted.append(mnt)
    _mount(img, mnt, run_env, "--no-index", "--hooks", str(hooks))
    assert not log.exists()                  # nothing asked before data is needed
    assert (mnt / "etc/a").read_bytes() == b"alpha\n"
    assert (mnt / "etc/b").read_bytes() == b"beta\n"
    events = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    assert len(events) == 1                  # once per layer
    assert events[0]["event"] == "lookup" and events[0]["layer"]["digest"].endswith(blob.name)
    unmount(mnt, run_env)
