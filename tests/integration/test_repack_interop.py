"""Images lamina repacks are read the same way by umoci and skopeo, and back.

- ``umoci unpack`` of a lamina-repacked image gives the tree lamina gives
  (``tree_manifest`` equality, mtimes included);
- ``skopeo inspect`` / ``skopeo copy`` accept lamina's layout and blobs
  (also zstd layers, which umoci 0.4.7 cannot read);
- ``umoci repack`` of an edited umoci bundle is unpacked by lamina to the tree
  umoci had in its bundle.

Differences umoci is known to introduce, proven in :func:`test_umoci_known_differences`
and ignored (only those) elsewhere:

1. the rootfs directory itself: umoci gives it mtime 0 when no layer has a
   ``.`` entry (lamina's layers and the test kit's never have one);
2. ``umoci repack`` writes whole-second mtimes (Go archive/tar rounds
   ``ModTime`` to the second and writes no pax mtime record), so the mtimes of
   an umoci bundle are rounded to the nearest second.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from conftest import need_tool, run_lamina
from lamina.oci import mediatypes as mt
from lamina.testing.images import build_image
from lamina.testing.layers import TarBuilder
from lamina.testing.tree import Manifest, diff_manifests, tree_manifest

pytestmark = [pytest.mark.usefixtures("require_root"), pytest.mark.peer]


def lower_layers() -> list[bytes]:
    l1 = (TarBuilder()
          .add_dir("etc").add_file("etc/hostname", b"box\n")
          .add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
          .add_dir("usr").add_dir("usr/bin")
          .add_file("usr/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o4755)
          .add_hardlink("usr/bin/tool-alias", "usr/bin/tool", mode=0o4755)
          .add_symlink("usr/bin/sh-link", "/usr/bin/tool")
          .add_dir("data", mode=0o750, uid=1000, gid=1000)
          .add_file("data/a", b"a\n", uid=1000, gid=1000, xattrs={"user.k": b"\x00\x01v"})
          .add_file("data/b", b"b\n", mode=0o600)
          .add_file("data/gone", b"gone\n")
          .add_dir("tree").add_dir("tree/x").add_file("tree/x/1", b"1\n")
          .add_dir("swap").add_file("swap/child", b"c\n")
          .add_file("was-file", b"f\n")
          .add_dir("opq").add_file("opq/old", b"old\n")
          .add_fifo("fifo")
          .add_char("null", 1, 3)
          .build())
    l2 = (TarBuilder()
          .add_dir("tree/y").add_file("tree/y/2", b"2\n")
          .add_file("opq/old2", b"old2\n")
          .add_file("data/c", b"c\n", mtime=1_600_000_123)
          .build())
    return [l1, l2]


def make_image(layout: Path, tag: str = "base") -> None:
    # gzip only: umoci 0.4.7 cannot read zstd layers
    build_image(str(layout), tag, lower_layers(), compression="gzip",
                config={"Cmd": ["/bin/sh"], "Env": ["A=1"], "Labels": {"l": "v"}})


def edit(root: Path) -> None:
    """Edits of every kind (the ones both lamina and umoci repack handle today)."""
    (root / "new/sub").mkdir(parents=True)
    (root / "new/sub/file").write_bytes(os.urandom(3000))
    (root / "new/empty.txt").write_bytes(b"")
    os.symlink("../data/a", root / "new/link")
    (root / "new/pair1").write_bytes(b"pair\n")
    os.link(root / "new/pair1", root / "new/pair2")
    os.mkfifo(root / "new/fifo")
    (root / "new" / ("n" * 150)).write_bytes(b"long\n")
    (root / "new/é").write_bytes(b"utf8\n")
    (root / "data/a").write_bytes(b"changed\n")
    os.chmod(root / "data/b", 0o640)
    os.chown(root / "data/c", 4242, 4343)
    os.utime(root / "data/c", (1_500_000_000, 1_500_000_000))
    (root / "data/gone").unlink()
    shutil.rmtree(root / "tree")
    shutil.rmtree(root / "swap")
    (root / "swap").write_bytes(b"file now\n")
    (root / "was-file").unlink()
    (root / "was-file").mkdir()
    (root / "was-file/in").write_bytes(b"in\n")
    (root / "opq.new").mkdir()
    (root / "opq.new/fresh").write_bytes(b"fresh\n")
    shutil.rmtree(root / "opq")
    os.rename(root / "opq.new", root / "opq")
    os.chmod(root / "new", 0o1777)


def lamina_ok(*args: str) -> subprocess.CompletedProcess[str]:
    r = run_lamina(list(args))
    assert r.returncode == 0, r.stderr + r.stdout
    return r


def tool(*args: str) -> subprocess.CompletedProcess[str]:
    r: subprocess.CompletedProcess[str] = subprocess.run(
        list(args), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{args}: {r.stderr}"
    return r


def manifests(a: Path, b: Path, *, seconds: bool = False) -> tuple[Manifest, Manifest]:
    """Manifests with mtimes; the root's mtime dropped (difference 1); with *seconds*
    mtimes are rounded to the nearest second (difference 2)."""
    ma, mb = tree_manifest(str(a), mtime=True), tree_manifest(str(b), mtime=True)
    for m in (ma, mb):
        m["."].pop("mtime_ns")
        if seconds:
            for e in m.values():
                if "mtime_ns" in e:
                    e["mtime_ns"] = (e["mtime_ns"] + 500_000_000) // 10**9 * 10**9
    return ma, mb


def assert_same(a: Path, b: Path, names: tuple[str, str], *, seconds: bool = False) -> None:
    ma, mb = manifests(a, b, seconds=seconds)
    diff = diff_manifests(ma, mb, names=names)
    assert not diff, "\n".join(diff)


def tag_manifest(layout: Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    idx = json.loads((layout / "index.json").read_text())
    for d in idx["manifests"]:
        if d.get("annotations", {}).get(mt.REF_NAME) == tag:
            man = json.loads((layout / "blobs/sha256" / d["digest"][7:]).read_bytes())
            return d, man
    raise AssertionError(f"no tag {tag}")


@pytest.fixture
def repacked(tmp_path: Path) -> tuple[Path, Path]:
    """(layout with tag 'edited' made by lamina repack, lamina's edited bundle)."""
    layout, bundle = tmp_path / "layout", tmp_path / "lb"
    make_image(layout)
    lamina_ok("unpack", "--image", f"{layout}:base", str(bundle))
    edit(bundle / "rootfs")
    lamina_ok("repack", "--image", f"{layout}:edited", str(bundle))
    return layout, bundle


def test_umoci_unpacks_lamina_repack_identically(repacked: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    need_tool("umoci")
    layout, bundle = repacked
    tool("umoci", "unpack", "--image", f"{layout}:edited", str(tmp_path / "ub"))
    lamina_ok("unpack", "--image", f"{layout}:edited", str(tmp_path / "lb2"))
    # umoci's tree == lamina's tree of the same image == the edited tree
    assert_same(tmp_path / "lb2/rootfs", tmp_path / "ub/rootfs", ("lamina", "umoci"))
    assert_same(bundle / "rootfs", tmp_path / "ub/rootfs", ("edited", "umoci"))
    # and umoci's runtime config agrees on the process
    ucfg = json.loads((tmp_path / "ub/config.json").read_text())
    lcfg = json.loads((tmp_path / "lb2/config.json").read_text())
    assert ucfg["process"]["args"] == lcfg["process"]["args"] == ["/bin/sh"]
    assert "A=1" in ucfg["process"]["env"] and "A=1" in lcfg["process"]["env"]


def test_umoci_unpacks_lamina_refreshed_chain(tmp_path: Path) -> None:
    """Two successive repacks (--refresh-bundle) give a 4-layer image umoci reads."""
    need_tool("umoci")
    layout, bundle = tmp_path / "layout", tmp_path / "lb"
    make_image(layout)
    lamina_ok("unpack", "--image", f"{layout}:base", str(bundle))
    edit(bundle / "rootfs")
    lamina_ok("repack", "--refresh-bundle", "--image", f"{layout}:v1", str(bundle))
    root = bundle / "rootfs"
    (root / "new/sub/file").unlink()
    (root / "opq/fresh").write_bytes(b"again\n")
    shutil.rmtree(root / "was-file")
    lamina_ok("repack", "--image", f"{layout}:v2", str(bundle))
    _, man = tag_manifest(layout, "v2")
    assert len(man["layers"]) == 4
    tool("umoci", "unpack", "--image", f"{layout}:v2", str(tmp_path / "ub"))
    assert_same(root, tmp_path / "ub/rootfs", ("edited", "umoci"))


def test_umoci_known_differences(tmp_path: Path) -> None:
    """Prove the two differences this module ignores come from umoci, not lamina."""
    need_tool("umoci")
    layout = tmp_path / "layout"
    make_image(layout)
    # 1. root mtime 0 for an image that lamina never touched (test-kit layers only)
    tool("umoci", "unpack", "--image", f"{layout}:base", str(tmp_path / "ub"))
    assert os.stat(tmp_path / "ub/rootfs").st_mtime_ns == 0
    # 2. umoci repack rounds a sub-second mtime to the nearest second
    root = tmp_path / "ub/rootfs"
    os.utime(root / "data/b", ns=(1_700_000_000_987_654_321,) * 2)
    os.utime(root / "data/a", ns=(1_700_000_000_123_456_789,) * 2)
    tool("umoci", "repack", "--image", f"{layout}:u", str(tmp_path / "ub"))
    _, man = tag_manifest(layout, "u")
    blob = (layout / "blobs/sha256" / man["layers"][-1]["digest"][7:]).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tf:
        b, a = tf.getmember("data/b"), tf.getmember("data/a")
    assert (b.mtime, a.mtime) == (1_700_000_001, 1_700_000_000)
    assert "mtime" not in b.pax_headers and "mtime" not in a.pax_headers


def test_skopeo_inspect_and_copy(repacked: tuple[Path, Path], tmp_path: Path) -> None:
    need_tool("skopeo")
    layout, _ = repacked
    desc, man = tag_manifest(layout, "edited")
    assert len(man["layers"]) == 3
    info = json.loads(tool("skopeo", "inspect", f"oci:{layout}:edited").stdout)
    assert info["Digest"] == desc["digest"]
    assert info["Layers"] == [d["digest"] for d in man["layers"]]
    cfg = json.loads(tool("skopeo", "inspect", "--config", f"oci:{layout}:edited").stdout)
    ours = json.loads((layout / "blobs/sha256" / man["config"]["digest"][7:]).read_bytes())
    assert cfg["rootfs"]["diff_ids"] == ours["rootfs"]["diff_ids"]
    assert len(cfg["rootfs"]["diff_ids"]) == 3
    # copy to a dir: every blob arrives intact, under its digest
    out = tmp_path / "dir"
    tool("skopeo", "copy", f"oci:{layout}:edited", f"dir:{out}")
    copied = json.loads((out / "manifest.json").read_bytes())
    assert [d["digest"] for d in copied["layers"]] == [d["digest"] for d in man["layers"]]
    for d in [*man["layers"], man["config"]]:
        data = (out / d["digest"][7:]).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == d["digest"]
        assert len(data) == d["size"]
    # the top layer's diff_id is the sha256 of its uncompressed content
    top = (out / man["layers"][-1]["digest"][7:]).read_bytes()
    assert "sha256:" + hashlib.sha256(gzip.decompress(top)).hexdigest() == \
        ours["rootfs"]["diff_ids"][-1]


def test_skopeo_copy_to_another_layout_and_back_to_lamina(repacked: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    need_tool("skopeo")
    layout, bundle = repacked
    desc, _ = tag_manifest(layout, "edited")
    tool("skopeo", "copy", f"oci:{layout}:edited", f"oci:{tmp_path / 'copy'}:c")
    cdesc, _ = tag_manifest(tmp_path / "copy", "c")
    assert cdesc["digest"] == desc["digest"]      # byte-identical manifest
    lamina_ok("unpack", "--image", f"{tmp_path / 'copy'}:c", str(tmp_path / "b2"))
    assert_same(bundle / "rootfs", tmp_path / "b2/rootfs", ("edited", "via-skopeo"))


@pytest.mark.parametrize("compress", ["zstd", "none"])
def test_skopeo_reads_other_compressions(tmp_path: Path, compress: str) -> None:
    need_tool("skopeo")
    layout, bundle = tmp_path / "layout", tmp_path / "lb"
    make_image(layout)
    lamina_ok("unpack", "--image", f"{layout}:base", str(bundle))
    edit(bundle / "rootfs")
    lamina_ok("repack", "--compress", compress, "--image", f"{layout}:z", str(bundle))
    _, man = tag_manifest(layout, "z")
    want = {"zstd": mt.LAYER_ZSTD, "none": mt.LAYER_TAR}[compress]
    assert man["layers"][-1]["mediaType"] == want
    info = json.loads(tool("skopeo", "inspect", f"oci:{layout}:z").stdout)
    assert info["Layers"] == [d["digest"] for d in man["layers"]]
    # skopeo re-compresses our layer to gzip (decompressing it on the way: a broken
    # stream fails the copy); lamina reads the result back to the same tree
    tool("skopeo", "copy", "--dest-compress-format", "gzip", "--dest-compress",
         f"oci:{layout}:z", f"oci:{tmp_path / 'gz'}:g")
    _, gman = tag_manifest(tmp_path / "gz", "g")
    assert all(d["mediaType"] == mt.LAYER_GZIP for d in gman["layers"])
    lamina_ok("unpack", "--image", f"{tmp_path / 'gz'}:g", str(tmp_path / "b2"))
    assert_same(bundle / "rootfs", tmp_path / "b2/rootfs", ("edited", "skopeo-gzip"))


def test_lamina_reads_umoci_repack(tmp_path: Path) -> None:
    """Cross direction: umoci unpack -> edit -> umoci repack -> lamina unpack."""
    need_tool("umoci")
    layout = tmp_path / "layout"
    make_image(layout)
    ub = tmp_path / "ub"
    tool("umoci", "unpack", "--image", f"{layout}:base", str(ub))
    edit(ub / "rootfs")
    # plus the two edits lamina's own repack loses today: umoci keeps them
    os.setxattr(ub / "rootfs/data/b", "user.only", b"x")
    os.link(ub / "rootfs/etc/hostname", ub / "rootfs/etc/hostname-link")
    tool("umoci", "repack", "--image", f"{layout}:u", str(ub))
    lamina_ok("unpack", "--image", f"{layout}:u", str(tmp_path / "lb"))
    assert_same(ub / "rootfs", tmp_path / "lb/rootfs", ("umoci-edited", "lamina"),
                seconds=True)
    # both readers agree on umoci's image, to the nanosecond
    tool("umoci", "unpack", "--image", f"{layout}:u", str(tmp_path / "ub2"))
    assert_same(tmp_path / "ub2/rootfs", tmp_path / "lb/rootfs", ("umoci", "lamina"))


def test_lamina_repacks_on_top_of_umoci_repack(tmp_path: Path) -> None:
    """umoci repack -> lamina unpack + edit + repack -> umoci unpack: the same tree."""
    need_tool("umoci")
    layout = tmp_path / "layout"
    make_image(layout)
    ub = tmp_path / "ub"
    tool("umoci", "unpack", "--image", f"{layout}:base", str(ub))
    edit(ub / "rootfs")
    tool("umoci", "repack", "--image", f"{layout}:u", str(ub))
    lb = tmp_path / "lb"
    lamina_ok("unpack", "--image", f"{layout}:u", str(lb))
    root = lb / "rootfs"
    (root / "new/sub/file").write_bytes(b"lamina was here\n")
    shutil.rmtree(root / "was-file")
    (root / "data/d").write_bytes(b"d\n")
    lamina_ok("repack", "--image", f"{layout}:ul", str(lb))
    tool("umoci", "unpack", "--image", f"{layout}:ul", str(tmp_path / "ub2"))
    assert_same(root, tmp_path / "ub2/rootfs", ("lamina-edited", "umoci"))


@pytest.mark.skipif(not os.path.isdir("/var/tmp/lamina-corpus/oci"),
                    reason="corpus not built (/work/shared/corpus/build-corpus.sh)")
def test_corpus_repack_unpacked_by_umoci(tmp_path: Path) -> None:
    """A real Debian image: lamina repack of a few edits, then umoci unpack."""
    need_tool("umoci")
    src = "/var/tmp/lamina-corpus/oci"
    layout = tmp_path / "layout"
    # a private layout (hard-linked blobs): repack must not write into the shared corpus
    os.makedirs(layout / "blobs/sha256")
    man_digest = None
    for d in json.loads(Path(src, "index.json").read_text())["manifests"]:
        if d.get("annotations", {}).get(mt.REF_NAME) == "base":
            man_digest = d["digest"]
    assert man_digest is not None
    man = json.loads(Path(src, "blobs/sha256", man_digest[7:]).read_bytes())
    for digest in [man_digest, man["config"]["digest"], *(x["digest"] for x in man["layers"])]:
        s, t = Path(src, "blobs/sha256", digest[7:]), layout / "blobs/sha256" / digest[7:]
        try:
            os.link(s, t)
        except OSError:
            shutil.copyfile(s, t)
    shutil.copyfile(Path(src, "oci-layout"), layout / "oci-layout")
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": mt.MANIFEST, "digest": man_digest,
         "size": os.path.getsize(Path(src, "blobs/sha256", man_digest[7:])),
         "annotations": {mt.REF_NAME: "base"}}]}
    (layout / "index.json").write_text(json.dumps(index))
    lb = tmp_path / "lb"
    lamina_ok("unpack", "--image", f"{layout}:base", str(lb))
    root = lb / "rootfs"
    shutil.rmtree(root / "usr/share/doc")
    (root / "etc/motd").write_bytes(b"repacked\n")
    os.chmod(root / "etc/hostname" if (root / "etc/hostname").exists() else root / "etc/passwd",
             0o600)
    lamina_ok("repack", "--image", f"{layout}:edited", str(lb))
    tool("umoci", "unpack", "--image", f"{layout}:edited", str(tmp_path / "ub"))
    assert_same(root, tmp_path / "ub/rootfs", ("lamina-edited", "umoci"))
