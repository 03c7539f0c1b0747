"""``lamina pull --into-store``: layers the store has ingested are not downloaded again."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from registry_servers import Registry

from conftest import need_tool, run_lamina
from lamina.testing.images import build_image
from lamina.testing.layers import TarBuilder
from lamina.testing.tree import diff_manifests, tree_manifest

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/docker-registry")
                                and not os.environ.get("CI"),
                                reason="docker-registry not installed")


def ok(*args: str) -> Any:
    r = run_lamina([*args, "--json"])
    assert r.returncode == 0, f"lamina {' '.join(args)}: {r.stdout}{r.stderr}"
    return json.loads(r.stdout)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    need_tool("docker-registry")
    reg = Registry(tmp_path / "registry").start()
    yield reg
    reg.stop()


def test_pull_into_store_skips_ingested_layers(registry: Registry, tmp_path: Path) -> None:
    base = TarBuilder().add_dir("etc").add_file("etc/os-release", b"ID=test\n").build()
    top1 = TarBuilder().add_file("app", os.urandom(300_000)).build()
    top2 = TarBuilder().add_file("app", os.urandom(200_000)).add_symlink("lnk", "app").build()
    src = tmp_path / "src"
    build_image(str(src), "v1", [base, top1])
    build_image(str(src), "v2", [base, top2])
    for tag in ("v1", "v2"):
        ok("push", "--insecure", "--layout", f"{src}:{tag}", f"{registry.host}/s/app:{tag}")
    store = tmp_path / "store"

    first = ok("pull", "--insecure", f"{registry.host}/s/app:v1", "--into-store",
               "--store", str(store))
    assert first["name"] == "app:v1" and first["downloaded"] == 3      # config + 2 layers
    assert first["layers_ingested"] == 2
    # v2 shares the base layer: only its config and top layer travel
    second = ok("pull", "--insecure", f"{registry.host}/s/app:v2", "--into-store", "two",
                "--store", str(store))
    assert second["name"] == "two:v2"
    assert second["downloaded"] == 2 and second["skipped"] == 1
    assert second["layers_ingested"] == 1
    assert not os.listdir(store / "pulls")        # staging layouts are gone
    names = {i["name"] for i in ok("images", "--store", str(store))}
    assert {"app:v1", "two:v2"} <= names
    assert ok("fsck", "--store", str(store))["ok"]

    # the stored image unpacks (default driver: overlay where it can) to the same tree
    r = run_lamina(["unpack", "--quiet", "--store", str(store), "--image", "two:v2",
                    str(tmp_path / "b1")])
    assert r.returncode == 0, r.stderr
    try:
        r = run_lamina(["unpack", "--quiet", "--image", f"{src}:v2", str(tmp_path / "b2")])
        assert r.returncode == 0, r.stderr
        assert diff_manifests(tree_manifest(str(tmp_path / "b1/rootfs")),
                              tree_manifest(str(tmp_path / "b2/rootfs"))) == []
    finally:
        r = run_lamina(["umount", str(tmp_path / "b1")])
    assert r.returncode == 0, r.stderr
    assert str(tmp_path / "b1") not in Path("/proc/mounts").read_text()
