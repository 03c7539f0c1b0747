"""The image-editing commands (new, config, insert, tag, rm, ls, stat, gc) as a
user runs them, checked with skopeo and umoci where they can read the result:

- ``skopeo inspect`` reads what ``lamina new``/``config``/``insert`` write;
- ``umoci ls``/``umoci stat`` agree with ``lamina ls``/``lamina stat``;
- ``lamina config`` and ``umoci config`` given the same options make the same
  runtime config; ``lamina new`` and ``umoci new`` the same empty image;
- ``umoci unpack`` of an image ``lamina insert`` added to gives the tree
  ``lamina unpack`` gives;
- ``lamina gc`` and ``umoci gc`` keep the same blobs.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import need_tool, run_lamina
from lamina.oci import mediatypes as mt
from lamina.testing.images import build_image
from lamina.testing.layers import TarBuilder
from lamina.testing.tree import diff_manifests, tree_manifest


def ok(*args: str) -> subprocess.CompletedProcess[str]:
    r = run_lamina(list(args))
    assert r.returncode == 0, f"lamina {' '.join(args)}: {r.stderr}{r.stdout}"
    return r


def ok_json(*args: str) -> Any:
    return json.loads(ok(*args, "--json").stdout)


def skopeo_inspect(ref: str, *extra: str) -> Any:
    skopeo = need_tool("skopeo")
    r = subprocess.run([skopeo, "inspect", *extra, f"oci:{ref}"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def umoci(*args: str) -> subprocess.CompletedProcess[str]:
    tool = need_tool("umoci")
    r = subprocess.run([tool, *args], capture_output=True, text=True)
    assert r.returncode == 0, f"umoci {' '.join(args)}: {r.stderr}"
    return r


def read_config(layout: Path, tag: str) -> dict[str, Any]:
    idx = json.loads((layout / "index.json").read_text())
    (m,) = [d for d in idx["manifests"] if d["annotations"][mt.REF_NAME] == tag]
    manifest = json.loads((layout / "blobs/sha256" / m["digest"][7:]).read_text())
    cfg = json.loads((layout / "blobs/sha256" / manifest["config"]["digest"][7:]).read_text())
    assert isinstance(cfg, dict)
    return cfg


@pytest.fixture
def src(tmp_path: Path) -> Path:
    s = tmp_path / "src"
    (s / "bin").mkdir(parents=True)
    (s / "bin" / "app").write_bytes(b"#!/bin/sh\necho app\n")
    os.chmod(s / "bin" / "app", 0o755)
    os.symlink("app", s / "bin" / "app-link")
    (s / "share").mkdir()
    (s / "share" / "data").write_bytes(os.urandom(10000))
    return s


@pytest.mark.peer
def test_new_config_insert_read_by_skopeo(tmp_path: Path, src: Path) -> None:
    lay = tmp_path / "lay"
    res = ok_json("new", "--image", f"{lay}:base")
    assert res["tag"] == "base" and res["layer"] is None
    ok("config", "--image", f"{lay}:base", "--tag", "app", "--config.env", "A=1",
       "--config.entrypoint", "/opt/app/bin/app", "--config.cmd=--verbose",
       "--config.label", "org.example=yes", "--config.workingdir", "/opt/app",
       "--config.user", "1000:1000", "--config.exposedports", "8080/tcp",
       "--manifest.annotation", "note=hi", "--author", "tester",
       "--history.created_by", "configure")
    ins = ok_json("insert", "--image", f"{lay}:app", str(src), "/opt/app")
    assert ins["layer"]["mediaType"] == mt.LAYER_GZIP and ins["entries"] == 6
    ok("insert", "--image", f"{lay}:app", "--compress", "zstd", "--history.created_by",
       "notes", str(src / "share" / "data"), "/etc/notes")

    info = skopeo_inspect(f"{lay}:app")
    assert info["Architecture"] and info["Os"] == "linux"
    assert info["Env"] == ["A=1"]
    assert info["Labels"] == {"org.example": "yes"}
    assert len(info["Layers"]) == 2
    cfg = skopeo_inspect(f"{lay}:app", "--config")
    assert cfg["author"] == "tester"
    assert cfg["history"][0]["author"] == "tester"  # like umoci: the image's author
    assert cfg["config"]["Entrypoint"] == ["/opt/app/bin/app"]
    assert cfg["config"]["Cmd"] == ["--verbose"]
    assert cfg["config"]["WorkingDir"] == "/opt/app" and cfg["config"]["User"] == "1000:1000"
    assert cfg["config"]["ExposedPorts"] == {"8080/tcp": {}}
    assert [h.get("created_by") for h in cfg["history"]] == [
        "configure", f"lamina insert {src} /opt/app", "notes"]
    assert cfg["history"][0]["empty_layer"] is True
    raw = skopeo_inspect(f"{lay}:app", "--raw")
    assert raw["annotations"] == {"note": "hi"}
    assert [ly["mediaType"] for ly in raw["layers"]] == [mt.LAYER_GZIP, mt.LAYER_ZSTD]
    # the empty image is a valid image too, and untouched
    assert skopeo_inspect(f"{lay}:base")["Layers"] == []

    # a copy through skopeo verifies every digest lamina wrote
    skopeo = need_tool("skopeo")
    r = subprocess.run([skopeo, "copy", f"oci:{lay}:app", f"oci:{tmp_path / 'copy'}:app"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.peer
def test_ls_and_stat_agree_with_umoci(tmp_path: Path, src: Path) -> None:
    lay = tmp_path / "lay"
    build_image(str(lay), "base", [TarBuilder().add_dir("etc").build()])
    ok("config", "--image", f"{lay}:base", "--tag", "v1", "--config.cmd", "sh",
       "--history.comment", "a comment")
    ok("insert", "--image", f"{lay}:v1", str(src), "/srv")
    ok("tag", "--image", f"{lay}:v1", "v1.0")
    ok("insert", "--image", f"{lay}:v1", "--whiteout", "/etc")

    assert ok("ls", "--layout", str(lay)).stdout == "base\nv1\nv1.0\n"
    assert sorted(umoci("ls", "--layout", str(lay)).stdout.split()) == ["base", "v1", "v1.0"]
    ls = ok_json("ls", "--layout", str(lay))
    assert [e["tag"] for e in ls] == ["base", "v1", "v1.0"]
    assert ls[1]["digest"] != ls[2]["digest"]

    ours = ok_json("stat", "--image", f"{lay}:v1")["history"]
    theirs = json.loads(umoci("stat", "--image", f"{lay}:v1", "--json").stdout)["history"]
    assert len(ours) == len(theirs) == 4
    for a, b in zip(ours, theirs, strict=True):
        assert a["layer"] == b["layer"]
        assert a["diff_id"] == b["diff_id"]
        for k in ("created_by", "comment", "empty_layer"):
            assert a.get(k) == b.get(k), k
        # umoci re-prints the time (Go drops trailing zeros of the fraction)
        assert dt.datetime.fromisoformat(a["created"]) == dt.datetime.fromisoformat(
            b["created"])
    text = ok("stat", "--image", f"{lay}:v1").stdout.splitlines()
    assert text[0].split() == ["LAYER", "CREATED", "CREATED", "BY", "SIZE", "COMMENT"]
    assert text[2].startswith("<none>") and text[2].rstrip().endswith("a comment")
    assert text[3].startswith(ours[2]["layer"]["digest"])
    umoci_text = umoci("stat", "--image", f"{lay}:v1").stdout.splitlines()
    assert [ln.split()[0] for ln in text] == [ln.split()[0] for ln in umoci_text]


@pytest.mark.peer
def test_config_like_umoci_config(tmp_path: Path) -> None:
    lay = tmp_path / "lay"
    build_image(str(lay), "base", [TarBuilder().add_file("f", b"f").build()],
                config={"Env": ["PATH=/bin", "A=0"], "Cmd": ["old"],
                        "Labels": {"keep": "1"}})
    opts = ["--config.env", "A=1", "--config.env", "B=2", "--config.entrypoint", "/e",
            "--config.entrypoint", "x", "--config.label", "l=v", "--config.volume", "/v",
            "--config.exposedports", "53/udp", "--config.workingdir", "/w",
            "--config.user", "u", "--config.stopsignal", "SIGINT", "--clear",
            "config.cmd", "--architecture", "arm64", "--os", "linux",
            "--created", "2024-01-01T00:00:00Z", "--author", "a",
            "--history.created_by", "x", "--history.created", "2024-01-01T00:00:01Z"]
    ok("config", "--image", f"{lay}:base", "--tag", "ours", *opts)
    umoci("config", "--image", f"{lay}:base", "--tag", "theirs", *opts)
    ours, theirs = read_config(lay, "ours"), read_config(lay, "theirs")
    for k in ("config", "architecture", "os", "created", "author", "rootfs", "history"):
        assert ours.get(k) == theirs.get(k), k
    # lamina new makes what umoci new makes
    ok("new", "--image", f"{lay}:new-ours")
    umoci("new", "--image", f"{lay}:new-theirs")
    a, b = read_config(lay, "new-ours"), read_config(lay, "new-theirs")
    a.pop("created"), b.pop("created")
    assert a == b


@pytest.mark.peer
@pytest.mark.usefixtures("require_root")
def test_inserted_layers_unpack_alike(tmp_path: Path, src: Path) -> None:
    lay = tmp_path / "lay"
    build_image(str(lay), "base", [
        TarBuilder().add_dir("opt").add_dir("opt/app").add_file("opt/app/old", b"old")
        .add_dir("etc").add_file("etc/hostname", b"x").add_file("etc/keep", b"k").build()])
    ok("insert", "--image", f"{lay}:base", "--opaque", str(src), "/opt/app")
    ok("insert", "--image", f"{lay}:base", str(src / "bin" / "app"), "/usr/local/bin/renamed")
    ok("insert", "--image", f"{lay}:base", "--whiteout", "etc/hostname")
    umoci("unpack", "--image", f"{lay}:base", str(tmp_path / "theirs"))
    ok("unpack", "--image", f"{lay}:base", str(tmp_path / "ours"))
    rootfs = tmp_path / "ours" / "rootfs"
    assert not (rootfs / "opt/app/old").exists()
    assert not (rootfs / "etc/hostname").exists() and (rootfs / "etc/keep").exists()
    assert (rootfs / "usr/local/bin/renamed").read_bytes() == b"#!/bin/sh\necho app\n"
    assert os.readlink(rootfs / "opt/app/bin/app-link") == "app"
    assert (rootfs / "opt/app/share/data").read_bytes() == (src / "share/data").read_bytes()
    ours = tree_manifest(str(rootfs), mtime=True)
    theirs = tree_manifest(str(tmp_path / "theirs" / "rootfs"), mtime=True)
    # parents insert did not write (usr/local/bin) are made at unpack time: their mtimes
    # are the unpack's, the rest (modes, owners, contents, mtimes) must match
    diff = [d for d in diff_manifests(ours, theirs, ignore_root=True)
            if not (d.startswith("usr") and "mtime_ns" in d and "/renamed" not in d)]
    assert not diff, "\n".join(diff)


@pytest.mark.peer
def test_gc_keeps_what_umoci_gc_keeps(tmp_path: Path, src: Path) -> None:
    lay = tmp_path / "lay"
    build_image(str(lay), "base", [TarBuilder().add_file("a", b"a").build()])
    ok("insert", "--image", f"{lay}:base", "--tag", "big", str(src), "/srv")
    ok("config", "--image", f"{lay}:big", "--config.user", "nobody")
    ok("rm", "--image", f"{lay}:big")
    blobs = lay / "blobs" / "sha256"
    theirs = tmp_path / "theirs"
    shutil.copytree(lay, theirs, symlinks=True)  # umoci 0.4.7's gc trips on .tmp-* files
    stale = blobs / ".tmp-crashed"
    stale.write_bytes(b"partial")
    os.utime(stale, (1, 1))
    (blobs / ".tmp-live").write_bytes(b"writing")

    dry = ok_json("gc", "--layout", str(lay), "--dry-run")
    assert dry["dry_run"] and len(dry["removed"]) == 5  # layer, 2 configs, 2 manifests
    res = ok_json("gc", "--layout", str(lay))
    assert res["removed"] == dry["removed"] and res["removed_tmp"] == [
        "blobs/sha256/.tmp-crashed"]
    assert not stale.exists() and (blobs / ".tmp-live").exists()
    umoci("gc", "--layout", str(theirs))
    ours = {n for n in os.listdir(blobs) if not n.startswith(".")}
    kept = {n for n in os.listdir(theirs / "blobs/sha256") if not n.startswith(".")}
    assert ours == kept
    # nothing left to collect; the remaining image is intact
    again = ok_json("gc", "--layout", str(lay))
    assert again["removed"] == [] and again["kept"] == len(ours)
    assert len(skopeo_inspect(f"{lay}:base")["Layers"]) == 1
    text = ok("gc", "--layout", str(lay)).stderr
    assert "removed 0 blobs" in text


def test_errors_have_codes_and_hints(tmp_path: Path) -> None:
    lay = tmp_path / "lay"
    ok("new", "--image", f"{lay}:base")
    r = run_lamina(["tag", "--image", f"{lay}:nope", "x"])
    assert r.returncode == 3 and "hint" in r.stderr and "base" in r.stderr
    r = run_lamina(["config", "--image", f"{lay}:base", "--created", "yesterday"])
    assert r.returncode == 2 and "RFC 3339" in r.stderr
    r = run_lamina(["config", "--image", f"{lay}:base", "--config.env", "NOEQUALS"])
    assert r.returncode == 2 and "KEY=VALUE" in r.stderr
    r = run_lamina(["config", "--image", f"{lay}:base", "--clear", "config.bogus"])
    assert r.returncode == 2
    r = run_lamina(["insert", "--image", f"{lay}:base", "/only-one"])
    assert r.returncode == 2 and "SOURCE and TARGET" in r.stderr
    r = run_lamina(["insert", "--image", f"{lay}:base", "--whiteout", "/", "--json"])
    assert r.returncode == 2 and json.loads(r.stdout)["error"] == "usage"
    r = run_lamina(["new", "--image", f"{lay}:base"])
    assert r.returncode == 2 and "lamina rm" in r.stderr
    r = run_lamina(["rm", "--image", f"{lay}:base"])
    assert r.returncode == 0
    r = run_lamina(["ls", "--layout", str(tmp_path / "missing")])
    assert r.returncode == 3
    r = run_lamina(["stat", "--image", f"{lay}:base", "--json"])
    assert r.returncode == 3 and json.loads(r.stdout)["error"] == "not-found"


def test_source_date_epoch_makes_edits_reproducible(tmp_path: Path, src: Path) -> None:
    digests = []
    for name in ("a", "b"):
        lay = tmp_path / name
        env = {"SOURCE_DATE_EPOCH": "1700000000"}
        for args in (["new", "--image", f"{lay}:t"],
                     ["config", "--image", f"{lay}:t", "--config.cmd", "sh"],
                     ["insert", "--image", f"{lay}:t", str(src), "/srv"]):
            r = run_lamina(args, env=env)
            assert r.returncode == 0, r.stderr
        digests.append(json.loads(run_lamina(["ls", "--layout", str(lay), "--json"]).stdout))
    assert digests[0] == digests[1]
