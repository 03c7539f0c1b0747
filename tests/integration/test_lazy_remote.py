"""Lazy mounts straight from a registry (Debian's docker-registry 2.8, started by the tests):

- ``lamina push --lazy-index`` publishes the index as an artifact referring to the image,
  through the referrers tag schema (distribution 2.8 has no referrers API);
- ``lamina mount docker://REF DIR`` mounts at once: the tree equals a full unpack, a
  file read transfers a small part of the blobs, only with range requests (counted by
  a proxy and by the mount's stats xattr), and a pull meanwhile is unaffected;
- a blob corrupted in the registry's storage gives EIO, never wrong data;
- no artifact: a clear error and hint; ``lamina lazy-index --push REF`` then fixes it;
  a pinned artifact of another image is refused;
- a registry with the referrers API (a front adding it): no referrers tag, found
  through the API;
- token auth: a token expiring mid-mount is renewed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from lazy_mounts import guard_lazy_mounts, unmount, unmount_all
from registry_servers import FaultProxy, ReferrersFront, Registry, TokenServer
from test_lazy_mount import _stats, _unpack, layered_image

from conftest import need_tool, run_lamina
from lamina.oci.layout import OCILayout
from lamina.testing.images import build_image
from lamina.testing.layers import TarBuilder
from lamina.testing.tree import diff_manifests, tree_manifest

pytestmark = [pytest.mark.root]


@pytest.fixture(scope="module", autouse=True)
def no_leftover_mounts() -> Iterator[None]:
    yield from guard_lazy_mounts()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    need_tool("docker-registry")
    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    yield reg
    reg.stop()


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    p = FaultProxy(registry.host)
    yield p
    p.close()


@pytest.fixture
def run_env(tmp_path: Path) -> dict[str, str]:
    return {"LAMINA_RUN_DIR": str(tmp_path / "run")}


@pytest.fixture
def mounted(run_env: dict[str, str]) -> Iterator[list[Path]]:
    points: list[Path] = []
    yield points
    unmount_all(points, run_env)


def ok(*args: str, env: dict[str, str] | None = None) -> Any:
    r = run_lamina([*args, "--json"], env=env)
    assert r.returncode == 0, f"lamina {' '.join(args)}: {r.stdout}{r.stderr}"
    return json.loads(r.stdout)


def mount(ref: str, mnt: Path, env: dict[str, str], *extra: str) -> dict[str, Any]:
    mnt.mkdir(exist_ok=True)
    out: dict[str, Any] = ok("mount", "--insecure", *extra, ref, str(mnt), env=env)
    assert os.path.ismount(mnt)
    return out


def layer_digests(layout: Path, tag: str) -> dict[str, int]:
    m = OCILayout.open(str(layout)).resolve(tag)
    return {d.digest: d.size for d in m.layers}


def blob_gets(proxy: FaultProxy, digests: dict[str, int]) -> list[tuple[str, str, int]]:
    """(digest, Range header, bytes) of every GET of an image layer blob."""
    out = []
    for method, path, rng, sent in proxy.served:
        d = path.rsplit("/", 1)[-1]
        if method == "GET" and "/blobs/" in path and d in digests:
            out.append((d, rng, sent))
    return out


@pytest.mark.parametrize("compression", [["gzip", "gzip", "gzip"], ["zstd", "none", "gzip"]])
def test_mount_from_registry(registry: Registry, proxy: FaultProxy, tmp_path: Path,
                             run_env: dict[str, str], mounted: list[Path],
                             compression: list[str]) -> None:
    layered_image(tmp_path / "l", compression)
    repo = f"lazy/{compression[0]}"
    pushed = ok("push", "--insecure", "--lazy-index", "--layout", f"{tmp_path}/l:t",
                f"{registry.host}/{repo}:t")
    art = pushed["lazy_index"]["artifacts"]
    assert len(art) == 1 and art[0]["subject"] == pushed["digest"]
    # distribution 2.8: no referrers API, so the tag schema's sha256-HEX tag lists it
    tag = "sha256-" + pushed["digest"].split(":", 1)[1]
    assert art[0]["referrers"] == f"tag {tag}"
    base = f"http://{registry.host}/v2/{repo}"
    assert httpx.get(f"{base}/referrers/{pushed['digest']}").status_code == 404
    assert tag in httpx.get(f"{base}/tags/list").json()["tags"]
    listing = httpx.get(f"{base}/manifests/{tag}",
                        headers={"Accept": "application/vnd.oci.image.index.v1+json"}).json()
    assert [m["digest"] for m in listing["manifests"]] == [art[0]["digest"]]
    assert listing["manifests"][0]["artifactType"] == "application/vnd.lamina.lazy-index.v1"
    # publishing the same index again changes nothing (same digest, listed once)
    again = ok("lazy-index", "--insecure", f"{tmp_path}/l:t", "--push",
               f"{registry.host}/{repo}:t")
    assert again["artifacts"][0]["digest"] == art[0]["digest"]
    assert again["indexes_built"] == 0
    assert len(httpx.get(f"{base}/manifests/{tag}", headers={
        "Accept": "application/vnd.oci.image.index.v1+json"}).json()["manifests"]) == 1

    layers = layer_digests(tmp_path / "l", "t")
    total = sum(layers.values())
    mnt = tmp_path / "mnt"
    mounted.append(mnt)
    out = mount(f"docker://{proxy.host}/{repo}:t", mnt, run_env)
    assert out["artifact"] == art[0]["digest"] and out["manifest"] == pushed["digest"]
    assert blob_gets(proxy, layers) == []           # mounted before any layer byte moved
    for root, _dirs, files in os.walk(mnt):          # metadata alone fetches nothing
        for f in files:
            os.lstat(os.path.join(root, f))
    s = _stats(mnt)
    assert s["files_fetched"] == 0 and s["range_requests"] == 0
    assert (mnt / "etc/os-release").read_bytes() == b"ID=top\n"
    assert (mnt / "usr/big2").read_bytes()[-4:] == b"tail"
    assert (mnt / "bin/via-link").read_bytes() == b"written through a parent symlink"
    s = _stats(mnt)
    assert s["files_fetched"] == 3
    gets = blob_gets(proxy, layers)
    # only ranges, and only what the three files need: the 3 MiB random file's layer
    # (about 3 MiB compressed) is not transferred
    assert gets and all(rng.startswith("bytes=") for _d, rng, _n in gets)
    assert sum(n for _d, _r, n in gets) == s["blob_bytes_read"]
    assert s["range_requests"] == len(gets)
    assert 0 < s["blob_bytes_read"] < total / 2
    # a pull of the same image meanwhile is unaffected by the mount
    pulled = ok("pull", "--insecure", f"{registry.host}/{repo}:t", "--layout",
                f"{tmp_path}/pulled:t")
    assert pulled["digest"] == pushed["digest"]
    assert (mnt / "etc/os-release").read_bytes() == b"ID=top\n"
    # the whole tree (every file read now) equals a full unpack
    full = _unpack(f"{tmp_path}/pulled:t", tmp_path / "b")
    assert diff_manifests(tree_manifest(str(full)), tree_manifest(str(mnt)),
                          names=("unpack", "lazy")) == []
    unmount(mnt, run_env)


def _flip(registry: Registry, digest: str, at: int) -> None:
    hex_ = digest.split(":", 1)[1]
    blob = registry.dir / "data/docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"
    raw = bytearray(blob.read_bytes())
    raw[at] ^= 0xFF
    blob.write_bytes(bytes(raw))


def test_corrupt_blob_in_registry_is_an_io_error(registry: Registry, tmp_path: Path,
                                                 run_env: dict[str, str],
                                                 mounted: list[Path]) -> None:
    plain = b"genuine content " * 200
    text = b"".join(b"line %d of a compressible file\n" % i for i in range(20000))
    l1 = (TarBuilder().add_file("plain", plain).add_file("other", b"untouched\n").build())
    l2 = TarBuilder().add_file("text", text).add_file("small", b"small\n").build()
    build_image(str(tmp_path / "l"), "t", [l1, l2], compression=["none", "gzip"])
    ref = f"{registry.host}/lazy/corrupt:t"
    ok("push", "--insecure", "--lazy-index", "--layout", f"{tmp_path}/l:t", ref)
    m = OCILayout.open(str(tmp_path / "l")).resolve("t")
    tar1 = (tmp_path / "l/blobs/sha256" / m.layers[0].hex).read_bytes()
    _flip(registry, m.layers[0].digest, tar1.index(plain) + 100)
    _flip(registry, m.layers[1].digest, m.layers[1].size // 2)
    mnt = tmp_path / "mnt"
    mounted.append(mnt)
    mount(f"docker://{ref}", mnt, run_env)
    for name in ("plain", "text"):
        with pytest.raises(OSError) as ei:
            (mnt / name).read_bytes()
        assert ei.value.errno == errno.EIO, name
    # the damage is per file: the rest of the layer still reads
    assert (mnt / "other").read_bytes() == b"untouched\n"
    assert _stats(mnt)["files_fetched"] == 1
    unmount(mnt, run_env)


def test_missing_index_then_published_from_the_registry(
        registry: Registry, tmp_path: Path, run_env: dict[str, str],
        mounted: list[Path]) -> None:
    layered_image(tmp_path / "l", ["gzip", "gzip", "gzip"])
    ref = f"{registry.host}/lazy/noindex:t"
    ok("push", "--insecure", "--layout", f"{tmp_path}/l:t", ref)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = run_lamina(["mount", "--insecure", f"docker://{ref}", str(mnt)], env=run_env)
    assert r.returncode == 3, r.stderr
    assert "no lazy index" in r.stderr and f"lamina lazy-index --push {ref}" in r.stderr
    assert "Traceback" not in r.stderr and not os.path.ismount(mnt)
    rj = run_lamina(["mount", "--json", "--insecure", f"docker://{ref}", str(mnt)],
                    env=run_env)
    err = json.loads(rj.stdout)
    assert rj.returncode == 3 and err["code"] == 3 and "lamina pull" in err["hint"]
    # publishing for an image the repository lacks is refused with a hint
    r = run_lamina(["lazy-index", "--insecure", f"{tmp_path}/l:t", "--push",
                    f"{registry.host}/lazy/elsewhere:t"])
    assert r.returncode == 3 and "push the image first" in r.stderr
    # read the image from the registry once, publish its index: now it mounts
    work = tmp_path / "work"
    work.mkdir()
    res = ok("lazy-index", "--insecure", "--push", ref, "--workdir", str(work))
    assert res["indexes_built"] == 3 and len(res["artifacts"]) == 1
    assert list(work.iterdir()) == []       # the downloaded copy is gone
    mounted.append(mnt)
    mount(f"docker://{ref}", mnt, run_env, "--index-digest", res["artifacts"][0]["digest"])
    assert (mnt / "etc/os-release").read_bytes() == b"ID=top\n"
    unmount(mnt, run_env)
    # a pinned index of another image is refused before mounting
    layered_image(tmp_path / "l2", ["none", "none", "none"])
    other = ok("push", "--insecure", "--lazy-index", "--layout", f"{tmp_path}/l2:t",
               f"{registry.host}/lazy/noindex:t2")
    r = run_lamina(["mount", "--insecure", "--index-digest",
                    other["lazy_index"]["artifacts"][0]["digest"], f"docker://{ref}",
                    str(mnt)], env=run_env)
    assert r.returncode == 5 and "refers to" in r.stderr and not os.path.ismount(mnt)


def test_token_expiring_mid_mount_is_renewed(tmp_path: Path, run_env: dict[str, str],
                                              mounted: list[Path]) -> None:
    need_tool("docker-registry")
    tokens = TokenServer(tmp_path / "tok", {"bob": "hunter2"})
    reg = Registry(tmp_path / "reg", token=tokens.registry_config()).start()
    try:
        a = os.urandom(4096).hex().encode()
        b = hashlib.sha256(b"b").hexdigest().encode() * 100
        # uncompressed, 1 MiB apart: reading b needs a request of its own
        build_image(str(tmp_path / "l"), "t",
                    [TarBuilder().add_file("a", a).add_file("pad", os.urandom(1 << 20))
                     .add_file("b", b).build()], compression="none")
        ref = f"{reg.host}/lazy/auth:t"
        creds = {"LAMINA_CREDS": "bob:hunter2", **run_env}
        ok("push", "--insecure", "--lazy-index", "--layout", f"{tmp_path}/l:t", ref,
           env=creds)
        mnt = tmp_path / "mnt"
        mounted.append(mnt)
        # anonymous: the token server refuses, the error says how to pass credentials
        mnt.mkdir()
        r = run_lamina(["mount", "--insecure", f"docker://{ref}", str(mnt)], env=run_env)
        assert r.returncode == 11 and "--creds" in r.stderr
        # tokens now live 3 s (the registry allows 60 s of clock skew past exp)
        tokens.lifetime = -57
        mount(f"docker://{ref}", mnt, creds)
        assert (mnt / "a").read_bytes() == a
        issued = sum(1 for q in tokens.requests if q["user"] == "bob")
        time.sleep(4)
        assert (mnt / "b").read_bytes() == b        # 401 -> new token -> the range again
        assert sum(1 for q in tokens.requests if q["user"] == "bob") > issued
        assert _stats(mnt)["files_fetched"] == 2
        unmount(mnt, run_env)
    finally:
        reg.stop()
        tokens.close()


def test_cache_keeps_index_and_contents(registry: Registry, proxy: FaultProxy, tmp_path: Path,
                                        run_env: dict[str, str],
                                        mounted: list[Path]) -> None:
    layered_image(tmp_path / "l", ["gzip", "gzip", "gzip"])
    ref = f"{registry.host}/lazy/cached:t"
    pushed = ok("push", "--insecure", "--lazy-index", "--layout", f"{tmp_path}/l:t", ref)
    cache = tmp_path / "cache"
    mnt = tmp_path / "mnt"
    mounted.append(mnt)
    remote = f"docker://{proxy.host}/lazy/cached:t"
    mount(remote, mnt, run_env, "--cache", str(cache))
    assert (mnt / "etc/os-release").read_bytes() == b"ID=top\n"
    unmount(mnt, run_env)
    first = len(proxy.served)
    index_blobs = {p for m, p, _r, _n in proxy.served if m == "GET" and "/blobs/" in p}
    out = mount(remote, mnt, run_env, "--cache", str(cache))
    assert out["artifact"] == pushed["lazy_index"]["artifacts"][0]["digest"]
    assert (mnt / "etc/os-release").read_bytes() == b"ID=top\n"
    s = _stats(mnt)
    assert s["cache_hits"] == 1 and s["range_requests"] == 0 and s["files_fetched"] == 0
    # the second mount fetched manifests only: no blob (index, config or layer) again
    again = [p for m, p, _r, _n in proxy.served[first:] if m == "GET" and "/blobs/" in p]
    assert again == [] and index_blobs
    unmount(mnt, run_env)
    assert any(p.name == "index" for p in cache.iterdir())


def test_registry_with_the_referrers_api(registry: Registry, tmp_path: Path,
                                         run_env: dict[str, str], mounted: list[Path]) -> None:
    """Where the registry has the OCI 1.1 referrers API (here a front adding it to
    distribution 2.8), the index is published without a referrers tag and found
    through the API."""
    front = ReferrersFront(registry.host)
    try:
        layered_image(tmp_path / "l", ["gzip", "gzip", "gzip"])
        ref = f"{front.host}/lazy/api:t"
        pushed = ok("push", "--insecure", "--lazy-index", "--layout", f"{tmp_path}/l:t", ref)
        art = pushed["lazy_index"]["artifacts"]
        assert len(art) == 1 and art[0]["referrers"] == "api"
        assert art[0]["subject"] == pushed["digest"]
        tags = httpx.get(f"http://{registry.host}/v2/lazy/api/tags/list").json()["tags"]
        assert tags == ["t"]        # no sha256-HEX tag: the registry lists the referrer
        mnt = tmp_path / "mnt"
        mounted.append(mnt)
        mount(f"docker://{ref}", mnt, run_env)
        assert (mnt / "etc/os-release").read_bytes() == b"ID=top\n"
        unmount(mnt, run_env)
        asked = [(m, p, s) for m, p, s in front.requests if "/referrers/" in p]
        assert asked and all(m == "GET" and s == 200 for m, p, s in asked)
        assert all(f"/referrers/{pushed['digest']}?artifactType=" in p for _m, p, _s in asked)
        assert not [p for _m, p, _s in front.requests if "/manifests/sha256-" in p]
    finally:
        front.close()
