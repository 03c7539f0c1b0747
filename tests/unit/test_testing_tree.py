"""lamina.testing: the tree manifest used by the parity tests, and the layer builder.

No root needed: everything is created as the current user under tmp_path.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import socket
import tarfile
from pathlib import Path

import pytest

from lamina.testing.images import build_image, build_index_image, diff_id
from lamina.testing.layers import TarBuilder, pax_record
from lamina.testing.tree import diff_manifests, tree_manifest


def _xattrs_supported(p: Path) -> bool:
    try:
        os.setxattr(p, "user.lamina-probe", b"1")
        os.removexattr(p, "user.lamina-probe")
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            return False
        raise
    return True


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    (root / "dir").mkdir(mode=0o755)
    (root / "dir" / "file").write_bytes(b"hello")
    (root / "empty").write_bytes(b"")
    os.chmod(root / "empty", 0o644)
    (root / "suid").write_bytes(b"x")
    os.chmod(root / "suid", 0o4755)
    (root / "sticky").mkdir()
    os.chmod(root / "sticky", 0o1777)
    os.symlink("dir/file", root / "rel")
    os.symlink("/nonexistent/target", root / "dangling")
    os.symlink("dir", root / "dirlink")
    os.mkfifo(root / "fifo", 0o640)
    (root / "z").write_bytes(b"linked")
    os.link(root / "z", root / "dir" / "a_link")
    os.link(root / "z", root / "b_link")
    return root


def test_manifest_describes_every_type(sample: Path) -> None:
    m = tree_manifest(str(sample))
    uid, gid = os.getuid(), os.getgid()
    assert m["."]["type"] == "dir"
    assert m["dir/file"] == {"type": "file", "mode": 0o644 & ~_umask(), "uid": uid, "gid": gid,
                             "size": 5, "sha256": hashlib.sha256(b"hello").hexdigest(),
                             "xattrs": {}}
    assert m["empty"]["size"] == 0
    assert m["empty"]["sha256"] == hashlib.sha256(b"").hexdigest()
    assert m["suid"]["mode"] == 0o4755
    assert m["sticky"] == {"type": "dir", "mode": 0o1777, "uid": uid, "gid": gid, "xattrs": {}}
    assert m["rel"]["type"] == "symlink" and m["rel"]["target"] == "dir/file"
    assert m["dangling"]["target"] == "/nonexistent/target"
    assert m["fifo"]["type"] == "fifo" and m["fifo"]["mode"] == 0o640 & ~_umask()
    assert "size" not in m["rel"] and "sha256" not in m["fifo"]


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_symlinks_are_not_followed(sample: Path) -> None:
    m = tree_manifest(str(sample))
    # dirlink points at dir: nothing below it may be listed
    assert m["dirlink"]["type"] == "symlink"
    assert not [k for k in m if k.startswith("dirlink/")]
    assert "dir/file" in m


def test_hardlink_groups_use_smallest_path(sample: Path) -> None:
    m = tree_manifest(str(sample))
    group = {p for p, e in m.items() if "link_group" in e}
    assert group == {"z", "dir/a_link", "b_link"}
    assert {m[p]["link_group"] for p in group} == {"b_link"}
    assert "link_group" not in m["dir/file"]


def test_hardlink_groups_are_independent_of_inode_numbers(tmp_path: Path) -> None:
    trees = []
    for n, order in enumerate((["a", "b"], ["b", "a"])):
        root = tmp_path / f"t{n}"
        root.mkdir()
        (root / order[0]).write_bytes(b"same")
        os.link(root / order[0], root / order[1])
        trees.append(tree_manifest(str(root)))
    assert trees[0]["a"]["link_group"] == trees[0]["b"]["link_group"] == "a"
    assert diff_manifests(*trees) == []


def test_copy_differs_from_hardlink(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for r in (a, b):
        r.mkdir()
        (r / "x").write_bytes(b"data")
    os.link(a / "x", a / "y")
    (b / "y").write_bytes(b"data")
    d = diff_manifests(tree_manifest(str(a)), tree_manifest(str(b)))
    assert "x: link_group a='x' b=None" in d
    assert "y: link_group a='x' b=None" in d


def test_root_entry_and_ignore_root(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(mode=0o700)
    b.mkdir(mode=0o755)
    os.chmod(a, 0o700)
    os.chmod(b, 0o755)
    ma, mb = tree_manifest(str(a)), tree_manifest(str(b))
    assert diff_manifests(ma, mb) == [".: mode a=0o0700 b=0o0755"]
    assert diff_manifests(ma, mb, ignore_root=True) == []
    assert "." not in tree_manifest(str(a), include_root=False)


def test_diff_reports_each_kind_of_difference(sample: Path, tmp_path: Path) -> None:
    before = tree_manifest(str(sample))
    (sample / "dir" / "file").write_bytes(b"HELLO!")
    os.chmod(sample / "empty", 0o600)
    os.unlink(sample / "rel")
    os.symlink("elsewhere", sample / "rel")
    os.unlink(sample / "fifo")
    (sample / "new").mkdir()
    after = tree_manifest(str(sample))
    d = diff_manifests(before, after, names=("old", "new"))
    assert any(line.startswith("dir/file: sha256 old=") for line in d)
    assert "dir/file: size old=5 new=6" in d
    assert "empty: mode old=0o0644 new=0o0600" in d
    assert "rel: target old='dir/file' new='elsewhere'" in d
    assert "fifo: only in old (fifo)" in d
    assert "new: only in new (dir)" in d
    # the root's mtime is not compared by default, so adding/removing entries is all
    assert len(d) == 6, d
    assert diff_manifests(after, after) == []


def test_type_change_is_reported(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").mkdir()
    (b / "x").write_bytes(b"")
    d = diff_manifests(tree_manifest(str(a)), tree_manifest(str(b)))
    assert "x: type a='dir' b='file'" in d


def test_ignore_fields_and_mtime(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for r, t in ((a, 1_000_000_000), (b, 1_500_000_000)):
        r.mkdir()
        (r / "f").write_bytes(b"")
        os.utime(r / "f", (t, t))
    ma, mb = tree_manifest(str(a), mtime=True), tree_manifest(str(b), mtime=True)
    assert ma["f"]["mtime_ns"] == 1_000_000_000 * 10**9
    assert any(line.startswith("f: mtime_ns") for line in diff_manifests(ma, mb))
    assert diff_manifests(ma, mb, ignore_fields={"mtime_ns"}, ignore_root=True) == []
    assert "mtime_ns" not in tree_manifest(str(a))["f"]


def test_xattrs_hex_and_diff(tmp_path: Path) -> None:
    root = tmp_path / "x"
    root.mkdir()
    f = root / "f"
    f.write_bytes(b"")
    if not _xattrs_supported(f):
        pytest.skip("filesystem without user xattrs")
    before = tree_manifest(str(root))
    os.setxattr(f, "user.bin", b"\xff\x00\x01")
    os.setxattr(root, "user.d", b"v")
    after = tree_manifest(str(root))
    assert after["f"]["xattrs"] == {"user.bin": "ff0001"}
    assert after["."]["xattrs"] == {"user.d": "76"}
    d = diff_manifests(before, after)
    assert "f: xattr user.bin a=None b='ff0001'" in d
    assert ".: xattr user.d a=None b='76'" in d


def test_socket_and_non_utf8_names(tmp_path: Path) -> None:
    root = tmp_path / "s"
    root.mkdir()
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(root / "sock"))
    except OSError as e:  # e.g. path too long for sun_path
        pytest.skip(f"cannot bind a unix socket here: {e}")
    finally:
        s.close()
    odd = os.path.join(os.fsencode(root), b"caf\xe9")
    with open(odd, "wb") as fh:
        fh.write(b"1")
    m = tree_manifest(str(root))
    assert m["sock"]["type"] == "socket"
    assert os.fsdecode(b"caf\xe9") in m


def test_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        tree_manifest(str(tmp_path / "f"))


# -- TarBuilder / build_image sanity (cheap; the parity tests rely on them) ------------

def test_pax_record_length_is_self_consistent() -> None:
    for n in (0, 1, 85, 86, 87, 88, 989, 990, 995, 996, 9990):
        rec = pax_record("k", b"v" * n)
        length, _, rest = rec.partition(b" ")
        assert int(length) == len(rec)
        assert rest == b"k=" + b"v" * n + b"\n"


def test_builder_round_trips_through_tarfile() -> None:
    t = TarBuilder()
    long = "d/" + "x" * 120 + "/" + "y" * 90
    t.add_dir("d", mode=0o2775, uid=1000, gid=1001)
    t.add_file(long, b"content", mode=0o4755, uid=3_000_000, gid=7,
               xattrs={"user.bin": b"\xff\x00", "security.capability": b"\x01\x02"})
    t.add_symlink("s", "/" + "t" * 150)
    t.add_hardlink("h", long)
    t.add_char("c", 1, 3)
    t.add_block("b", 8, 1)
    t.add_fifo("p")
    t.add_whiteout("d/gone")
    t.add_opaque("d")
    t.add_pax_global({"comment": "ignored"})
    t.add_file("uni/日本語", b"")
    data = t.build()
    assert len(data) % 512 == 0 and data == t.build()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        ms = {m.name: m for m in tf.getmembers()}
    assert ms["d"].isdir() and ms["d"].mode == 0o2775 and (ms["d"].uid, ms["d"].gid) == (
        1000, 1001)
    f = ms[long]
    assert f.mode == 0o4755 and f.uid == 3_000_000 and f.size == 7
    # tarfile decodes non-UTF-8 pax values with surrogateescape
    assert f.pax_headers["SCHILY.xattr.user.bin"].encode("utf-8", "surrogateescape") == \
        b"\xff\x00"
    assert f.pax_headers["SCHILY.xattr.security.capability"] == "\x01\x02"
    assert ms["s"].linkname == "/" + "t" * 150
    assert ms["h"].islnk() and ms["h"].linkname == long
    assert (ms["c"].devmajor, ms["c"].devminor) == (1, 3) and ms["c"].ischr()
    assert ms["b"].isblk() and ms["p"].isfifo()
    assert "d/.wh.gone" in ms and "d/.wh..wh..opq" in ms and "uni/日本語" in ms


@pytest.mark.parametrize("fmt", ["gnu", "ustar"])
def test_builder_long_names_other_formats(fmt: str) -> None:
    t = TarBuilder(fmt)
    name = "a" * 60 + "/" + "b" * 60 + "/" + "c" * 90
    t.add_file(name, b"z")
    data = t.build()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        (m,) = tf.getmembers()
    assert m.name == name
    if fmt == "gnu":
        assert b"././@LongLink" in data
    else:
        assert b"././@LongLink" not in data and b"././@PaxHeader" not in data


def test_ustar_rejects_unrepresentable_names() -> None:
    with pytest.raises(ValueError):
        TarBuilder("ustar").add_file("x" * 200, b"")


def test_build_image_writes_config_and_diff_ids(tmp_path: Path) -> None:
    import json

    t1 = TarBuilder().add_file("a", b"1").build()
    t2 = TarBuilder().add_file("b", b"2").build()
    desc = build_image(str(tmp_path / "lay"), "v1", [t1, t2], compression=["gzip", "zstd"],
                       config={"Cmd": ["sh"], "User": "1000:1000"})
    blobs = tmp_path / "lay" / "blobs" / "sha256"
    manifest = json.loads((blobs / desc.hex).read_bytes())
    assert [lay["mediaType"] for lay in manifest["layers"]] == [
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd"]
    cfg = json.loads((blobs / manifest["config"]["digest"][7:]).read_bytes())
    assert cfg["rootfs"]["diff_ids"] == [diff_id(t1), diff_id(t2)]
    assert cfg["config"] == {"Cmd": ["sh"], "User": "1000:1000"}
    for lay in manifest["layers"]:
        blob = (blobs / lay["digest"][7:]).read_bytes()
        assert len(blob) == lay["size"]
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == lay["digest"]
    index = json.loads((tmp_path / "lay" / "index.json").read_bytes())
    assert index["manifests"][0]["annotations"] == {"org.opencontainers.image.ref.name": "v1"}


def test_build_index_image_platforms(tmp_path: Path) -> None:
    import json

    t = TarBuilder().add_file("a", b"1").build()
    desc = build_index_image(str(tmp_path / "lay"), "multi",
                             [("linux/amd64", [t]), ("linux/arm/v7", [t]), (None, [t])])
    idx = json.loads((tmp_path / "lay" / "blobs" / "sha256" / desc.hex).read_bytes())
    plats = [m.get("platform") for m in idx["manifests"]]
    assert plats == [{"architecture": "amd64", "os": "linux"},
                     {"architecture": "arm", "os": "linux", "variant": "v7"}, None]
