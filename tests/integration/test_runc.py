"""A real runtime runs bundles lamina unpacked (and repacked): ``runc run``.

The image is made from this host's own binaries (``dash``, ``env``, ``id``,
``cat`` and the shared libraries ``ldd`` lists for them) packed with the test
kit, so the test needs nothing but runc and works offline.  When the Debian
corpus is present its ``base`` image is run too.

lamina's ``config.json`` is used as generated (``process.terminal`` is false,
the default namespaces, mounts and cgroup settings); the tests only replace
``process.args`` where they need another command.  runc gets a private
``--root`` state directory and every container is ``runc delete -f``'d.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need_tool, run_lamina
from lamina.testing.images import build_image
from lamina.testing.layers import TarBuilder

pytestmark = [pytest.mark.usefixtures("require_root"), pytest.mark.peer]

CORPUS = "/var/tmp/lamina-corpus/oci"
BINARIES = ("dash", "env", "id", "cat", "ls")


def host_binaries() -> dict[str, str]:
    """name -> real path of each binary; skips when one is missing."""
    out = {}
    for name in BINARIES:
        p = shutil.which(name)
        if p is None:
            pytest.skip(f"host has no {name} to build a rootfs from")
        out[name] = os.path.realpath(p)
    return out


def shared_libs(binary: str) -> set[str]:
    """Absolute paths of the libraries (and the loader) *binary* loads, as ldd finds them."""
    ldd = need_tool("ldd")
    r = subprocess.run([ldd, binary], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        if "not a dynamic executable" in r.stdout + r.stderr:
            return set()
        raise AssertionError(f"ldd {binary}: {r.stderr}")
    libs = set()
    for line in r.stdout.splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            libs.add(m.group(1))
    return libs


def rootfs_layer() -> bytes:
    """A layer with /usr/bin/{dash,env,id,cat,ls}, their libraries, sh -> dash, the
    usual mount points and /etc/passwd + /etc/group."""
    t = TarBuilder()
    dirs: set[str] = set()

    def parents(path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                t.add_dir(d)

    files: dict[str, str] = {}      # image path -> host file
    for name, real in host_binaries().items():
        files[f"usr/bin/{name}"] = real
        for lib in shared_libs(real):
            files[lib.lstrip("/")] = os.path.realpath(lib)
    for path in sorted(files):
        parents(path)
        with open(files[path], "rb") as f:
            t.add_file(path, f.read(), mode=0o755)
    t.add_symlink("usr/bin/sh", "dash")
    if "bin" not in dirs:
        t.add_symlink("bin", "usr/bin")
    for d in ("proc", "sys", "dev", "tmp", "etc", "work", "home", "home/app"):
        if d not in dirs:
            dirs.add(d)
            t.add_dir(d, mode=0o1777 if d == "tmp" else 0o755,
                      uid=1000 if d == "home/app" else 0, gid=1000 if d == "home/app" else 0)
    t.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                             b"app:x:1000:1000:app:/home/app:/bin/sh\n")
    t.add_file("etc/group", b"root:x:0:\napp:x:1000:\nextra:x:2000:app\n")
    return t.build()


def lamina_ok(*args: str) -> None:
    r = run_lamina(list(args))
    assert r.returncode == 0, r.stderr + r.stdout


class Runc:
    def __init__(self, state: Path) -> None:
        self.bin = need_tool("runc")
        self.state = state
        self.ids: list[str] = []

    def run(self, bundle: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cid = f"ctr-{uuid.uuid4().hex[:12]}"
        self.ids.append(cid)
        return subprocess.run([self.bin, "--root", str(self.state), "run", "-b", str(bundle),
                               cid], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def cleanup(self) -> None:
        for cid in self.ids:
            subprocess.run([self.bin, "--root", str(self.state), "delete", "-f", cid],
                           capture_output=True, timeout=60)


@pytest.fixture
def runc(tmp_path: Path) -> Iterator[Runc]:
    r = Runc(tmp_path / "runc-state")
    try:
        yield r
    finally:
        r.cleanup()


def set_args(bundle: Path, args: list[str]) -> dict[str, object]:
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["process"]["args"] = args
    (bundle / "config.json").write_text(json.dumps(cfg))
    return cfg  # type: ignore[no-any-return]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    layout = tmp_path / "layout"
    build_image(str(layout), "run", [rootfs_layer()], config={
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": ["echo hello-from-lamina; id -u; id -g; id -G; pwd; echo \"A=$A HOME=$HOME\""],
        "Env": ["A=from-image"], "WorkingDir": "/work", "User": "app"})
    return layout


def test_runc_runs_an_unpacked_bundle(image: Path, tmp_path: Path, runc: Runc) -> None:
    bundle = tmp_path / "b"
    lamina_ok("unpack", "--image", f"{image}:run", str(bundle))
    cfg = json.loads((bundle / "config.json").read_text())
    assert cfg["process"]["terminal"] is False
    r = runc.run(bundle)
    assert r.returncode == 0, f"runc run failed: {r.stderr}"
    lines = r.stdout.splitlines()
    assert lines == ["hello-from-lamina", "1000", "1000", "1000 2000", "/work",
                     "A=from-image HOME=/home/app"], r.stdout + r.stderr


def test_runc_exit_status_and_root_user(image: Path, tmp_path: Path, runc: Runc) -> None:
    bundle = tmp_path / "b"
    lamina_ok("unpack", "--image", f"{image}:run", str(bundle))
    cfg = set_args(bundle, ["/bin/sh", "-c", "ls /proc/self/ns >/dev/null; exit 7"])
    assert cfg["process"]["user"]["uid"] == 1000  # type: ignore[index]
    r = runc.run(bundle)
    assert r.returncode == 7, r.stderr
    bundle2 = tmp_path / "b2"
    lamina_ok("unpack", "--image", f"{image}:run", str(bundle2))
    cfg = json.loads((bundle2 / "config.json").read_text())
    cfg["process"]["user"] = {"uid": 0, "gid": 0}
    cfg["process"]["args"] = ["/usr/bin/id", "-u"]
    (bundle2 / "config.json").write_text(json.dumps(cfg))
    r = runc.run(bundle2)
    assert (r.returncode, r.stdout) == (0, "0\n"), r.stderr


def test_runc_runs_a_repacked_image(image: Path, tmp_path: Path, runc: Runc) -> None:
    """Edits repacked by lamina are what the container sees."""
    bundle = tmp_path / "b"
    lamina_ok("unpack", "--image", f"{image}:run", str(bundle))
    root = bundle / "rootfs"
    (root / "usr/local/bin").mkdir(parents=True)
    script = root / "usr/local/bin/hello"
    script.write_bytes(b"#!/bin/sh\necho repacked:$(cat /etc/motd)\nls /work\n")
    os.chmod(script, 0o755)
    (root / "etc/motd").write_bytes(b"motd-from-layer-2")
    (root / "work/data").write_bytes(b"x")
    os.chown(root / "work/data", 1000, 1000)
    (root / "usr/bin/ls").unlink()                  # a whiteout the container must honour
    lamina_ok("repack", "--image", f"{image}:run2", str(bundle))
    b2 = tmp_path / "b2"
    lamina_ok("unpack", "--image", f"{image}:run2", str(b2))
    set_args(b2, ["/bin/sh", "-c", "/usr/local/bin/hello 2>&1 || echo no-ls; "
                                   "test -e /usr/bin/ls && echo ls-still-there; "
                                   "test -O /work/data && echo owned"])
    r = runc.run(b2)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "repacked:motd-from-layer-2"
    assert "ls-still-there" not in r.stdout and "no-ls" in r.stdout
    assert r.stdout.splitlines()[-1] == "owned"


@pytest.mark.skipif(not os.path.isdir(CORPUS), reason="corpus not built")
def test_runc_runs_the_corpus_base_image(tmp_path: Path, runc: Runc) -> None:
    bundle = tmp_path / "b"
    lamina_ok("unpack", "--image", f"{CORPUS}:base", str(bundle))
    set_args(bundle, ["/bin/sh", "-c", "cat /etc/debian_version; id -un; "
                                       "dpkg-query -W -f='${Version}' dpkg >/dev/null && "
                                       "echo dpkg-ok"])
    r = runc.run(bundle, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert re.fullmatch(r"\d+(\.\d+)*|[a-z]+/sid", lines[0]), lines
    assert lines[1:] == ["root", "dpkg-ok"]
