"""Hooks at their call sites, through the real CLI: unpack (try-skip, pre/post-extract,
lookup) and repack (delta-list, refresh-bundle), including failures that must leave
nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import need_tool, run_lamina
from lamina.oci.layout import OCILayout
from lamina.store.ids import chain_ids
from lamina.testing.images import build_image, diff_id
from lamina.testing.layers import TarBuilder
from lamina.testing.tree import diff_manifests, tree_manifest

pytestmark = pytest.mark.usefixtures("require_root")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hooks" / "try-skip-reuse.sh"


def layers() -> list[bytes]:
    l1 = (TarBuilder().add_dir("etc").add_file("etc/os", b"base\n")
          .add_dir("usr").add_file("usr/tool", b"#!/bin/sh\n", mode=0o755)
          .add_file("usr/gone", b"x\n").add_hardlink("usr/tool-link", "usr/tool", mode=0o755)
          .add_symlink("bin", "usr").add_file("owned", b"o\n", uid=7, gid=8).build())
    l2 = (TarBuilder().add_dir("etc").add_file("etc/os", b"second\n")
          .add_dir("usr").add_whiteout("usr/gone").add_file("two", b"2\n").build())
    l3 = TarBuilder().add_dir("app").add_file("app/main", b"main\n", mode=0o700).build()
    return [l1, l2, l3]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    # no user hooks.toml of the machine running the tests
    return {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def hooks_file(tmp_path: Path, entries: list[tuple[str, Path, str]]) -> Path:
    text = "".join(f'[["{ev}"]]\npath = "{p}"\n{extra}\n' for ev, p, extra in entries)
    f = tmp_path / "hooks.toml"
    f.write_text(text)
    return f


def unpack(layout: Path, bundle: Path, env: dict[str, str], *extra: str,
           tag: str = "t") -> subprocess.CompletedProcess[str]:
    return run_lamina(["unpack", "--image", f"{layout}:{tag}", *extra, "--json", str(bundle)],
                      env=env)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".lamina-" in p.name)


def test_try_skip_example_reuses_a_tar_extraction(tmp_path: Path, env: dict[str, str]) -> None:
    ls = layers()
    layout = tmp_path / "layout"
    build_image(str(layout), "t", ls)
    ref = tmp_path / "ref"
    p = unpack(layout, ref, env)
    assert p.returncode == 0, p.stderr

    # the "other tool": tar -x of the bottom layer, kept under its chain id (= diff_id)
    cache = tmp_path / "cache"
    tree = cache / diff_id(ls[0]).removeprefix("sha256:")
    tree.mkdir(parents=True)
    (tmp_path / "l1.tar").write_bytes(ls[0])
    subprocess.run(["tar", "-xpf", str(tmp_path / "l1.tar"), "-C", str(tree),
                    "--same-owner"], check=True)
    cfg = hooks_file(tmp_path, [("layer.try-skip", EXAMPLE,
                                 f'env = {{ REUSE_CACHE = "{cache}" }}')])
    # proof that lamina never reads the skipped layer: its blob is gone
    lay = OCILayout.open(str(layout))
    manifest = lay.resolve("t")
    os.unlink(lay.blob_path(manifest.layers[0].digest))

    b = tmp_path / "b"
    p = unpack(layout, b, env, "--hooks", str(cfg))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["skipped"] == 1
    assert diff_manifests(tree_manifest(str(ref / "rootfs")),
                          tree_manifest(str(b / "rootfs"))) == []
    # without the hook the missing blob is needed
    p = unpack(layout, tmp_path / "c", env)
    assert p.returncode == 3, p.stderr

    # and the bundle repacks like any other: an edit becomes one layer
    (b / "rootfs" / "etc" / "os").write_text("edited\n")
    p = run_lamina(["repack", "--image", f"{layout}:edited", "--json", str(b)], env=env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["added"] == 1


def test_try_skip_example_reuses_umoci_raw_unpack(tmp_path: Path, env: dict[str, str]) -> None:
    umoci = need_tool("umoci")
    ls = layers()
    layout = tmp_path / "layout"
    build_image(str(layout), "base", ls[:2])
    build_image(str(layout), "t", ls)
    cache = tmp_path / "cache"
    cache.mkdir()
    top = chain_ids([diff_id(x) for x in ls[:2]])[-1]
    subprocess.run([umoci, "raw", "unpack", "--image", f"{layout}:base",
                    str(cache / top.removeprefix("sha256:"))], check=True, capture_output=True)
    cfg = hooks_file(tmp_path, [("layer.try-skip", EXAMPLE,
                                 f'env = {{ REUSE_CACHE = "{cache}" }}')])
    ref, b = tmp_path / "ref", tmp_path / "b"
    assert unpack(layout, ref, env).returncode == 0
    p = unpack(layout, b, env, "--hooks", str(cfg))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["skipped"] == 2
    assert diff_manifests(tree_manifest(str(ref / "rootfs")),
                          tree_manifest(str(b / "rootfs"))) == []


def test_try_skip_asked_top_down_with_chain_ids(tmp_path: Path, env: dict[str, str]) -> None:
    ls = layers()
    layout = tmp_path / "layout"
    build_image(str(layout), "t", ls)
    log = tmp_path / "docs.jsonl"
    h = script(tmp_path / "h.sh", f"cat >> {log}; echo >> {log}; exit 3\n")
    cfg = hooks_file(tmp_path, [("layer.try-skip", h, "")])
    p = unpack(layout, tmp_path / "b", env, "--hooks", str(cfg))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["skipped"] == 0
    docs = [json.loads(x) for x in log.read_text().splitlines() if x]
    ids = chain_ids([diff_id(x) for x in ls])
    assert [(d["index"], d["chain_id"]) for d in docs] == [(2, ids[2]), (1, ids[1]),
                                                          (0, ids[0])]
    d = docs[0]
    assert d["version"] == 1 and d["event"] == "layer.try-skip" and d["scope"] == "chain"
    assert d["bundle"] == str(tmp_path / "b") and d["diff_id"] == diff_id(ls[2])
    assert d["layer"]["mediaType"].endswith("tar+gzip")
    assert d["rootfs"].startswith(str(tmp_path / ".b.lamina-"))
    assert d["options"] == {"rootless": False, "uid_map": [], "gid_map": []}


def test_declining_hook_that_writes_is_refused(tmp_path: Path, env: dict[str, str]) -> None:
    layout = tmp_path / "layout"
    build_image(str(layout), "t", layers())
    h = script(tmp_path / "h.sh",
               "r=$(jq -r .rootfs); touch \"$r/junk\"; exit 3\n")
    cfg = hooks_file(tmp_path, [("layer.try-skip", h, "")])
    p = unpack(layout, tmp_path / "b", env, "--hooks", str(cfg))
    assert p.returncode == 12
    assert "declined layer 3 but left files" in json.loads(p.stdout)["message"]
    assert not (tmp_path / "b").exists() and leftovers(tmp_path) == []


def test_pre_and_post_extract_order(tmp_path: Path, env: dict[str, str]) -> None:
    layout = tmp_path / "layout"
    build_image(str(layout), "t", layers())
    log = tmp_path / "log"
    # post-extract sees the layer applied: app/main exists only after layer 3
    body = (f'd=$(cat); i=$(printf %s "$d" | jq .index); r=$(printf %s "$d" | jq -r .rootfs)\n'
            f'[ -e "$r/app/main" ] && m=yes || m=no\n'
            f'echo "$LAMINA_HOOK_EVENT $i $m" >> {log}\n')
    pre = script(tmp_path / "pre.sh", body)
    post = script(tmp_path / "post.sh", body)
    cfg = hooks_file(tmp_path, [("layer.pre-extract", pre, ""),
                                ("layer.post-extract", post, "")])
    p = unpack(layout, tmp_path / "b", env, "--hooks", str(cfg))
    assert p.returncode == 0, p.stderr
    assert log.read_text().splitlines() == [
        "layer.pre-extract 0 no", "layer.post-extract 0 no",
        "layer.pre-extract 1 no", "layer.post-extract 1 no",
        "layer.pre-extract 2 no", "layer.post-extract 2 yes"]


@pytest.mark.parametrize(("event", "body", "extra", "message"), [
    ("layer.post-extract", "cat >/dev/null; echo 'quota exceeded' >&2; exit 1\n", "",
     "quota exceeded"),
    ("layer.pre-extract", "exec sleep 30\n", "timeout = 0.5", "timed out after 0.5s"),
    ("layer.try-skip", "r=$(jq -r .rootfs); touch \"$r/half\"; exit 9\n", "",
     "exit status 9"),
])
def test_failing_hook_aborts_unpack_cleanly(tmp_path: Path, env: dict[str, str], event: str,
                                            body: str, extra: str, message: str) -> None:
    layout = tmp_path / "layout"
    build_image(str(layout), "t", layers())
    h = script(tmp_path / "h.sh", body)
    cfg = hooks_file(tmp_path, [(event, h, extra)])
    p = unpack(layout, tmp_path / "b", env, "--hooks", str(cfg))
    assert p.returncode == 12, p.stderr
    err = json.loads(p.stdout)
    assert err["error"] == "hook" and message in err["message"] and err["hint"]
    assert not (tmp_path / "b").exists() and leftovers(tmp_path) == []


def test_lookup_hook_finds_the_image_elsewhere(tmp_path: Path, env: dict[str, str]) -> None:
    real = tmp_path / "real"
    build_image(str(real), "v1", layers())
    empty = tmp_path / "empty"
    build_image(str(empty), "other", layers()[:1])
    h = script(tmp_path / "h.sh", f'[ "$(jq -r .tag)" = v1 ] || exit 3\necho "{real}"\n')
    cfg = hooks_file(tmp_path, [("lookup", h, "")])
    p = unpack(empty, tmp_path / "b", env, "--hooks", str(cfg), tag="v1")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "b" / "rootfs" / "app" / "main").read_bytes() == b"main\n"
    p = unpack(empty, tmp_path / "c", env, "--hooks", str(cfg), tag="v2")
    assert p.returncode == 3  # declined: the usual not-found error
    # the same through a chosen driver
    p = unpack(empty, tmp_path / "d", env, "--hooks", str(cfg), "--driver", "copy", tag="v1")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "d" / "rootfs" / "app" / "main").read_bytes() == b"main\n"


# -- repack ---------------------------------------------------------------------------------


def _bundle(tmp_path: Path, env: dict[str, str]) -> tuple[Path, Path]:
    layout = tmp_path / "layout"
    build_image(str(layout), "t", layers())
    b = tmp_path / "b"
    p = unpack(layout, b, env)
    assert p.returncode == 0, p.stderr
    return layout, b


def _top_layer_names(layout: Path, tag: str) -> list[str]:
    lay = OCILayout.open(str(layout))
    top = lay.resolve(tag).layers[-1]
    with tarfile.open(lay.blob_path(top.digest)) as tf:
        return sorted(m.name for m in tf.getmembers())


def test_delta_list_hook_limits_the_scan(tmp_path: Path, env: dict[str, str]) -> None:
    layout, b = _bundle(tmp_path, env)
    r = b / "rootfs"
    (r / "etc" / "os").write_text("changed\n")
    (r / "app" / "new").write_text("new\n")
    (r / "two").unlink()
    (r / "owned").write_text("changed but not listed\n")
    listed = tmp_path / "listed"
    listed.write_bytes(b"./etc/os\0app/new\0two\0")
    h = script(tmp_path / "h.sh", f'jq -e .rootfs >/dev/null && cat {listed}\n')
    cfg = hooks_file(tmp_path, [("repack.delta-list", h, "")])
    p = run_lamina(["repack", "--image", f"{layout}:d", "--hooks", str(cfg),
                    "--refresh-bundle", "--json", str(b)], env=env)
    assert p.returncode == 0, p.stderr
    # what a full scan gives, but for "owned" (not listed); the root and "app" are there
    # because adding and removing entries changed their mtimes
    assert _top_layer_names(layout, "d") == [".", ".wh.two", "app", "app/new", "etc/os"]
    # a full scan after the refresh still sees the unlisted change: its row was kept
    p = run_lamina(["repack", "--image", f"{layout}:e", "--json", str(b)], env=env)
    assert p.returncode == 0, p.stderr
    assert _top_layer_names(layout, "e") == ["owned"]


def test_delta_list_hook_bad_answer(tmp_path: Path, env: dict[str, str]) -> None:
    layout, b = _bundle(tmp_path, env)
    h = script(tmp_path / "h.sh", "cat >/dev/null; printf '../etc/shadow\\0'\n")
    cfg = hooks_file(tmp_path, [("repack.delta-list", h, "")])
    before = (layout / "index.json").read_bytes()
    p = run_lamina(["repack", "--image", f"{layout}:d", "--hooks", str(cfg), "--json",
                    str(b)], env=env)
    assert p.returncode == 12
    assert "invalid path '../etc/shadow'" in json.loads(p.stdout)["message"]
    assert (layout / "index.json").read_bytes() == before


def test_refresh_bundle_hook(tmp_path: Path, env: dict[str, str]) -> None:
    layout, b = _bundle(tmp_path, env)
    (b / "rootfs" / "etc" / "os").write_text("changed\n")
    meta_before = (b / "lamina.json").read_bytes()
    index_before = (layout / "index.json").read_bytes()
    bad = script(tmp_path / "bad.sh", "cat >/dev/null; echo nope >&2; exit 2\n")
    cfg = hooks_file(tmp_path, [("repack.refresh-bundle", bad, "")])
    p = run_lamina(["repack", "--image", f"{layout}:r", "--hooks", str(cfg),
                    "--refresh-bundle", "--json", str(b)], env=env)
    assert p.returncode == 12 and "nope" in json.loads(p.stdout)["message"]
    # the tag did not move and the bundle still describes the old image
    assert (layout / "index.json").read_bytes() == index_before
    assert (b / "lamina.json").read_bytes() == meta_before

    seen = tmp_path / "seen.json"
    good = script(tmp_path / "good.sh", f"cat > {seen}\n")
    cfg = hooks_file(tmp_path, [("repack.refresh-bundle", good, "")])
    p = run_lamina(["repack", "--image", f"{layout}:r", "--hooks", str(cfg),
                    "--refresh-bundle", "--json", str(b)], env=env)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    doc = json.loads(seen.read_text())
    assert doc["event"] == "repack.refresh-bundle" and doc["manifest"] == res["manifest"]
    assert doc["new_layer"] == res["layer"] and doc["previous_manifest"] != res["manifest"]
    assert json.loads((b / "lamina.json").read_text())["manifest"] == res["manifest"]


def test_hooks_from_xdg_config(tmp_path: Path, env: dict[str, str]) -> None:
    layout = tmp_path / "layout"
    build_image(str(layout), "t", layers())
    xdg = Path(env["XDG_CONFIG_HOME"]) / "lamina"
    xdg.mkdir(parents=True)
    h = script(xdg / "fail.sh", "exit 5\n")
    (xdg / "hooks.toml").write_text(f'[["layer.pre-extract"]]\npath = "{h}"\n')
    p = unpack(layout, tmp_path / "b", env)
    assert p.returncode == 12 and "exit status 5" in json.loads(p.stdout)["message"]
    shutil.rmtree(xdg)
    assert unpack(layout, tmp_path / "b", env).returncode == 0


def test_hooks_through_the_copy_driver(tmp_path: Path, env: dict[str, str]) -> None:
    layout = tmp_path / "layout"
    build_image(str(layout), "t", layers())
    log = tmp_path / "log"
    h = script(tmp_path / "h.sh", f'jq -r .annotations.who >> {log}\n')
    cfg = hooks_file(tmp_path, [("layer.post-extract", h, "")])
    p = unpack(layout, tmp_path / "b", env, "--driver", "copy", "--annotation", "who=me",
               "--hooks", str(cfg))
    assert p.returncode == 0, p.stderr
    assert log.read_text() == "me\nme\nme\n"
