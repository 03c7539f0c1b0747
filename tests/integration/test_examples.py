"""The examples under examples/ really work: the two driver packages are made
importable with the entry points their pyproject.toml declares (a dist-info on
PYTHONPATH, what an install leaves behind), then driven through the real CLI and
the conformance kit.  (The shell hook example is exercised in test_hooks_cli.py.)"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import run_lamina
from lamina.oci.layout import OCILayout
from lamina.testing.conformance import ConformanceOptions, assert_conformant
from lamina.testing.images import build_image
from lamina.testing.layers import TarBuilder
from lamina.testing.tree import diff_manifests, tree_manifest

pytestmark = pytest.mark.usefixtures("require_root")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
KEY = "io.lamina.example.encrypt.key-file"
SLOW = "io.lamina.example.tiered.slow"


def _dist_info(site: Path, project: Path) -> None:
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    name, version = meta["name"], meta["version"]
    d = site / f"{name.replace('-', '_')}-{version}.dist-info"
    d.mkdir()
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    eps = meta["entry-points"]
    (d / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in items.items())
        for group, items in eps.items()))


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    site = tmp_path_factory.mktemp("site")
    paths = [str(site)]
    for project in (EXAMPLES / "encrypted_driver", EXAMPLES / "tiered_cache"):
        _dist_info(site, project)
        paths.append(str(project / "src"))
    cache = tmp_path_factory.mktemp("tiered-cache")
    env = {"PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]),
           "LAMINA_TIERED_CACHE": str(cache)}
    # the in-process checks import the same packages
    sys.path[:0] = paths[1:]
    yield env
    for p in paths[1:]:
        sys.path.remove(p)


def layers() -> list[bytes]:
    l1 = (TarBuilder().add_dir("etc").add_file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
          .add_file("etc/secret", b"top secret plans\n", mode=0o600)
          .add_dir("usr").add_file("usr/tool", b"#!/bin/sh\necho hi\n" * 500, mode=0o755)
          .add_hardlink("usr/tool2", "usr/tool", mode=0o755).add_symlink("bin", "usr")
          .build())
    l2 = (TarBuilder().add_dir("etc").add_whiteout("etc/secret")
          .add_file("etc/passwd", b"root:x:0:0::/root:/bin/bash\n")
          .add_dir("app").add_file("app/data", b"application data\n" * 100).build())
    return [l1, l2]


def _unpack(env: dict[str, str], *args: str) -> dict[str, object]:
    p = run_lamina(["unpack", *args, "--json"], env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    out: dict[str, object] = json.loads(p.stdout)
    return out


def _same_tree(a: Path, b: Path) -> None:
    assert diff_manifests(tree_manifest(str(a / "rootfs")), tree_manifest(str(b / "rootfs")),
                          ignore_root=True) == []


# -- encrypted ------------------------------------------------------------------------------

def test_encrypted_driver(tmp_path: Path, plugin_env: dict[str, str]) -> None:
    layout, store = tmp_path / "layout", tmp_path / "store"
    build_image(str(layout), "t", layers())
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    ref = tmp_path / "ref"
    _unpack(plugin_env, "--image", f"{layout}:t", str(ref))

    b1 = tmp_path / "b1"
    r = _unpack(plugin_env, "--store", str(store), "--image", f"{layout}:t",
                "--annotation", f"{KEY}={key}", str(b1))
    assert r["driver"] == "encrypted" and r["reused"] == 0
    _same_tree(ref, b1)
    area = store / "extract" / "encrypted"
    files = [p for p in area.rglob("*") if p.is_file()]
    assert len(files) >= 5
    for f in files:  # no plaintext at rest
        data = f.read_bytes()
        assert b"top secret" not in data and b"application data" not in data

    # a second bundle is built from the encrypted area alone: the layer blobs are gone
    for d in OCILayout.open(str(layout)).resolve("t").layers:
        (store / "blobs" / "sha256" / d.digest[7:]).unlink()
    b2 = tmp_path / "b2"
    r = _unpack(plugin_env, "--store", str(store), "--image", "layout:t",
                "--annotation", f"{KEY}={key}", str(b2))
    assert r["reused"] == 2
    _same_tree(ref, b2)

    # the wrong key: a clear error, no bundle
    other = tmp_path / "other.key"
    other.write_text(os.urandom(32).hex() + "\n")
    p = run_lamina(["unpack", "--store", str(store), "--image", "layout:t", "--annotation",
                    f"{KEY}={other}", "--json", str(tmp_path / "b3")], env=plugin_env)
    assert p.returncode == 2, p.stderr
    assert "does not decrypt with this key" in json.loads(p.stdout)["message"]
    assert not (tmp_path / "b3").exists()
    # forced without a key
    p = run_lamina(["unpack", "--store", str(store), "--image", "layout:t", "--driver",
                    "encrypted", "--json", str(tmp_path / "b4")], env=plugin_env)
    assert p.returncode == 2 and KEY in json.loads(p.stdout)["hint"]

    # lamina drivers lists the plugin, and its bundles repack like any other
    p = run_lamina(["drivers", "--json"], env=plugin_env)
    assert p.returncode == 0, p.stderr
    assert "encrypted" in p.stdout and "tiered" in p.stdout
    (b1 / "rootfs" / "app" / "new").write_text("added\n")
    p = run_lamina(["repack", "--image", f"{layout}:edited", "--json", str(b1)],
                   env=plugin_env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["added"] >= 1


def test_encrypted_driver_conformance(tmp_path: Path, plugin_env: dict[str, str]) -> None:
    from lamina_example_encrypted import factory  # type: ignore[import-not-found]
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    assert_conformant(factory, tmp_path / "work", ConformanceOptions(
        annotations={KEY: str(key)}, declines_without=True))


# -- tiered ---------------------------------------------------------------------------------

def _thin(tmp_path: Path) -> tuple[Path, Path]:
    """A layout without its layer blobs, and a slow tier holding them."""
    layout, slow = tmp_path / "thin", tmp_path / "slow"
    build_image(str(layout), "t", layers())
    (slow / "blobs" / "sha256").mkdir(parents=True)
    lay = OCILayout.open(str(layout))
    for d in lay.resolve("t").layers:
        shutil.move(lay.blob_path(d.digest), slow / "blobs" / "sha256" / d.digest[7:])
    return layout, slow


def test_tiered_driver(tmp_path: Path, plugin_env: dict[str, str]) -> None:
    layout, slow = _thin(tmp_path)
    env = dict(plugin_env, LAMINA_TIERED_CACHE=str(tmp_path / "cache"))
    p = run_lamina(["unpack", "--image", f"{layout}:t", "--json", str(tmp_path / "x")],
                   env=env)
    assert p.returncode == 3  # the stock driver cannot: the blobs are elsewhere

    b1 = tmp_path / "b1"
    r = _unpack(env, "--image", f"{layout}:t", "--annotation", f"{SLOW}={slow}", str(b1))
    assert r["driver"] == "tiered" and r["reused"] == 0
    cached = sorted(p.name for p in (tmp_path / "cache" / "blobs" / "sha256").iterdir())
    assert cached == sorted(p.name for p in (slow / "blobs" / "sha256").iterdir())

    # the slow tier goes away: the cache serves
    shutil.rmtree(slow)
    slow.mkdir()
    (slow / "blobs").mkdir()
    b2 = tmp_path / "b2"
    r = _unpack(env, "--image", f"{layout}:t", "--annotation", f"{SLOW}={slow}", str(b2))
    assert r["reused"] == 2
    _same_tree(b1, b2)
    # reference: the same image with its blobs
    full = tmp_path / "full"
    build_image(str(full), "t", layers())
    ref = tmp_path / "ref"
    _unpack(env, "--image", f"{full}:t", str(ref))
    _same_tree(ref, b1)


def test_tiered_driver_damaged_slow_tier(tmp_path: Path, plugin_env: dict[str, str]) -> None:
    layout, slow = _thin(tmp_path)
    env = dict(plugin_env, LAMINA_TIERED_CACHE=str(tmp_path / "cache"))
    victim = next((slow / "blobs" / "sha256").iterdir())
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    p = run_lamina(["unpack", "--image", f"{layout}:t", "--annotation", f"{SLOW}={slow}",
                    "--json", str(tmp_path / "b")], env=env)
    assert p.returncode == 5, p.stderr
    assert "slow tier" in json.loads(p.stdout)["message"]
    assert not (tmp_path / "b").exists()
    cache = tmp_path / "cache" / "blobs" / "sha256"
    assert not (cache / victim.name).exists()
    assert not cache.exists() or [p for p in cache.iterdir() if p.name.startswith(".")] == []
    assert not [p for p in tmp_path.iterdir() if ".lamina-" in p.name]


def test_tiered_driver_conformance(tmp_path: Path, plugin_env: dict[str, str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import lamina_example_tiered  # type: ignore[import-not-found]
    monkeypatch.setenv("LAMINA_TIERED_CACHE", str(tmp_path / "cache"))
    slow = tmp_path / "slow"
    (slow / "blobs").mkdir(parents=True)
    assert_conformant(lamina_example_tiered.TieredFactory(), tmp_path / "work",
                      ConformanceOptions(annotations={SLOW: str(slow)},
                                         declines_without=True))
