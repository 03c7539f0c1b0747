"""``lamina pull`` / ``lamina push`` against a real registry (Debian's docker-registry)
started by the tests on a loopback port:

- round trip: build, push, pull into another layout, unpack both, same tree;
  a second pull downloads nothing; a second push uploads nothing; pushing to
  another repository mounts the blobs; chunked uploads; image indexes;
- interop with skopeo in both directions (OCI and Docker manifests);
- basic auth over TLS with a private CA, token auth with a real token server;
- failures: registry killed mid-pull (then restarted: the retry resumes),
  a blob with the wrong digest, 401/404/500 answers: the right exit code and
  hint, nothing half-written in the layout, and a retry succeeds;
- RemoteBlobSource range reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from registry_servers import (
    Fault,
    FaultProxy,
    Registry,
    TokenServer,
    auth_json,
    make_tls,
    write_htpasswd,
)

from conftest import need_tool, run_lamina
from lamina.errors import NotFoundError, RegistryError
from lamina.oci import mediatypes as mt
from lamina.oci.gc import reachable
from lamina.oci.layout import ImageRef, OCILayout
from lamina.oci.model import Platform
from lamina.registry import (
    LayoutSink,
    PullOptions,
    PushOptions,
    RegistryOptions,
    RegistryRef,
    RemoteBlobSource,
)
from lamina.registry.pull import pull
from lamina.registry.push import push
from lamina.registry.sink import PARTIAL_PREFIX
from lamina.testing.images import build_image, build_index_image
from lamina.testing.layers import TarBuilder
from lamina.testing.tree import diff_manifests, tree_manifest

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/docker-registry")
                                and not os.environ.get("CI"),
                                reason="docker-registry not installed")

INSECURE = RegistryOptions(insecure=True)


# -- helpers ----------------------------------------------------------------------------


def lamina_ok(*args: str, env: dict[str, str] | None = None) -> Any:
    r = run_lamina([*args, "--json"], env=env)
    assert r.returncode == 0, f"lamina {' '.join(args)}: {r.stdout}{r.stderr}"
    return json.loads(r.stdout)


def lamina_fails(code: int, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run lamina twice: once for the human message (checked: no traceback), once with
    --json for the machine-readable error."""
    r = run_lamina(list(args), env=env)
    assert r.returncode == code, f"expected exit {code}, got {r.returncode}: {r.stderr}"
    assert "Traceback" not in r.stderr and "error:" in r.stderr and "hint:" in r.stderr
    rj = run_lamina([*args, "--json"], env=env)
    assert rj.returncode == code
    err: dict[str, Any] = json.loads(rj.stdout)
    assert err["code"] == code and err["hint"]
    return err


def layers_fixture(big: int = 0) -> list[bytes]:
    a = TarBuilder()
    a.add_dir("etc")
    a.add_file("etc/hostname", b"lamina\n")
    a.add_file("etc/data.bin", hashlib.sha256(b"seed").digest() * 4000)
    a.add_symlink("etc/link", "hostname")
    a.add_dir("usr/bin")
    a.add_file("usr/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755)
    b = TarBuilder()
    b.add_file("etc/hostname", b"changed\n")
    b.add_whiteout("usr/bin/tool")
    b.add_file("var/log/app.log", b"x" * 5000)
    layers = [a.build(), b.build()]
    if big:
        c = TarBuilder()
        c.add_file("big.bin", os.urandom(big))
        layers.append(c.build())
    return layers


def unpack_tree(layout: Path, tag: str, dest: Path) -> dict[str, dict[str, Any]]:
    r = run_lamina(["unpack", "--quiet", "--image", f"{layout}:{tag}", str(dest)])
    assert r.returncode == 0, r.stderr
    return tree_manifest(str(dest / "rootfs"))


def assert_clean(layout: Path, *, partials_ok: bool = False) -> list[Path]:
    """Every visible blob matches its name, every tag reaches only present blobs,
    and the only hidden files are resumable partial downloads (when allowed)."""
    blob_dir = layout / "blobs" / "sha256"
    hidden = []
    for p in blob_dir.iterdir():
        if p.name.startswith("."):
            hidden.append(p)
            continue
        assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name, f"corrupt blob {p}"
    if partials_ok:
        assert all(p.name.startswith(PARTIAL_PREFIX) for p in hidden), hidden
    else:
        assert hidden == [], hidden
    reachable(OCILayout.open(str(layout)))  # raises if a tag needs a missing blob
    return hidden


def tags(layout: Path) -> set[str]:
    return set(OCILayout.open(str(layout)).refs())


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    need_tool("docker-registry")
    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    yield reg
    reg.stop()


@pytest.fixture
def own_registry(tmp_path: Path) -> Iterator[Registry]:
    need_tool("docker-registry")
    reg = Registry(tmp_path / "registry").start()
    yield reg
    reg.stop()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    build_image(str(src), "v1", layers_fixture(), compression=["gzip", "zstd"],
                config={"Cmd": ["/bin/sh"]})
    return src


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    p = FaultProxy(registry.host)
    yield p
    p.close()


# -- round trip -------------------------------------------------------------------------


def test_round_trip(registry: Registry, image: Path, tmp_path: Path) -> None:
    ref = f"{registry.host}/rt/app:v1"
    pushed = lamina_ok("push", "--insecure", "--layout", f"{image}:v1", ref)
    assert pushed["uploaded"] == 3 and pushed["skipped"] == 0
    assert pushed["digest"] == OCILayout.open(str(image)).refs()["v1"].digest

    dst = tmp_path / "dst"
    pulled = lamina_ok("pull", "--insecure", ref, "--layout", str(dst))
    assert pulled["digest"] == pushed["digest"]
    assert pulled["downloaded"] == 3 and pulled["skipped"] == 0
    assert pulled["bytes_downloaded"] == sum(
        p.stat().st_size for p in (image / "blobs/sha256").iterdir()) - \
        (image / "blobs/sha256" / pushed["digest"][7:]).stat().st_size
    assert tags(dst) == {"v1"}
    assert_clean(dst)
    assert diff_manifests(unpack_tree(image, "v1", tmp_path / "b1"),
                          unpack_tree(dst, "v1", tmp_path / "b2")) == []

    # again: everything is already there (the try-skip), nothing is downloaded
    again = lamina_ok("pull", "--insecure", ref, "--layout", f"{dst}:copy")
    assert again["downloaded"] == 0 and again["skipped"] == 3 and again["bytes_downloaded"] == 0
    assert tags(dst) == {"v1", "copy"}
    # and pushing again uploads nothing
    repush = lamina_ok("push", "--insecure", "--layout", f"{image}:v1", ref)
    assert repush["uploaded"] == 0 and repush["skipped"] == 3


def test_push_mounts_across_repositories(registry: Registry, image: Path,
                                         tmp_path: Path) -> None:
    lamina_ok("push", "--insecure", "--layout", f"{image}:v1", f"{registry.host}/mnt/a:v1")
    # explicit source repository
    res = lamina_ok("push", "--insecure", "--from-repo", "mnt/a", "--layout", f"{image}:v1",
                    f"{registry.host}/mnt/b:v1")
    assert res["mounted"] == 3 and res["uploaded"] == 0
    # the repository an image was pulled from is remembered in the layout
    dst = tmp_path / "dst"
    lamina_ok("pull", "--insecure", f"{registry.host}/mnt/a:v1", "--layout", f"{dst}:v1")
    res = lamina_ok("push", "--insecure", "--layout", f"{dst}:v1", f"{registry.host}/mnt/c")
    assert res["mounted"] == 3 and res["uploaded"] == 0
    assert res["ref"] == f"{registry.host}/mnt/c:v1"  # the layout's tag by default
    out = tmp_path / "out"
    assert lamina_ok("pull", "--insecure", f"{registry.host}/mnt/c:v1", "--layout",
                     str(out))["digest"] == res["digest"]


def test_chunked_upload(registry: Registry, tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_image(str(src), "v1", layers_fixture(big=3 << 20), compression="none")
    ref = RegistryRef.parse(f"{registry.host}/chunked/app:v1")
    res = push(PushOptions(ImageRef(str(src), "v1"), ref, chunk_size=1 << 20,
                           registry=INSECURE))
    assert res.uploaded == 4
    dst = tmp_path / "dst"
    got = pull(PullOptions(ref, "v1", registry=INSECURE), LayoutSink.init(str(dst)))
    assert got.digest == res.digest
    assert_clean(dst)
    assert diff_manifests(unpack_tree(src, "v1", tmp_path / "b1"),
                          unpack_tree(dst, "v1", tmp_path / "b2")) == []


def _other_platform() -> Platform:
    host = Platform.host()
    return Platform("linux", "s390x" if host.architecture != "s390x" else "amd64")


def test_index_platforms(registry: Registry, tmp_path: Path) -> None:
    src = tmp_path / "src"
    other = _other_platform()
    a, b = layers_fixture()
    idx = build_index_image(str(src), "multi", [(Platform.host(), [a]),
                                                (other, [a, b])])
    ref = f"{registry.host}/idx/app:multi"
    pushed = lamina_ok("push", "--insecure", "--layout", f"{src}:multi", ref)
    assert pushed["digest"] == idx.digest and len(pushed["manifests"]) == 3

    # default: this machine's image; the tag points at its manifest
    one = tmp_path / "one"
    res = lamina_ok("pull", "--insecure", ref, "--layout", str(one))
    desc = OCILayout.open(str(one)).refs()["multi"]
    assert desc.media_type == mt.MANIFEST and desc.platform == Platform.host()
    assert res["downloaded"] == 2  # config + one layer
    # --platform picks the other one
    res = lamina_ok("pull", "--insecure", ref, "--platform", str(other), "--layout",
                    f"{one}:other")
    assert OCILayout.open(str(one)).resolve("other", other).layers[-1].digest != \
        OCILayout.open(str(one)).resolve("multi").layers[-1].digest
    assert res["skipped"] == 1  # the shared bottom layer
    # --all-platforms keeps the index, which pushes back unchanged
    allp = tmp_path / "all"
    res = lamina_ok("pull", "--insecure", ref, "--all-platforms", "--layout", str(allp))
    assert res["digest"] == idx.digest and res["media_type"] == mt.INDEX
    assert_clean(allp)
    back = lamina_ok("push", "--insecure", "--layout", f"{allp}:multi",
                     f"{registry.host}/idx/copy:multi")
    assert back["digest"] == idx.digest
    # a platform the index does not offer
    err = lamina_fails(3, "pull", "--insecure", ref, "--platform", "linux/mips64le",
                       "--layout", str(tmp_path / "none"))
    assert "platforms offered" in err["hint"]


# -- interop with skopeo ----------------------------------------------------------------


@pytest.mark.peer
def test_skopeo_pulls_what_lamina_pushed(registry: Registry, image: Path,
                                         tmp_path: Path) -> None:
    skopeo = need_tool("skopeo")
    ref = f"{registry.host}/interop/from-lamina:v1"
    pushed = lamina_ok("push", "--insecure", "--layout", f"{image}:v1", ref)
    out = tmp_path / "skopeo-oci"
    r = subprocess.run([skopeo, "copy", "--src-tls-verify=false", f"docker://{ref}",
                        f"oci:{out}:v1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert OCILayout.open(str(out)).refs()["v1"].digest == pushed["digest"]
    assert diff_manifests(unpack_tree(image, "v1", tmp_path / "b1"),
                          unpack_tree(out, "v1", tmp_path / "b2")) == []


@pytest.mark.peer
@pytest.mark.parametrize("fmt", ["oci", "v2s2"])
def test_lamina_pulls_what_skopeo_pushed(registry: Registry, image: Path, tmp_path: Path,
                                         fmt: str) -> None:
    skopeo = need_tool("skopeo")
    ref = f"{registry.host}/interop/from-skopeo-{fmt}:v1"
    # skopeo converts zstd layers only for OCI; give it a gzip-only image for v2s2
    src = image
    if fmt == "v2s2":
        src = tmp_path / "gz"
        build_image(str(src), "v1", layers_fixture(), compression="gzip")
    r = subprocess.run([skopeo, "copy", "--dest-tls-verify=false", "--format", fmt,
                        f"oci:{src}:v1", f"docker://{ref}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    insp = subprocess.run([skopeo, "inspect", "--tls-verify=false", "--raw", f"docker://{ref}"],
                          capture_output=True, check=True)
    dst = tmp_path / "dst"
    res = lamina_ok("pull", "--insecure", ref, "--layout", str(dst))
    assert res["digest"] == "sha256:" + hashlib.sha256(insp.stdout).hexdigest()
    want = mt.DOCKER_MANIFEST if fmt == "v2s2" else mt.MANIFEST
    assert res["media_type"] == want
    assert_clean(dst)
    assert diff_manifests(unpack_tree(src, "v1", tmp_path / "b1"),
                          unpack_tree(dst, "v1", tmp_path / "b2")) == []


# -- TLS and auth -----------------------------------------------------------------------


def test_basic_auth_over_tls(tmp_path: Path, image: Path) -> None:
    need_tool("docker-registry")
    tls = make_tls(tmp_path / "tls")
    htp = write_htpasswd(tmp_path / "htpasswd", {"alice": "s3cret:pw"})
    reg = Registry(tmp_path / "reg", tls=tls, htpasswd=htp).start()
    try:
        ref = f"{reg.host}/secure/app:v1"
        ca = ["--ca-cert", str(tls.ca_cert)]
        err = lamina_fails(11, "push", *ca, "--layout", f"{image}:v1", ref,
                           env={"HOME": str(image.parent)})
        assert "--creds" in err["hint"]
        pushed = lamina_ok("push", *ca, "--creds", "alice:s3cret:pw", "--layout",
                           f"{image}:v1", ref)
        # no CA: the certificate is not trusted
        err = lamina_fails(11, "pull", "--creds", "alice:s3cret:pw", ref, "--layout",
                           str(tmp_path / "x"))
        assert "--ca-cert" in err["hint"]
        # no credentials
        err = lamina_fails(11, "pull", *ca, ref, "--layout", str(tmp_path / "x"),
                           env={"HOME": str(tmp_path)})
        assert "--creds" in err["hint"] and "401" in err["message"]
        # wrong password
        err = lamina_fails(11, "pull", *ca, "--creds", "alice:nope", ref, "--layout",
                           str(tmp_path / "x"))
        assert "rejected the credentials" in err["hint"]
        assert not (tmp_path / "x" / "index.json").exists() or tags(tmp_path / "x") == set()
        # plain http to a TLS port
        err = lamina_fails(11, "pull", "--insecure", "--creds", "alice:s3cret:pw", ref,
                           "--layout", str(tmp_path / "x"))
        assert "speaks https" in err["message"] and "drop --insecure" in err["hint"]
        # credentials from an auth file, and from the environment
        af = auth_json(tmp_path / "auth.json", reg.host, "alice", "s3cret:pw")
        res = lamina_ok("pull", *ca, "--authfile", str(af), ref, "--layout",
                        str(tmp_path / "a"))
        assert res["digest"] == pushed["digest"]
        res = lamina_ok("pull", *ca, ref, "--layout", str(tmp_path / "e"),
                        env={"LAMINA_CREDS": "alice:s3cret:pw"})
        assert res["digest"] == pushed["digest"]
        res = lamina_ok("pull", *ca, ref, "--layout", str(tmp_path / "f"),
                        env={"REGISTRY_AUTH_FILE": str(af)})
        assert res["downloaded"] == 3
        assert_clean(tmp_path / "f")
    finally:
        reg.stop()


def test_token_auth(tmp_path: Path, image: Path) -> None:
    need_tool("docker-registry")
    tokens = TokenServer(tmp_path / "tok", {"bob": "hunter2"})
    reg = Registry(tmp_path / "reg", token=tokens.registry_config()).start()
    try:
        creds = ["--creds", "bob:hunter2"]
        lamina_ok("push", "--insecure", *creds, "--layout", f"{image}:v1",
                  f"{reg.host}/team/a:v1")
        push_scopes = [r["scope"] for r in tokens.requests if r["user"] == "bob"]
        assert ["repository:team/a:pull,push"] in push_scopes
        # a mount needs pull on the source repository in the same token
        res = lamina_ok("push", "--insecure", *creds, "--from-repo", "team/a", "--layout",
                        f"{image}:v1", f"{reg.host}/team/b:v1")
        assert res["mounted"] == 3
        assert any("repository:team/a:pull" in r["scope"] and
                   "repository:team/b:pull,push" in r["scope"] for r in tokens.requests)
        res = lamina_ok("pull", "--insecure", *creds, f"{reg.host}/team/b:v1", "--layout",
                        str(tmp_path / "dst"))
        assert res["downloaded"] == 3
        assert tokens.requests[-1]["service"] == [TokenServer.service]
        # the token server refuses anonymous and wrong users
        err = lamina_fails(11, "pull", "--insecure", f"{reg.host}/team/b:v1", "--layout",
                           str(tmp_path / "x"), env={"HOME": str(tmp_path)})
        assert "token server" in err["message"] and "--creds" in err["hint"]
        err = lamina_fails(11, "pull", "--insecure", "--creds", "bob:wrong",
                           f"{reg.host}/team/b:v1", "--layout", str(tmp_path / "x"))
        assert "check the user name and password" in err["hint"]
    finally:
        reg.stop()
        tokens.close()


def test_connection_errors(registry: Registry, tmp_path: Path) -> None:
    # https to a plain-http registry
    err = lamina_fails(11, "pull", f"{registry.host}/x/y:v1", "--layout", str(tmp_path / "l"))
    assert "--insecure" in err["hint"]
    # nothing listening
    from registry_servers import free_port
    err = lamina_fails(11, "pull", "--insecure", f"127.0.0.1:{free_port()}/x/y:v1",
                       "--layout", str(tmp_path / "l"))
    assert "refused" in err["message"] and "running" in err["hint"]
    # plain http is for loopback registries only
    err = lamina_fails(2, "pull", "--insecure", "registry.example.com/x/y:v1",
                       "--layout", str(tmp_path / "l"))
    assert "--force-insecure" in err["hint"]
    err = lamina_fails(2, "pull", "--insecure", "127.0.0.1:1/Bad/Name", "--layout",
                       str(tmp_path / "l"))
    assert "bad repository name" in err["message"]


# -- failures ---------------------------------------------------------------------------


def test_registry_killed_mid_pull_then_resume(own_registry: Registry, tmp_path: Path) -> None:
    src = tmp_path / "src"
    big = 24 << 20
    build_image(str(src), "v1", layers_fixture(big=big), compression="none")
    ref = f"{own_registry.host}/kill/app:v1"
    lamina_ok("push", "--insecure", "--layout", f"{src}:v1", ref)
    big_desc = max(OCILayout.open(str(src)).resolve("v1").layers, key=lambda d: d.size)

    proxy = FaultProxy(own_registry.host)
    cut = 9 << 20

    def on_cut() -> None:
        own_registry.stop()   # the registry dies...
        proxy.close_soon()    # ...and its port stops answering

    proxy.rule = lambda m, p: Fault(cut_after=cut, on_cut=on_cut) \
        if m == "GET" and p.endswith(big_desc.digest) else None
    dst = tmp_path / "dst"
    try:
        err = lamina_fails(11, "pull", "--insecure", f"{proxy.host}/kill/app:v1",
                           "--layout", str(dst))
    finally:
        proxy.close()
    assert "refused" in err["message"] or "lost" in err["message"]
    assert tags(dst) == set()
    assert not (dst / "blobs/sha256" / big_desc.hex).exists()
    (partial,) = assert_clean(dst, partials_ok=True)
    assert partial.name == PARTIAL_PREFIX + big_desc.hex
    kept = partial.stat().st_size
    assert 0 < kept <= cut

    # the registry is back: the retry resumes the partial blob and verifies it whole
    own_registry.start()
    res = lamina_ok("pull", "--insecure", ref, "--layout", str(dst))
    assert res["resumed"] == 1 and res["bytes_resumed"] == kept
    assert big_desc.size - kept <= res["bytes_downloaded"] < big_desc.size
    assert_clean(dst)
    assert (dst / "blobs/sha256" / big_desc.hex).stat().st_size == big_desc.size
    assert diff_manifests(unpack_tree(src, "v1", tmp_path / "b1"),
                          unpack_tree(dst, "v1", tmp_path / "b2")) == []


def test_interrupted_pull_then_resume(registry: Registry, proxy: FaultProxy,
                                      tmp_path: Path) -> None:
    """SIGTERM (as Ctrl-C) mid-download: exit 130, no tag, only a resumable partial."""
    src = tmp_path / "src"
    build_image(str(src), "v1", layers_fixture(big=8 << 20), compression="none")
    ref = f"{registry.host}/term/app:v1"
    lamina_ok("push", "--insecure", "--layout", f"{src}:v1", ref)
    big = max(OCILayout.open(str(src)).resolve("v1").layers, key=lambda d: d.size)
    proxy.rule = lambda m, p: Fault(throttle=0.02) \
        if m == "GET" and p.endswith(big.digest) else None
    dst = tmp_path / "dst"
    partial = dst / "blobs/sha256" / (PARTIAL_PREFIX + big.hex)
    proc = subprocess.Popen([sys.executable, "-m", "lamina", "pull", "--insecure",
                             f"{proxy.host}/term/app:v1", "--layout", str(dst)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size > (256 << 10)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the download never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert tags(dst) == set()
    assert assert_clean(dst, partials_ok=True) == [partial]
    kept = partial.stat().st_size
    proxy.rule = lambda m, p: None
    res = lamina_ok("pull", "--insecure", f"{proxy.host}/term/app:v1", "--layout", str(dst))
    assert res["resumed"] == 1 and res["bytes_resumed"] == kept
    # only the rest of the big blob (and maybe a small one) went over the network
    assert big.size - kept <= res["bytes_downloaded"] < big.size
    assert_clean(dst)


def test_bad_partial_is_downloaded_again(registry: Registry, image: Path,
                                         tmp_path: Path) -> None:
    """A kept partial download that does not lead to the right digest (left by a
    lying server or a disk error) is dropped and the blob fetched whole, once."""
    ref = f"{registry.host}/badpart/app:v1"
    lamina_ok("push", "--insecure", "--layout", f"{image}:v1", ref)
    layer = max(OCILayout.open(str(image)).resolve("v1").layers, key=lambda d: d.size)
    dst = tmp_path / "dst"
    (dst / "blobs/sha256").mkdir(parents=True)
    bad = dst / "blobs/sha256" / (PARTIAL_PREFIX + layer.hex)
    bad.write_bytes(os.urandom(layer.size // 2))
    res = lamina_ok("pull", "--insecure", ref, "--layout", str(dst))
    assert res["resumed"] == 0 and res["downloaded"] == 3
    assert res["bytes_downloaded"] >= layer.size + layer.size // 2  # the try, then whole
    assert_clean(dst)
    assert tags(dst) == {"v1"}


def test_push_refuses_a_corrupt_layout(registry: Registry, image: Path) -> None:
    layer = OCILayout.open(str(image)).resolve("v1").layers[0]
    blob = image / "blobs/sha256" / layer.hex
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    ref = f"{registry.host}/corrupt/app:v1"
    err = lamina_fails(5, "push", "--insecure", "--layout", f"{image}:v1", ref)
    assert layer.digest in err["message"]
    # the manifest was not pushed: the tag does not exist in the registry
    lamina_fails(3, "pull", "--insecure", ref, "--layout", str(image.parent / "x"))


def test_wrong_digest_then_retry(registry: Registry, proxy: FaultProxy, image: Path,
                                 tmp_path: Path) -> None:
    lamina_ok("push", "--insecure", "--layout", f"{image}:v1", f"{registry.host}/lie/app:v1")
    layer = OCILayout.open(str(image)).resolve("v1").layers[0]
    proxy.rule = lambda m, p: Fault(corrupt=True) \
        if m == "GET" and p.endswith(layer.digest) else None
    dst = tmp_path / "dst"
    err = lamina_fails(5, "pull", "--insecure", f"{proxy.host}/lie/app:v1", "--layout",
                       str(dst))
    assert layer.digest in err["message"]
    assert ("GET", f"/v2/lie/app/blobs/{layer.digest}", "corrupted") in proxy.hits
    assert tags(dst) == set()
    assert not (dst / "blobs/sha256" / layer.hex).exists()
    assert_clean(dst)  # the bad bytes are not kept for a resume either
    proxy.rule = lambda m, p: None
    res = lamina_ok("pull", "--insecure", f"{proxy.host}/lie/app:v1", "--layout", str(dst))
    assert res["downloaded"] >= 1 and res["resumed"] == 0
    assert_clean(dst)
    assert tags(dst) == {"v1"}


@pytest.mark.parametrize(("status", "where", "code", "hint"), [
    (401, "manifests", 11, "--creds"),
    (404, "manifests", 3, "check the repository"),
    (500, "blobs", 11, "retry later"),
    (503, "manifests", 11, "retry later"),
])
def test_error_answers(registry: Registry, proxy: FaultProxy, image: Path, tmp_path: Path,
                       status: int, where: str, code: int, hint: str) -> None:
    repo = f"err{status}/app"
    lamina_ok("push", "--insecure", "--layout", f"{image}:v1", f"{registry.host}/{repo}:v1")
    headers = {"WWW-Authenticate": 'Basic realm="lamina-test"'} if status == 401 else None
    proxy.rule = lambda m, p: Fault(status=status, headers=headers) \
        if f"/{where}/" in p else None
    dst = tmp_path / "dst"
    err = lamina_fails(code, "pull", "--insecure", f"{proxy.host}/{repo}:v1", "--layout",
                       str(dst), env={"HOME": str(tmp_path)})
    assert hint in err["hint"] and str(status) in err["message"]
    assert any(h[2] == f"status {status}" for h in proxy.hits)
    assert tags(dst) == set()
    assert_clean(dst)
    proxy.rule = lambda m, p: None
    res = lamina_ok("pull", "--insecure", f"{proxy.host}/{repo}:v1", "--layout", str(dst))
    assert res["digest"] == OCILayout.open(str(image)).refs()["v1"].digest
    assert_clean(dst)


def test_pull_missing_tag_and_push_missing_tag(registry: Registry, image: Path,
                                               tmp_path: Path) -> None:
    err = lamina_fails(3, "pull", "--insecure", f"{registry.host}/nothing/here:v9",
                       "--layout", str(tmp_path / "l"))
    assert "MANIFEST_UNKNOWN" in err["message"] or "NAME_UNKNOWN" in err["message"]
    err = lamina_fails(3, "push", "--insecure", "--layout", f"{image}:nope",
                       f"{registry.host}/nothing/here:v9")
    assert "v1" in err["hint"]


# -- lazy reads -------------------------------------------------------------------------


def test_remote_blob_source_ranges(registry: Registry, tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_image(str(src), "v1", layers_fixture(big=1 << 20), compression="none")
    ref = RegistryRef.parse(f"{registry.host}/lazy/app:v1")
    push(PushOptions(ImageRef(str(src), "v1"), ref, registry=INSECURE))
    lay = OCILayout.open(str(src))
    desc = max(lay.resolve("v1").layers, key=lambda d: d.size)
    data = (src / "blobs/sha256" / desc.hex).read_bytes()
    with RemoteBlobSource(ref, INSECURE) as rs:
        assert rs.size(desc.digest) == desc.size
        assert rs.read_range(desc.digest, 0, 512) == data[:512]
        assert rs.read_range(desc.digest, 700_000, 65_536) == data[700_000:765_536]
        assert rs.read_range(desc.digest, desc.size - 10, 100) == data[-10:]
        assert rs.read_range(desc.digest, 5, 0) == b""
        assert rs.read_range(desc.digest, 0, desc.size) == data
        with pytest.raises(RegistryError, match="416"):
            rs.read_range(desc.digest, desc.size + 10, 5)
        with pytest.raises(NotFoundError):
            rs.size("sha256:" + "0" * 64)
