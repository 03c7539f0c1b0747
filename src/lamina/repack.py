"""Repack a bundle: add what changed in its rootfs as a new layer of a new image.

Reads ``BUNDLE/lamina.json`` and ``BUNDLE/lamina.snapshot`` written by
unpack, scans the rootfs (see :mod:`lamina.layer.diff`), writes the new layer,
config (diff_ids + history) and manifest as blobs, then points the new tag at
the manifest with one atomic index update.  An empty change adds no layer:
the new tag points at the bundle's image.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from lamina.bundle import METADATA, SNAPSHOT, write_json
from lamina.drivers.manage import driver_delta, refresh_driver_bundle
from lamina.errors import BundleError, ImageFormatError, NotFoundError, UsageError
from lamina.hooks import HookOptions, HookRunner, parse_paths
from lamina.layer.diff import ScanResult, scan
from lamina.layer.generate import write_layer, write_stream
from lamina.layer.idmap import IdMapping
from lamina.layer.snapshot import read_snapshot, write_rows
from lamina.oci import mediatypes as mt
from lamina.oci.layout import ImageRef, OCILayout
from lamina.oci.model import Descriptor
from lamina.stream.splitdirfdstream import StreamWriter


@dataclass(frozen=True)
class RepackOptions:
    image: ImageRef
    bundle: str
    compression: str = "gzip"
    history: bool = True
    created_by: str | None = None
    author: str | None = None
    comment: str | None = None
    refresh_bundle: bool = False
    source_date_epoch: int | None = None
    hooks: HookOptions | None = None    # None: no hooks (the CLI reads the hooks.toml files)
    store: str | None = None            # repack into this store (then *image* is unused)
    name: str | None = None             # ... under this NAME:TAG


@dataclass
class RepackResult:
    manifest: str
    layer: str | None
    diff_id: str | None
    added: int = 0
    whiteouts: int = 0
    size: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def read_bundle_meta(bundle: str) -> dict[str, Any]:
    try:
        with open(os.path.join(bundle, METADATA), encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise BundleError(f"{bundle} is not a lamina bundle (no {METADATA})",
                          hint="unpack the image with 'lamina unpack' first") from None
    except ValueError as e:
        raise BundleError(f"{bundle}/{METADATA}: {e}") from None
    if not isinstance(meta, dict) or "manifest" not in meta:
        raise BundleError(f"{bundle}/{METADATA} is not lamina bundle metadata")
    return meta


def timestamp(epoch: int | None) -> str:
    t = _dt.datetime.fromtimestamp(epoch if epoch is not None else time.time(), _dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if epoch is None else t.strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def repack(opts: RepackOptions, warn: Any = None) -> RepackResult:
    if opts.store is not None:
        return _repack_into_store(opts, warn)
    t0 = time.monotonic()
    bundle = os.path.abspath(opts.bundle)
    meta = read_bundle_meta(bundle)
    layout = OCILayout.open(opts.image.layout)
    mdesc = Descriptor(mt.MANIFEST, meta["manifest"], 0)
    if not layout.has_blob(mdesc.digest):
        raise BundleError(f"the bundle's image {meta['manifest']} is not in {layout.path}",
                          hint="repack into the layout the bundle was unpacked from")
    size = os.path.getsize(layout.blob_path(mdesc.digest))
    mdesc = Descriptor(mt.MANIFEST, meta["manifest"], size)
    manifest = layout.read_json(mdesc)
    if not isinstance(manifest, dict):
        raise ImageFormatError(f"manifest {mdesc.digest} is not a JSON object")
    cdesc = Descriptor.from_json(manifest.get("config"), "manifest config")
    config = layout.read_json(cdesc)
    hooks = HookRunner.load(opts.hooks) if opts.hooks is not None else HookRunner([])
    hook_doc = _hook_doc(bundle, meta, manifest)
    rootfs, res, delta, warnings = _changes(bundle, meta, hooks, hook_doc, warn)
    result = RepackResult(mdesc.digest, None, None, warnings=warnings)
    if res.changes:
        gen = write_layer(layout, rootfs, res.changes, compression=opts.compression,
                          source_date_epoch=opts.source_date_epoch)
        result.layer, result.diff_id, result.size = gen.desc.digest, gen.diff_id, gen.desc.size
        _count(result, res)
        config = _new_config(config, gen.diff_id, opts)
        new_cdesc = layout.put_json(config, mt.CONFIG)
        manifest = _new_manifest(manifest, new_cdesc, gen.desc)
        mdesc = layout.put_json(manifest, mt.MANIFEST)
        result.manifest = mdesc.digest
        meta["config"] = new_cdesc.digest
        meta["diff_ids"] = config["rootfs"]["diff_ids"]
        meta["layers"] = manifest["layers"]
        hashes = gen.hashes
    else:
        hashes = {}
    if opts.refresh_bundle:
        # before the tag moves: a failing hook leaves the layout's refs and the bundle as
        # they were (the new blobs are unreferenced until then; lamina gc drops them)
        _hook_refresh(hooks, hook_doc, mdesc.digest, result)
    layout.set_ref(opts.image.tag, mdesc)
    if opts.refresh_bundle:
        if delta:
            meta = refresh_driver_bundle(bundle, meta)
        _refresh(bundle, meta, mdesc.digest, opts.image, res.rows, hashes)
    result.seconds = round(time.monotonic() - t0, 3)
    return result


def _changes(bundle: str, meta: dict[str, Any], hooks: HookRunner, hook_doc: dict[str, Any],
             warn: Any) -> tuple[str, ScanResult, bool, list[str]]:
    """What changed: (the directory holding the changes, the scan, whether a
    driver's delta list answered, warnings)."""
    o = meta.get("options", {})
    # a driver that knows what changed (overlay: its upper dir) saves the full walk
    delta = driver_delta(bundle, meta)
    if delta is not None:
        rootfs, res = delta[1], ScanResult(delta[0], [], [])
    else:
        with open(os.path.join(bundle, SNAPSHOT), "rb") as f:
            snap = read_snapshot(f)
        rootfs = os.path.join(bundle, "rootfs")
        res = scan(rootfs, snap, rootless=bool(o.get("rootless")),
                   uid_map=tuple(IdMapping.parse(m) for m in o.get("uid_map", [])),
                   gid_map=tuple(IdMapping.parse(m) for m in o.get("gid_map", [])),
                   only=_hook_delta_list(hooks, hook_doc))
    warnings = [f"skipping socket /{p}: sockets cannot be stored in a layer"
                for p in res.skipped_sockets]
    for w in warnings:
        if warn is not None:
            warn(w)
    return rootfs, res, delta is not None, warnings


def _count(result: RepackResult, res: ScanResult) -> None:
    result.added = sum(1 for c in res.changes if c.kind not in ("whiteout", "opaque"))
    result.whiteouts = len(res.changes) - result.added


def _new_config(config: Any, diff_id: str, opts: RepackOptions) -> dict[str, Any]:
    """*config* with the new layer's diff_id, the creation time and a history entry."""
    out: dict[str, Any] = dict(config)
    rootfs_cfg = dict(out.get("rootfs") or {"type": "layers"})
    rootfs_cfg["diff_ids"] = [*rootfs_cfg.get("diff_ids", []), diff_id]
    out["rootfs"] = rootfs_cfg
    created = timestamp(opts.source_date_epoch)
    out["created"] = created
    if opts.history:
        h: dict[str, Any] = {"created": created,
                             "created_by": opts.created_by or "lamina repack"}
        if opts.author:
            h["author"] = opts.author
        if opts.comment:
            h["comment"] = opts.comment
        out["history"] = [*out.get("history", []), h]
    return out


def _new_manifest(manifest: dict[str, Any], cdesc: Descriptor,
                  layer: Descriptor) -> dict[str, Any]:
    manifest = dict(manifest)
    manifest["config"] = cdesc.to_json()
    manifest["layers"] = [*manifest.get("layers", []), layer.to_json()]
    manifest.setdefault("mediaType", mt.MANIFEST)
    return manifest


def _repack_into_store(opts: RepackOptions, warn: Any) -> RepackResult:
    """Repack into a store: the new layer travels as a splitdirfdstream whose
    file chunks name the changed files beneath the bundle (its rootfs, or the
    overlay driver's upper dir), so the store reads and hashes them but, on a
    reflink filesystem, clones their data instead of writing it again."""
    from lamina.store import Store

    assert opts.store is not None and opts.name is not None
    if opts.refresh_bundle:
        raise UsageError("--refresh-bundle is for repacks into a layout",
                         hint="unpack the new image from the store instead")
    t0 = time.monotonic()
    bundle = os.path.abspath(opts.bundle)
    meta = read_bundle_meta(bundle)
    with Store.open(opts.store, create=False) as store, store.session():
        try:
            mbytes = store.read_blob(meta["manifest"])
        except NotFoundError:
            raise BundleError(f"the bundle's image {meta['manifest']} is not in the store "
                              f"{store.path}",
                              hint="repack into the store the bundle was unpacked from "
                                   "(see 'store' in BUNDLE/lamina.json)") from None
        manifest = json.loads(mbytes)
        cdesc = Descriptor.from_json(manifest.get("config"), "manifest config")
        old_config = store.read_blob(cdesc.digest)
        config = json.loads(old_config)
        hooks = HookRunner.load(opts.hooks) if opts.hooks is not None else HookRunner([])
        rootfs, res, _delta, warnings = _changes(bundle, meta, hooks,
                                                 _hook_doc(bundle, meta, manifest), warn)
        result = RepackResult(meta["manifest"], None, None, warnings=warnings)
        if not res.changes:
            store.put_image(opts.name, mbytes, old_config)     # the same image, tagged
            result.seconds = round(time.monotonic() - t0, 3)
            return result
        desc, diff_id = _stream_layer(store, rootfs, res, opts)
        result.layer, result.diff_id, result.size = desc.digest, diff_id, desc.size
        _count(result, res)
        config = _new_config(config, diff_id, opts)
        cbytes = json.dumps(config, separators=(",", ":")).encode()
        cdesc = Descriptor(mt.CONFIG, "sha256:" + hashlib.sha256(cbytes).hexdigest(),
                           len(cbytes))
        new = json.dumps(_new_manifest(manifest, cdesc, desc), separators=(",", ":")).encode()
        result.manifest = store.put_image(opts.name, new, cbytes)
    result.seconds = round(time.monotonic() - t0, 3)
    return result


def _stream_layer(store: Any, rootfs: str, res: ScanResult,
                  opts: RepackOptions) -> tuple[Descriptor, str]:
    """Produce the layer's stream on a thread, into a pipe the store consumes."""
    root = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    r, w = os.pipe()
    failed: list[BaseException] = []

    def produce() -> None:
        try:
            with os.fdopen(w, "wb", buffering=1 << 20) as f:
                write_stream(res.changes, StreamWriter(f),
                             source_date_epoch=opts.source_date_epoch)
        except BaseException as e:
            failed.append(e)

    t = threading.Thread(target=produce, name="lamina-repack-stream", daemon=True)
    t.start()
    try:
        with os.fdopen(r, "rb", buffering=1 << 20) as stream:
            desc, diff_id, _stats = store.receive_layer(
                stream, [root], compression=opts.compression)
    except BaseException:
        t.join()    # the read end is closed: a producer still writing gets EPIPE
        if failed and not isinstance(failed[0], BrokenPipeError):
            raise failed[0] from None   # the cause, not the truncated stream it left
        raise
    finally:
        t.join()
        os.close(root)
    if failed:
        raise failed[0]
    return desc, str(diff_id)


def _hook_doc(bundle: str, meta: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """The fields every repack hook gets (see docs/plugins.md)."""
    annotations: dict[str, Any] = {}
    if isinstance(manifest.get("annotations"), dict):
        annotations.update(manifest["annotations"])
    try:
        with open(os.path.join(bundle, "config.json"), encoding="utf-8") as f:
            spec = json.load(f)
        if isinstance(spec, dict) and isinstance(spec.get("annotations"), dict):
            annotations.update(spec["annotations"])
    except (OSError, ValueError):
        pass  # a bundle without a runtime config can still be repacked
    return {"bundle": bundle, "rootfs": os.path.join(bundle, "rootfs"),
            "snapshot": os.path.join(bundle, SNAPSHOT), "manifest": meta["manifest"],
            "layers": meta.get("layers", []), "diff_ids": meta.get("diff_ids", []),
            "annotations": annotations}


def _hook_delta_list(hooks: HookRunner, doc: dict[str, Any]) -> list[str] | None:
    """The changed paths a ``repack.delta-list`` hook knows, or None: scan everything."""
    if not hooks.configured("repack.delta-list"):
        return None
    r = hooks.run("repack.delta-list", doc)
    if r.status != "handled":
        return None
    return parse_paths(r.stdout, source=f"repack.delta-list hook {r.hook}")


def _hook_refresh(hooks: HookRunner, doc: dict[str, Any], manifest: str,
                  result: RepackResult) -> None:
    if hooks.configured("repack.refresh-bundle"):
        hooks.run("repack.refresh-bundle", dict(
            doc, previous_manifest=doc["manifest"], manifest=manifest, new_layer=result.layer,
            new_diff_id=result.diff_id))


def _refresh(bundle: str, meta: dict[str, Any], manifest: str, ref: ImageRef,
             rows: list[tuple[object, ...]], hashes: dict[str, bytes]) -> None:
    """Make the bundle describe the new image, so a later repack diffs against it."""
    new_rows = []
    for r in rows:
        if r[1] == "f" and str(r[0]) in hashes:
            r = (*r[:9], hashes[str(r[0])])
        new_rows.append(r)
    tmp = os.path.join(bundle, SNAPSHOT + ".tmp")
    with open(tmp, "wb") as f:
        write_rows(new_rows, f)
    meta = dict(meta, manifest=manifest, layout=os.path.abspath(ref.layout), tag=ref.tag)
    os.rename(tmp, os.path.join(bundle, SNAPSHOT))
    write_json(os.path.join(bundle, METADATA), meta)
