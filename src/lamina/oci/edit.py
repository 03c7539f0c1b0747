"""Edit images in an OCI layout without unpacking them (umoci's ``new``,
``config``, ``tag``, ``rm``, ``ls``, ``stat`` and ``insert``).

Every edit writes new blobs (config, manifest and, for :func:`insert`, one
layer) and then moves a tag with one atomic ``index.json`` update; nothing
existing is modified, so an interrupted edit leaves only unreferenced blobs
(``lamina gc`` removes them).  Documents are schema-checked as they are
written (:mod:`lamina.oci.schema`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import posixpath
import re
import shlex
import shutil
import stat as _stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lamina.errors import NotFoundError, UsageError
from lamina.layer import whiteout as wh
from lamina.layer.diff import Change, kind_of, read_xattrs, sort_key, unmap_id
from lamina.layer.generate import write_layer
from lamina.layer.idmap import ROOTLESS_XATTR, IdMapping, decode_rootless
from lamina.layer.snapshot import walk
from lamina.oci import mediatypes as mt
from lamina.oci.layout import ImageRef, OCILayout
from lamina.oci.model import Descriptor, Manifest, Platform
from lamina.oci.schema import is_date_time
from lamina.repack import timestamp

#: docker's tag grammar: what lamina accepts for tags it creates
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")

#: ``--clear`` field -> (document, key)
CLEARABLE: dict[str, tuple[str, str]] = {
    "config.labels": ("config", "Labels"),
    "config.env": ("config", "Env"),
    "config.entrypoint": ("config", "Entrypoint"),
    "config.cmd": ("config", "Cmd"),
    "config.exposedports": ("config", "ExposedPorts"),
    "config.volume": ("config", "Volumes"),
    "config.user": ("config", "User"),
    "config.workingdir": ("config", "WorkingDir"),
    "config.stopsignal": ("config", "StopSignal"),
    "manifest.annotations": ("manifest", "annotations"),
}


# -- small parsers the CLI uses ---------------------------------------------------------
def check_tag(tag: str) -> str:
    """Return *tag* if lamina may create it, else raise :class:`UsageError`."""
    if not _TAG_RE.match(tag):
        raise UsageError(f"invalid tag {tag!r}",
                         hint="tags are 1-128 characters of letters, digits, '_', '.' and "
                              "'-', not starting with '.' or '-'")
    return tag


def parse_kv(text: str, what: str) -> tuple[str, str]:
    """``KEY=VALUE`` -> (KEY, VALUE); the value may be empty, the key may not."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"{what} {text!r} is not KEY=VALUE")
    return key, value


def check_created(text: str) -> str:
    if not is_date_time(text):
        raise UsageError(f"{text!r} is not an RFC 3339 date-time",
                         hint="e.g. 2024-05-01T12:00:00Z")
    return text


def normalize_target(target: str) -> str:
    """An absolute-or-relative image path -> layer path without a leading '/'
    ('' is the root); '..' cannot climb above the root, as in a container."""
    if "\0" in target or not target:
        raise UsageError(f"bad target path {target!r}")
    return posixpath.normpath("/" + target).lstrip("/")


# -- results -------------------------------------------------------------------------
@dataclass
class EditResult:
    layout: str
    tag: str
    manifest: Descriptor
    config: str
    layer: Descriptor | None = None
    diff_id: str | None = None
    entries: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"layout": self.layout, "tag": self.tag, "manifest": self.manifest.digest,
                "manifest_size": self.manifest.size, "config": self.config,
                "layer": self.layer.to_json() if self.layer else None,
                "diff_id": self.diff_id, "entries": self.entries, "warnings": self.warnings}


# -- shared plumbing -------------------------------------------------------------------
@dataclass
class _Image:
    layout: OCILayout
    manifest: Manifest
    config_desc: Descriptor
    config: dict[str, Any]
    warnings: list[str]


def _load(ref: ImageRef, platform: Platform | None, new_tag: str | None) -> _Image:
    layout = OCILayout.open(ref.layout)
    refs = layout.refs()
    warnings: list[str] = []
    manifest = layout.resolve(ref.tag, platform)
    if refs[ref.tag].media_type in mt.INDEX_TYPES and (new_tag or ref.tag) == ref.tag:
        warnings.append(f"{ref.tag} pointed at an image index; it now points at the "
                        f"{platform or Platform.host()} image only")
    cfg = layout.config_for(manifest)  # also checks that layers and diff_ids agree
    return _Image(layout, manifest, manifest.config, copy.deepcopy(cfg.raw), warnings)


def _commit(img: _Image, config: dict[str, Any], manifest: dict[str, Any],
            tag: str) -> tuple[Descriptor, Descriptor]:
    """Write *config* and *manifest* (its config descriptor filled in) and tag it."""
    cdesc = img.layout.put_json(config, img.config_desc.media_type, validate=True)
    cjson = dict(img.config_desc.raw)
    cjson.pop("data", None)  # embedded copy of the old config
    cjson.update({"mediaType": cdesc.media_type, "digest": cdesc.digest, "size": cdesc.size})
    manifest["config"] = cjson
    media_type = manifest.get("mediaType")
    if not isinstance(media_type, str):
        media_type = mt.MANIFEST
    mdesc = img.layout.put_json(manifest, media_type, validate=True)
    img.layout.set_ref(tag, mdesc)
    return cdesc, mdesc


def _history(created: str, created_by: str, author: str | None, comment: str | None,
             empty_layer: bool) -> dict[str, Any]:
    h: dict[str, Any] = {"created": created, "created_by": created_by}
    if author:
        h["author"] = author
    if comment:
        h["comment"] = comment
    if empty_layer:
        h["empty_layer"] = True
    return h


def _open_or_init(path: str) -> OCILayout:
    if os.path.exists(os.path.join(path, "oci-layout")):
        return OCILayout.open(path)
    if os.path.isdir(path) and os.listdir(path):
        raise UsageError(f"{path} exists and is not an OCI image layout",
                         hint="give a new or empty directory, or an existing layout")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{path} exists and is not a directory")
    return OCILayout.init(path)


# -- new -------------------------------------------------------------------------------
@dataclass(frozen=True)
class NewOptions:
    image: ImageRef
    platform: Platform | None = None     # default: this machine's
    source_date_epoch: int | None = None


def new_image(opts: NewOptions) -> EditResult:
    """An empty image (no layers, empty config) tagged ``opts.image.tag``; the
    layout is created if it does not exist."""
    check_tag(opts.image.tag)
    layout = _open_or_init(opts.image.layout)
    if opts.image.tag in layout.refs():
        raise UsageError(f"tag {opts.image.tag!r} already exists in {layout.path}",
                         hint=f"remove it first with 'lamina rm --image {opts.image}' or "
                              "choose another tag")
    plat = opts.platform or Platform.host()
    config: dict[str, Any] = {
        "created": timestamp(opts.source_date_epoch),
        "architecture": plat.architecture,
        "os": plat.os,
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": []},
    }
    if plat.variant:
        config["variant"] = plat.variant
    cdesc = layout.put_json(config, mt.CONFIG, validate=True)
    manifest = {"schemaVersion": 2, "mediaType": mt.MANIFEST, "config": cdesc.to_json(),
                "layers": []}
    mdesc = layout.put_json(manifest, mt.MANIFEST, validate=True)
    layout.set_ref(opts.image.tag, mdesc)
    return EditResult(layout.path, opts.image.tag, mdesc, cdesc.digest)


# -- config ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ConfigOptions:
    image: ImageRef
    new_tag: str | None = None
    platform: Platform | None = None
    clear: tuple[str, ...] = ()                       # keys of CLEARABLE, applied first
    user: str | None = None
    env: tuple[tuple[str, str], ...] = ()             # replaces a variable of that name
    entrypoint: tuple[str, ...] | None = None          # replaces the whole list
    cmd: tuple[str, ...] | None = None
    working_dir: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()      # manifest annotations
    exposed_ports: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    stop_signal: str | None = None
    author: str | None = None
    created: str | None = None
    architecture: str | None = None
    os: str | None = None
    variant: str | None = None
    history: bool = True
    created_by: str | None = None
    history_author: str | None = None
    history_comment: str | None = None
    history_created: str | None = None
    source_date_epoch: int | None = None

    def describe(self) -> str:
        """A command line for the history's default ``created_by``."""
        opts: list[tuple[str, str]] = [("--clear", c) for c in self.clear]
        if self.user is not None:
            opts.append(("--config.user", self.user))
        opts += [("--config.env", f"{k}={v}") for k, v in self.env]
        opts += [("--config.entrypoint", e) for e in self.entrypoint or ()]
        opts += [("--config.cmd", c) for c in self.cmd or ()]
        if self.working_dir is not None:
            opts.append(("--config.workingdir", self.working_dir))
        opts += [("--config.label", f"{k}={v}") for k, v in self.labels]
        opts += [("--manifest.annotation", f"{k}={v}") for k, v in self.annotations]
        opts += [("--config.exposedports", p) for p in self.exposed_ports]
        opts += [("--config.volume", v) for v in self.volumes]
        for flag, value in (("--config.stopsignal", self.stop_signal),
                            ("--author", self.author), ("--created", self.created),
                            ("--architecture", self.architecture), ("--os", self.os),
                            ("--variant", self.variant)):
            if value is not None:
                opts.append((flag, value))
        return " ".join(["lamina config", *(f"{f}={shlex.quote(v)}" for f, v in opts)])


def _set_map(obj: dict[str, Any], key: str, items: dict[str, Any]) -> None:
    if items:
        cur = obj.get(key)
        obj[key] = {**(cur if isinstance(cur, dict) else {}), **items}


def edit_config(opts: ConfigOptions) -> EditResult:
    """A new config (and manifest) with the changes of *opts*, tagged
    ``opts.new_tag`` or, by default, the edited tag."""
    tag = check_tag(opts.new_tag) if opts.new_tag else opts.image.tag
    for name in opts.clear:
        if name not in CLEARABLE:
            raise UsageError(f"--clear={name}: not a field that can be cleared",
                             hint="one of " + ", ".join(sorted(CLEARABLE)))
    for t in (opts.created, opts.history_created):
        if t is not None:
            check_created(t)
    img = _load(opts.image, opts.platform, opts.new_tag)
    config = img.config
    manifest = copy.deepcopy(img.manifest.raw)
    cc = config.get("config")
    c: dict[str, Any] = dict(cc) if isinstance(cc, dict) else {}

    for name in opts.clear:
        doc, key = CLEARABLE[name]
        (c if doc == "config" else manifest).pop(key, None)
    if opts.user is not None:
        c["User"] = opts.user
    if opts.env:
        env = [e for e in (c.get("Env") or []) if isinstance(e, str)]
        for k, v in opts.env:
            entry = f"{k}={v}"
            idx = next((i for i, e in enumerate(env) if e.partition("=")[0] == k), None)
            if idx is None:
                env.append(entry)
            else:
                env[idx] = entry
        c["Env"] = env
    if opts.entrypoint is not None:
        c["Entrypoint"] = list(opts.entrypoint)
    if opts.cmd is not None:
        c["Cmd"] = list(opts.cmd)
    if opts.working_dir is not None:
        c["WorkingDir"] = opts.working_dir
    if opts.stop_signal is not None:
        c["StopSignal"] = opts.stop_signal
    _set_map(c, "Labels", dict(opts.labels))
    _set_map(c, "ExposedPorts", {p: {} for p in opts.exposed_ports})
    _set_map(c, "Volumes", {v: {} for v in opts.volumes})
    _set_map(manifest, "annotations", dict(opts.annotations))
    config["config"] = c

    for key, value in (("author", opts.author), ("created", opts.created),
                       ("architecture", opts.architecture), ("os", opts.os),
                       ("variant", opts.variant)):
        if value is not None:
            config[key] = value
    if opts.history:
        created = opts.history_created or timestamp(opts.source_date_epoch)
        author = config.get("author")  # umoci's default for the entry's author too
        config["history"] = [*(config.get("history") or []), _history(
            created, opts.created_by or opts.describe(),
            opts.history_author or (author if isinstance(author, str) else None),
            opts.history_comment, empty_layer=True)]
    cdesc, mdesc = _commit(img, config, manifest, tag)
    return EditResult(img.layout.path, tag, mdesc, cdesc.digest, warnings=img.warnings)


# -- insert ----------------------------------------------------------------------------
@dataclass(frozen=True)
class InsertOptions:
    image: ImageRef
    target: str                         # path inside the image
    source: str | None = None           # file or directory on the host; None for whiteout
    new_tag: str | None = None
    platform: Platform | None = None
    opaque: bool = False                # TARGET (a directory) replaces the lower one
    whiteout: bool = False              # remove TARGET from the image
    compression: str = "gzip"
    rootless: bool = False              # owners from user.rootlesscontainers, else root
    uid_map: tuple[IdMapping, ...] = ()  # host -> container ids of SOURCE's files
    gid_map: tuple[IdMapping, ...] = ()
    history: bool = True
    created_by: str | None = None
    history_author: str | None = None
    history_comment: str | None = None
    source_date_epoch: int | None = None


def _check_insert(opts: InsertOptions) -> tuple[str, os.stat_result | None]:
    target = normalize_target(opts.target)
    name = target.rpartition("/")[2]
    if name.startswith(wh.PREFIX):
        raise UsageError(f"target {opts.target!r}: names starting with {wh.PREFIX!r} are "
                         "whiteouts in a layer and cannot be inserted")
    if opts.whiteout:
        if opts.source is not None or opts.opaque:
            raise UsageError("--whiteout takes only TARGET (no SOURCE, no --opaque)",
                             hint="lamina insert --whiteout --image LAYOUT:TAG TARGET")
        if not target:
            raise UsageError("cannot white out the root directory")
        return target, None
    if opts.source is None:
        raise UsageError("insert needs SOURCE and TARGET",
                         hint="lamina insert --image LAYOUT:TAG SOURCE TARGET")
    try:
        st = os.lstat(opts.source)
    except FileNotFoundError:
        raise NotFoundError(f"{opts.source}: no such file or directory") from None
    if opts.opaque and (not target or not _stat.S_ISDIR(st.st_mode)):
        raise UsageError("--opaque needs a directory SOURCE and a TARGET below '/'")
    if not target and not _stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{opts.source} is not a directory: it cannot become the root")
    if _stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{opts.source} is a socket: sockets cannot be stored in a layer")
    return target, st


def _owner(opts: InsertOptions, host: str, st: os.stat_result,
           xattrs: dict[str, bytes]) -> tuple[int, int]:
    if opts.rootless:
        raw = xattrs.pop(ROOTLESS_XATTR, None)
        if raw is None:
            return 0, 0
        try:
            return decode_rootless(raw)
        except ValueError as e:
            raise UsageError(f"{host}: bad {ROOTLESS_XATTR} xattr: {e}") from None
    return unmap_id(st.st_uid, opts.uid_map), unmap_id(st.st_gid, opts.gid_map)


def _source_changes(opts: InsertOptions, target: str, root_st: os.stat_result,
                    warnings: list[str]) -> list[Change]:
    """The layer's entries for SOURCE at *target*, sorted, the opaque marker right
    after its directory (before any of the directory's new content)."""
    source = os.path.abspath(opts.source or "")
    found: list[tuple[str, str, os.stat_result]] = []  # layer path, host path, stat
    if target:
        found.append((target, source, root_st))
    if _stat.S_ISDIR(root_st.st_mode):
        for rel, st in walk(source):
            if rel.rpartition("/")[2].startswith(wh.PREFIX):
                raise UsageError(f"{source}/{rel}: names starting with {wh.PREFIX!r} are "
                                 "whiteouts in a layer and cannot be inserted")
            if _stat.S_ISSOCK(st.st_mode):
                warnings.append(f"skipping socket {source}/{rel}: sockets cannot be stored "
                                "in a layer")
                continue
            found.append((f"{target}/{rel}" if target else rel, os.path.join(source, rel), st))
    found.sort(key=lambda x: sort_key(x[0]))
    out: list[Change] = []
    first_of_inode: dict[tuple[int, int], str] = {}
    for path, host, st in found:
        xattrs = read_xattrs(host)
        uid, gid = _owner(opts, host, st, xattrs)
        c = Change(path, kind_of(st.st_mode), st, uid=uid, gid=gid, xattrs=xattrs)
        if c.kind == "symlink":
            c.linkname = os.readlink(host)
        elif c.kind == "file" and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            if key in first_of_inode:
                c.kind, c.linkname = "hardlink", first_of_inode[key]
            else:
                first_of_inode[key] = path
        out.append(c)
        if opts.opaque and path == target:
            out.append(Change(f"{target}/{wh.OPAQUE}", "opaque"))
    return out


@contextlib.contextmanager
def _staged_rootfs(source: str, target: str, st: os.stat_result) -> Iterator[str]:
    """A directory R such that ``R/<layer path>`` opens SOURCE's files, which is what
    :func:`write_layer` reads (it opens the final component with O_NOFOLLOW, so
    only directories above it may be symlinks).

    - a directory SOURCE: TARGET's parents are made in a staging directory and
      TARGET is a symlink to SOURCE;
    - a regular file keeping its name: TARGET's parent is a symlink to SOURCE's;
    - a renamed regular file: hard-linked into the staging directory, or copied
      when that is not possible;
    - other kinds (symlink, fifo, device) are never opened.
    """
    source = os.path.abspath(source)
    parent, _, name = target.rpartition("/")
    if not target:
        yield source
        return
    keep_name = _stat.S_ISREG(st.st_mode) and name == os.path.basename(source)
    if keep_name and not parent:
        yield os.path.dirname(source)
        return
    with tempfile.TemporaryDirectory(prefix="lamina-insert-") as stage:
        dest = os.path.join(stage, target)
        if keep_name:
            os.makedirs(os.path.dirname(os.path.dirname(dest)), exist_ok=True)
            os.symlink(os.path.dirname(source), os.path.dirname(dest))
            yield stage
            return
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if _stat.S_ISDIR(st.st_mode):
            os.symlink(source, dest)
        elif _stat.S_ISREG(st.st_mode):
            try:
                os.link(source, dest)
            except OSError:
                shutil.copyfile(source, dest)
        yield stage


def insert(opts: InsertOptions) -> EditResult:
    """Add SOURCE at TARGET (or a whiteout of TARGET) as a new top layer."""
    tag = check_tag(opts.new_tag) if opts.new_tag else opts.image.tag
    if opts.compression not in mt.COMPRESSION_LAYER_TYPE:
        raise UsageError(f"unknown compression {opts.compression!r}",
                         hint="use gzip, zstd or none")
    target, st = _check_insert(opts)
    img = _load(opts.image, opts.platform, opts.new_tag)
    warnings = img.warnings
    if st is None:
        parent, _, name = target.rpartition("/")
        changes = [Change(f"{parent}/{wh.PREFIX}{name}" if parent else wh.PREFIX + name,
                          "whiteout")]
        rootfs_cm: contextlib.AbstractContextManager[str] = contextlib.nullcontext(
            img.layout.path)
    else:
        changes = _source_changes(opts, target, st, warnings)
        rootfs_cm = _staged_rootfs(opts.source or "", target, st)
    with rootfs_cm as rootfs:
        gen = write_layer(img.layout, rootfs, changes, compression=opts.compression,
                          source_date_epoch=opts.source_date_epoch)

    config = img.config
    rootfs_cfg = dict(config.get("rootfs") or {"type": "layers"})
    rootfs_cfg["diff_ids"] = [*(rootfs_cfg.get("diff_ids") or []), gen.diff_id]
    config["rootfs"] = rootfs_cfg
    created = timestamp(opts.source_date_epoch)
    config["created"] = created
    if opts.history:
        what = shlex.join(["--whiteout", "/" + target] if opts.whiteout else
                          [*(["--opaque"] if opts.opaque else []), opts.source or "",
                           "/" + target])
        config["history"] = [*(config.get("history") or []), _history(
            created, opts.created_by or f"lamina insert {what}", opts.history_author,
            opts.history_comment, empty_layer=False)]
    manifest = copy.deepcopy(img.manifest.raw)
    manifest["layers"] = [*(manifest.get("layers") or []), gen.desc.to_json()]
    cdesc, mdesc = _commit(img, config, manifest, tag)
    return EditResult(img.layout.path, tag, mdesc, cdesc.digest, gen.desc, gen.diff_id,
                      gen.entries, warnings)


# -- tag / rm / ls ---------------------------------------------------------------------
def tag_image(image: ImageRef, new_tag: str) -> Descriptor:
    """Point *new_tag* at whatever ``image.tag`` points at (manifest or index)."""
    check_tag(new_tag)
    layout = OCILayout.open(image.layout)
    refs = layout.refs()
    if image.tag not in refs:
        raise NotFoundError(f"tag {image.tag!r} not found in {layout.path}",
                            hint=f"tags: {', '.join(sorted(refs)) or 'none'}")
    d = refs[image.tag]
    ann = {k: v for k, v in d.annotations.items() if k != mt.REF_NAME}
    layout.set_ref(new_tag, Descriptor(d.media_type, d.digest, d.size, ann, d.platform, d.raw))
    return d


def remove_tag(image: ImageRef) -> None:
    """Remove ``image.tag`` from the index (its blobs stay until ``lamina gc``)."""
    layout = OCILayout.open(image.layout)
    refs = layout.refs()
    if image.tag not in refs:
        raise NotFoundError(f"tag {image.tag!r} not found in {layout.path}",
                            hint=f"tags: {', '.join(sorted(refs)) or 'none'}")
    layout.remove_ref(image.tag)


def list_tags(layout_path: str) -> list[tuple[str, Descriptor]]:
    return sorted(OCILayout.open(layout_path).refs().items())


# -- stat ------------------------------------------------------------------------------
@dataclass
class HistoryRow:
    layer: Descriptor | None      # None for an empty_layer entry
    diff_id: str | None
    history: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """umoci stat's shape: the history entry's fields beside layer and diff_id."""
        return {**self.history, "layer": self.layer.to_json() if self.layer else None,
                "diff_id": self.diff_id or ""}


@dataclass
class ImageStat:
    tag: str
    manifest: Descriptor
    config: dict[str, Any]
    rows: list[HistoryRow]
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"tag": self.tag, "manifest": self.manifest.to_json(),
                "platform": {k: self.config[k] for k in ("os", "architecture", "variant")
                             if isinstance(self.config.get(k), str)},
                "config": self.config.get("config") or {},
                "history": [r.to_json() for r in self.rows], "warnings": self.warnings}


def stat_image(image: ImageRef, platform: Platform | None = None) -> ImageStat:
    """The image's history lined up with its layers (like ``umoci stat``): each
    history entry that is not ``empty_layer`` belongs to the next layer."""
    layout = OCILayout.open(image.layout)
    manifest = layout.resolve(image.tag, platform)
    cfg = layout.config_for(manifest)
    raw_hist = cfg.raw.get("history")
    history = [h for h in raw_hist if isinstance(h, dict)] if isinstance(raw_hist, list) else []
    rows: list[HistoryRow] = []
    warnings: list[str] = []
    li = 0
    for h in history:
        if h.get("empty_layer") is True:
            rows.append(HistoryRow(None, None, h))
        elif li < len(manifest.layers):
            rows.append(HistoryRow(manifest.layers[li], cfg.diff_ids[li], h))
            li += 1
        else:
            rows.append(HistoryRow(None, None, h))
            warnings.append("the config's history has more non-empty entries than the "
                            "image has layers")
    if li < len(manifest.layers) and history:
        warnings.append(f"{len(manifest.layers) - li} layers have no history entry")
    rows += [HistoryRow(manifest.layers[i], cfg.diff_ids[i], {})
             for i in range(li, len(manifest.layers))]
    desc = Descriptor(mt.MANIFEST, manifest.digest,
                      os.path.getsize(layout.blob_path(manifest.digest)))
    mtype = manifest.raw.get("mediaType")
    if isinstance(mtype, str):
        desc = Descriptor(mtype, desc.digest, desc.size)
    return ImageStat(image.tag, desc, cfg.raw, rows, warnings)
