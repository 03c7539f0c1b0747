"""lamina.oci.edit (new/config/insert/tag/ls/stat), lamina.oci.gc and lamina.oci.schema."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from lamina.errors import ImageFormatError, NotFoundError, UsageError
from lamina.layer.idmap import ROOTLESS_XATTR, IdMapping, encode_rootless
from lamina.oci import gc as gcmod
from lamina.oci import mediatypes as mt
from lamina.oci import schema
from lamina.oci.edit import (
    ConfigOptions,
    InsertOptions,
    NewOptions,
    edit_config,
    insert,
    list_tags,
    new_image,
    normalize_target,
    remove_tag,
    stat_image,
    tag_image,
)
from lamina.oci.layout import ImageRef, OCILayout
from lamina.oci.model import Descriptor, Platform
from lamina.testing.images import build_image, build_index_image
from lamina.testing.layers import TarBuilder

D = "sha256:" + "ab" * 32


def _manifest(layers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": mt.MANIFEST,
            "config": {"mediaType": mt.CONFIG, "digest": D, "size": 2},
            "layers": layers if layers is not None else []}


def _config(**kw: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}
    c.update(kw)
    return c


def _image(lay: str, tag: str = "latest") -> tuple[OCILayout, dict[str, Any], dict[str, Any]]:
    layout = OCILayout.open(lay)
    m = layout.resolve(tag)
    return layout, m.raw, layout.read_json(m.config)


def _layer_members(layout: OCILayout, desc: dict[str, Any]) -> list[tarfile.TarInfo]:
    d = Descriptor.from_json(desc)
    data = layout.read_blob(d, limit=1 << 30)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:  # transparent gzip; zstd not used
        return tf.getmembers()


# -- schema ----------------------------------------------------------------------------
def test_schema_accepts_valid_documents() -> None:
    layer = {"mediaType": mt.LAYER_GZIP, "digest": D, "size": 10}
    assert schema.validate(_manifest([layer]), mt.MANIFEST)
    assert schema.validate(_manifest(), mt.MANIFEST)  # empty images are allowed (see README)
    assert schema.validate(_config(created="2020-01-01T00:00:00.123456789Z",
                                   history=[{"created": "2020-01-01T00:00:00+02:00",
                                             "empty_layer": True}]), mt.CONFIG)
    idx = {"schemaVersion": 2, "mediaType": mt.INDEX, "manifests": [
        {"mediaType": mt.MANIFEST, "digest": D, "size": 1,
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
         "annotations": {mt.REF_NAME: "x"}}]}
    assert schema.validate(idx, mt.INDEX)
    assert schema.validate({"imageLayoutVersion": "1.0.0"}, schema.LAYOUT_FILE)
    assert schema.validate(b"whatever", mt.LAYER_GZIP) is False  # no schema: not checked


@pytest.mark.parametrize(("doc", "media_type", "where"), [
    ({**_manifest(), "schemaVersion": 1}, mt.MANIFEST, "schemaVersion"),
    ({**_manifest(), "config": {"mediaType": "nope", "digest": D, "size": 1}}, mt.MANIFEST,
     "config.mediaType"),
    (_manifest([{"mediaType": mt.LAYER_TAR, "digest": "sha256", "size": 1}]), mt.MANIFEST,
     "layers[0].digest"),
    ({**_manifest(), "annotations": {"a": 1}}, mt.MANIFEST, "annotations.a"),
    (_config(rootfs={"type": "overlay", "diff_ids": []}), mt.CONFIG, "rootfs.type"),
    (_config(created="2020-01-01 00:00:00"), mt.CONFIG, "created"),
    (_config(config={"Env": "A=1"}), mt.CONFIG, "config.Env"),
    (_config(history=[{"empty_layer": "yes"}]), mt.CONFIG, "history[0].empty_layer"),
    ({"schemaVersion": 2, "manifests": [{"mediaType": mt.MANIFEST, "digest": D, "size": 1,
                                         "platform": {"os": "linux"}}]}, mt.INDEX,
     "manifests[0].platform"),
    ({"imageLayoutVersion": "2.0.0"}, schema.LAYOUT_FILE, "imageLayoutVersion"),
])
def test_schema_rejects(doc: dict[str, Any], media_type: str, where: str) -> None:
    with pytest.raises(ImageFormatError) as e:
        schema.validate(doc, media_type)
    assert where in e.value.message
    assert e.value.hint and "bug" in e.value.hint


def test_schema_files_are_the_shipped_image_spec_ones() -> None:
    m = schema.load_schema("image-manifest-schema.json")
    assert m["properties"]["layers"]["minItems"] == 1  # unmodified on disk
    assert m["id"] == "https://opencontainers.org/schema/image/manifest"
    # every $ref resolves to a shipped file whatever the base URI (offline registry)
    assert schema._retrieve("https://example.invalid/a/b/defs.json").contents == \
        schema.load_schema("defs.json")
    with pytest.raises(KeyError):
        schema._retrieve("https://opencontainers.org/schema/other.json")


@pytest.mark.parametrize(("text", "ok"), [
    ("2024-05-01T12:00:00Z", True), ("2024-05-01t12:00:00.5z", True),
    ("2024-05-01T12:00:00-07:30", True), ("2024-05-01T12:00:00", False),
    ("2024-13-01T12:00:00Z", False), ("2024-05-01", False), ("yesterday", False),
])
def test_is_date_time(text: str, ok: bool) -> None:
    assert schema.is_date_time(text) is ok


def test_put_json_validates_before_writing(tmp_path: Path) -> None:
    lay = OCILayout.init(str(tmp_path / "lay"))
    before = set(os.listdir(lay.blob_dir))
    with pytest.raises(ImageFormatError):
        lay.put_json(_config(rootfs={"type": "layers"}), mt.CONFIG)
    assert set(os.listdir(lay.blob_dir)) == before
    # hostile test fixtures can opt out
    lay.put_json(_config(rootfs={"type": "layers"}), mt.CONFIG, validate=False)
    with pytest.raises(ImageFormatError):
        lay.set_ref("x", Descriptor("not a media type", D, 1))


# -- new -------------------------------------------------------------------------------
def test_new_creates_layout_and_empty_image(tmp_path: Path) -> None:
    lay = str(tmp_path / "a" / "lay")
    res = new_image(NewOptions(ImageRef(lay, "v1"), source_date_epoch=1700000000))
    layout, m, c = _image(lay, "v1")
    assert m["layers"] == [] and m["mediaType"] == mt.MANIFEST
    assert res.manifest.digest == layout.refs()["v1"].digest
    host = Platform.host()
    assert (c["os"], c["architecture"]) == (host.os, host.architecture)
    assert c["rootfs"] == {"type": "layers", "diff_ids": []}
    assert c["created"] == "2023-11-14T22:13:20Z"
    # deterministic with SOURCE_DATE_EPOCH
    new_image(NewOptions(ImageRef(lay, "v2"), source_date_epoch=1700000000))
    assert layout.refs()["v2"].digest == res.manifest.digest


def test_new_platform_and_errors(tmp_path: Path) -> None:
    lay = str(tmp_path / "lay")
    new_image(NewOptions(ImageRef(lay, "arm"), platform=Platform("linux", "arm", "v7")))
    _, _, c = _image(lay, "arm")
    assert (c["architecture"], c["variant"]) == ("arm", "v7")
    with pytest.raises(UsageError, match="already exists"):
        new_image(NewOptions(ImageRef(lay, "arm")))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(UsageError, match="not an OCI image layout"):
        new_image(NewOptions(ImageRef(str(tmp_path / "junk"), "x")))
    with pytest.raises(UsageError, match="invalid tag"):
        new_image(NewOptions(ImageRef(lay, "-bad")))


# -- config ----------------------------------------------------------------------------
@pytest.fixture
def base(tmp_path: Path) -> str:
    lay = str(tmp_path / "lay")
    t = TarBuilder().add_dir("etc").add_file("etc/hostname", b"box\n").build()
    build_image(lay, "base", [t], config={"Env": ["PATH=/bin", "A=old"], "Cmd": ["sh"],
                                          "Labels": {"keep": "1"}},
                annotations={"org.example": "m"})
    return lay


def test_config_edits(base: str) -> None:
    res = edit_config(ConfigOptions(
        ImageRef(base, "base"), new_tag="new", user="1000:1000",
        env=(("A", "new"), ("B", "2")), entrypoint=("/bin/app", "-v"), cmd=(),
        working_dir="/srv", labels=(("l", "v"),), annotations=(("a", "b"),),
        exposed_ports=("80/tcp",), volumes=("/data",), stop_signal="SIGINT",
        author="me", created="2024-01-02T03:04:05Z", architecture="arm64", os="linux",
        variant="v8", created_by="by", history_comment="why",
        history_created="2024-01-02T03:04:06Z"))
    layout, m, c = _image(base, "new")
    cfg = c["config"]
    assert cfg["Env"] == ["PATH=/bin", "A=new", "B=2"]
    assert cfg["Entrypoint"] == ["/bin/app", "-v"] and cfg["Cmd"] == []
    assert cfg["User"] == "1000:1000" and cfg["WorkingDir"] == "/srv"
    assert cfg["Labels"] == {"keep": "1", "l": "v"}
    assert cfg["ExposedPorts"] == {"80/tcp": {}} and cfg["Volumes"] == {"/data": {}}
    assert cfg["StopSignal"] == "SIGINT"
    assert (c["author"], c["created"], c["architecture"], c["variant"]) == (
        "me", "2024-01-02T03:04:05Z", "arm64", "v8")
    assert m["annotations"] == {"org.example": "m", "a": "b"}
    assert c["history"][-1] == {"created": "2024-01-02T03:04:06Z", "created_by": "by",
                                "author": "me",  # the image's author, as umoci does
                                "comment": "why", "empty_layer": True}
    assert len(c["history"]) == 2
    # layers untouched, old tag untouched
    _, m0, c0 = _image(base, "base")
    assert m["layers"] == m0["layers"] and c["rootfs"] == c0["rootfs"]
    assert layout.refs()["new"].digest == res.manifest.digest != layout.refs()["base"].digest


def test_config_clear_and_overwrite_tag(base: str) -> None:
    edit_config(ConfigOptions(ImageRef(base, "base"),
                              clear=("config.env", "config.labels", "manifest.annotations",
                                     "config.cmd"),
                              env=(("ONLY", "1"),), history=False))
    _, m, c = _image(base, "base")
    assert c["config"] == {"Env": ["ONLY=1"]}
    assert "annotations" not in m
    assert len(c["history"]) == 1  # --no-history


def test_config_default_created_by_describes_the_change(base: str) -> None:
    edit_config(ConfigOptions(ImageRef(base, "base"), cmd=("echo", "a b")))
    _, _, c = _image(base, "base")
    assert c["history"][-1]["created_by"] == "lamina config --config.cmd=echo " \
                                             "--config.cmd='a b'"


@pytest.mark.parametrize(("kw", "exc", "text"), [
    ({"clear": ("config.nope",)}, UsageError, "can be cleared"),
    ({"created": "now"}, UsageError, "RFC 3339"),
    ({"new_tag": "a/b"}, UsageError, "invalid tag"),
])
def test_config_usage_errors(base: str, kw: dict[str, Any], exc: type[Exception],
                             text: str) -> None:
    with pytest.raises(exc, match=text):
        edit_config(ConfigOptions(ImageRef(base, "base"), **kw))


def test_config_missing_tag(base: str) -> None:
    with pytest.raises(NotFoundError) as e:
        edit_config(ConfigOptions(ImageRef(base, "nope"), user="x"))
    assert e.value.hint and "base" in e.value.hint


def test_config_through_an_index_warns(tmp_path: Path) -> None:
    lay = str(tmp_path / "lay")
    host = Platform.host()
    build_index_image(lay, "multi", [(host, [TarBuilder().add_file("a", b"a").build()]),
                                     (Platform("linux", "s390x"), [TarBuilder().build()])])
    res = edit_config(ConfigOptions(ImageRef(lay, "multi"), user="u"))
    assert res.warnings and "index" in res.warnings[0]
    layout = OCILayout.open(lay)
    assert layout.refs()["multi"].media_type == mt.MANIFEST
    res2 = edit_config(ConfigOptions(ImageRef(lay, "multi"), user="v", new_tag="other"))
    assert res2.warnings == []


# -- insert ----------------------------------------------------------------------------
@pytest.fixture
def src(tmp_path: Path) -> Path:
    s = tmp_path / "src"
    (s / "sub" / "deep").mkdir(parents=True)
    (s / "a.txt").write_bytes(b"hello")
    (s / "sub" / "b.bin").write_bytes(os.urandom(3000))
    os.link(s / "a.txt", s / "sub" / "hl")
    os.symlink("../a.txt", s / "sub" / "link")
    os.chmod(s / "a.txt", 0o640)
    return s


def test_insert_directory(base: str, src: Path) -> None:
    res = insert(InsertOptions(ImageRef(base, "base"), "/opt//app/", str(src), new_tag="ins",
                               compression="none", created_by="add app"))
    layout, m, c = _image(base, "ins")
    assert res.layer is not None and m["layers"][-1]["digest"] == res.layer.digest
    assert m["layers"][-1]["mediaType"] == mt.LAYER_TAR
    assert c["rootfs"]["diff_ids"][-1] == res.diff_id
    data = layout.read_blob(res.layer, limit=1 << 30)
    assert "sha256:" + hashlib.sha256(data).hexdigest() == res.diff_id  # uncompressed
    assert c["history"][-1]["created_by"] == "add app"
    assert "empty_layer" not in c["history"][-1]
    got = {t.name: t for t in _layer_members(layout, m["layers"][-1])}
    assert list(got) == ["opt/app", "opt/app/a.txt", "opt/app/sub", "opt/app/sub/b.bin",
                         "opt/app/sub/deep", "opt/app/sub/hl", "opt/app/sub/link"]
    assert got["opt/app/a.txt"].mode == 0o640 and got["opt/app/a.txt"].size == 5
    assert got["opt/app/sub/hl"].islnk() and got["opt/app/sub/hl"].linkname == "opt/app/a.txt"
    assert got["opt/app/sub/link"].issym() and got["opt/app/sub/link"].linkname == "../a.txt"
    assert got["opt/app"].uid == os.getuid()
    # stat lines the new layer up with its history entry
    st = stat_image(ImageRef(base, "ins"))
    assert [r.layer.digest if r.layer else None for r in st.rows] == \
        [d["digest"] for d in m["layers"]]
    assert st.rows[-1].history["created_by"] == "add app"


def test_insert_single_file_renamed_and_root(base: str, src: Path, tmp_path: Path) -> None:
    insert(InsertOptions(ImageRef(base, "base"), "etc/motd", str(src / "sub" / "b.bin"),
                         compression="gzip", source_date_epoch=1000))
    layout, m, _ = _image(base, "base")
    members = _layer_members(layout, m["layers"][-1])
    assert [(t.name, t.size, t.mtime) for t in members] == [("etc/motd", 3000, 1000)]
    # SOURCE at the root: its children, not the root directory itself
    insert(InsertOptions(ImageRef(base, "base"), "/", str(src / "sub"), compression="gzip"))
    _, m, _ = _image(base, "base")
    names = [t.name for t in _layer_members(layout, m["layers"][-1])]
    assert names == ["b.bin", "deep", "hl", "link"]
    assert len(m["layers"]) == 3 and m["layers"][-1]["mediaType"] == mt.LAYER_GZIP


@pytest.mark.parametrize("target", ["/usr/bin/b.bin", "/b.bin", "/usr/bin/other"])
@pytest.mark.parametrize("can_link", [True, False])
def test_insert_single_file_staging(base: str, src: Path, target: str, can_link: bool,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    if not can_link:  # e.g. SOURCE on another filesystem than the temporary directory
        def no_link(*a: object, **k: object) -> None:
            raise OSError(18, "Invalid cross-device link")
        monkeypatch.setattr(os, "link", no_link)
    before = sorted(os.listdir(src / "sub"))
    insert(InsertOptions(ImageRef(base, "base"), target, str(src / "sub" / "b.bin"),
                         compression="none"))
    layout, m, _ = _image(base, "base")
    (t,) = _layer_members(layout, m["layers"][-1])
    assert t.name == target.lstrip("/") and t.size == 3000
    data = layout.read_blob(Descriptor.from_json(m["layers"][-1]), limit=1 << 30)
    assert (src / "sub" / "b.bin").read_bytes() in data
    assert sorted(os.listdir(src / "sub")) == before  # SOURCE untouched
    assert os.stat(src / "sub" / "b.bin").st_nlink == 1


def test_insert_opaque_and_whiteout(base: str, src: Path) -> None:
    insert(InsertOptions(ImageRef(base, "base"), "/etc", str(src / "sub"), opaque=True,
                         compression="none"))
    layout, m, _ = _image(base, "base")
    names = [t.name for t in _layer_members(layout, m["layers"][-1])]
    # the marker comes right after its directory, before the directory's new content
    assert names[:2] == ["etc", "etc/.wh..wh..opq"] and "etc/b.bin" in names
    insert(InsertOptions(ImageRef(base, "base"), "/etc/hostname", whiteout=True,
                         compression="none", history=False))
    _, m2, c2 = _image(base, "base")
    assert [t.name for t in _layer_members(layout, m2["layers"][-1])] == ["etc/.wh.hostname"]
    assert len(c2["history"]) == len(c2["rootfs"]["diff_ids"]) - 1  # --no-history


def test_insert_ownership(base: str, src: Path) -> None:
    os.setxattr(src / "a.txt", ROOTLESS_XATTR, encode_rootless(7, 8))
    insert(InsertOptions(ImageRef(base, "base"), "/r", str(src), rootless=True,
                         compression="none"))
    layout, m, _ = _image(base, "base")
    got = {t.name: (t.uid, t.gid) for t in _layer_members(layout, m["layers"][-1])}
    assert got["r/a.txt"] == (7, 8) and got["r/sub"] == (0, 0)
    uid, gid = os.getuid(), os.getgid()
    insert(InsertOptions(ImageRef(base, "base"), "/m", str(src / "sub" / "b.bin"),
                         uid_map=(IdMapping(100, uid, 1),), gid_map=(IdMapping(200, gid, 1),),
                         compression="none"))
    _, m, _ = _image(base, "base")
    t = _layer_members(layout, m["layers"][-1])[0]
    assert (t.uid, t.gid) == (100, 200)


@pytest.mark.parametrize(("kw", "text"), [
    ({"target": "/x"}, "needs SOURCE"),
    ({"target": "/x", "source": "SRC", "whiteout": True}, "--whiteout takes only TARGET"),
    ({"target": "/", "whiteout": True}, "root"),
    ({"target": "/x/.wh.y", "source": "SRC"}, "whiteouts"),
    ({"target": "/x", "source": "SRC/a.txt", "opaque": True}, "--opaque"),
    ({"target": "/", "source": "SRC/a.txt"}, "not a directory"),
    ({"target": "/x", "source": "SRC", "compression": "lz4"}, "compression"),
    ({"target": "/x", "source": "SRC", "new_tag": "bad tag"}, "invalid tag"),
])
def test_insert_usage_errors(base: str, src: Path, kw: dict[str, Any], text: str) -> None:
    if "source" in kw:
        kw["source"] = kw["source"].replace("SRC", str(src))
    with pytest.raises(UsageError, match=text):
        insert(InsertOptions(ImageRef(base, "base"), **kw))


def test_insert_refuses_whiteout_names_in_source(base: str, src: Path) -> None:
    (src / "sub" / ".wh.evil").write_text("")
    with pytest.raises(UsageError, match="whiteouts"):
        insert(InsertOptions(ImageRef(base, "base"), "/x", str(src)))
    with pytest.raises(NotFoundError):
        insert(InsertOptions(ImageRef(base, "base"), "/x", str(src / "missing")))


def test_normalize_target() -> None:
    assert normalize_target("/a/b/../c/") == "a/c"
    assert normalize_target("../../etc") == "etc"
    assert normalize_target("/") == ""
    with pytest.raises(UsageError):
        normalize_target("a\0b")


# -- tag / rm / ls / stat --------------------------------------------------------------
def test_tag_rm_ls(base: str) -> None:
    d = tag_image(ImageRef(base, "base"), "v1.0")
    tags = list_tags(base)
    assert [t for t, _ in tags] == ["base", "v1.0"]
    assert tags[1][1].digest == d.digest
    assert tags[1][1].annotations == {mt.REF_NAME: "v1.0"}
    remove_tag(ImageRef(base, "base"))
    assert [t for t, _ in list_tags(base)] == ["v1.0"]
    with pytest.raises(NotFoundError):
        remove_tag(ImageRef(base, "base"))
    with pytest.raises(NotFoundError):
        tag_image(ImageRef(base, "base"), "x")


def test_stat_without_history_and_with_empty_entries(tmp_path: Path) -> None:
    lay = str(tmp_path / "lay")
    t1, t2 = TarBuilder().add_file("a", b"1").build(), TarBuilder().add_file("b", b"2").build()
    build_image(lay, "img", [t1, t2], extra_config={"history": [
        {"created_by": "base"}, {"created_by": "env", "empty_layer": True}, {"comment": "x"}]})
    st = stat_image(ImageRef(lay, "img"))
    assert [(r.layer is not None, r.history.get("created_by")) for r in st.rows] == [
        (True, "base"), (False, "env"), (True, None)]
    j = st.to_json()
    assert j["history"][1]["layer"] is None and j["history"][1]["diff_id"] == ""
    assert j["history"][0]["created_by"] == "base" and j["history"][0]["diff_id"].startswith(
        "sha256:")
    build_image(lay, "nohist", [t1, t2], extra_config={"history": []})
    st = stat_image(ImageRef(lay, "nohist"))
    assert [r.history for r in st.rows] == [{}, {}] and st.warnings == []


# -- gc --------------------------------------------------------------------------------
def _blobs(lay: str) -> set[str]:
    return {n for n in os.listdir(os.path.join(lay, "blobs", "sha256"))
            if not n.startswith(".")}


def test_gc_removes_only_unreachable(tmp_path: Path) -> None:
    lay = str(tmp_path / "lay")
    t1, t2 = TarBuilder().add_file("a", b"1").build(), TarBuilder().add_file("b", b"2").build()
    build_image(lay, "one", [t1])
    build_index_image(lay, "multi", [(None, [t1, t2])])
    build_image(lay, "gone", [t2, TarBuilder().add_file("c", b"3").build()], compression="zstd")
    before = _blobs(lay)
    layout = OCILayout.open(lay)
    live = gcmod.reachable(layout)
    res = gcmod.gc(lay)
    assert res.removed == [] and res.kept == len(before)
    remove_tag(ImageRef(lay, "gone"))
    dry = gcmod.gc(lay, dry_run=True)
    assert dry.removed and _blobs(lay) == before
    res = gcmod.gc(lay)
    assert {d for d, _ in res.removed} == {d for d, _ in dry.removed}
    assert res.freed == sum(n for _, n in res.removed)
    # the index's manifests, configs and layers survive; 'gone''s own blobs do not
    assert {"sha256:" + b for b in _blobs(lay)} == gcmod.reachable(layout)
    assert len(res.removed) == 4  # zstd layer x2 (t2 is also zstd there), config, manifest
    assert gcmod.reachable(layout) < live
    for tag in ("one", "multi"):
        layout.config_for(layout.resolve(tag))


def test_gc_stale_tmp_files(tmp_path: Path) -> None:
    lay = str(tmp_path / "lay")
    build_image(lay, "x", [TarBuilder().build()])
    bd = os.path.join(lay, "blobs", "sha256")
    for name in (".tmp-old", ".tmp-new"):
        Path(bd, name).write_bytes(b"12345")
    Path(lay, ".tmp-idx").write_bytes(b"1")
    Path(bd, "README").write_bytes(b"not a blob")
    old = os.stat(os.path.join(bd, ".tmp-new")).st_mtime - 7200
    os.utime(os.path.join(bd, ".tmp-old"), (old, old))
    os.utime(os.path.join(lay, ".tmp-idx"), (old, old))
    res = gcmod.gc(lay)
    assert res.removed == []
    assert sorted(res.removed_tmp) == [".tmp-idx", "blobs/sha256/.tmp-old"]
    assert sorted(os.listdir(bd)).count(".tmp-new") == 1
    assert os.path.exists(os.path.join(bd, "README"))
    assert res.to_json()["freed"] == 6


def test_gc_refuses_a_broken_layout(tmp_path: Path) -> None:
    lay = str(tmp_path / "lay")
    desc = build_image(lay, "x", [TarBuilder().build()])
    layout = OCILayout.open(lay)
    stray = layout.put_blob(b"stray", "application/octet-stream")
    os.unlink(layout.blob_path(desc.digest))
    with pytest.raises(NotFoundError, match="missing") as e:
        gcmod.gc(lay)
    assert e.value.hint and "will not delete" in e.value.hint
    assert layout.has_blob(stray.digest)


def test_gc_json_shape(tmp_path: Path) -> None:
    lay = str(tmp_path / "lay")
    build_image(lay, "x", [TarBuilder().build()])
    stray = OCILayout.open(lay).put_blob(b"stray", "application/octet-stream")
    j = gcmod.gc(lay).to_json()
    assert j["removed"] == [{"digest": stray.digest, "size": 5}]
    json.dumps(j)
