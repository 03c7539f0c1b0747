"""Repack a bundle: add what changed in its rootfs as a new layer of a new image.

Reads ``BUNDLE/lamina.json`` and ``BUNDLE/lamina.snapshot`` written by
unpack, scans the rootfs (see :mod:`lamina.layer.diff`), writes the new layer,
config (diff_ids + history) and manifest as blobs, then points the new tag at
the manifest with one atomic index update.  An empty change adds no layer:
the new tag points at the bundle's image.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from lamina.bundle import METADATA, SNAPSHOT, write_json
from lamina.drivers.manage import driver_delta, refresh_driver_bundle
from lamina.errors import BundleError, ImageFormatError
from lamina.hooks import HookOptions, HookRunner, parse_paths
from lamina.layer.diff import ScanResult, scan
from lamina.layer.generate import write_layer
from lamina.layer.idmap import IdMapping
from lamina.layer.snapshot import read_snapshot, write_rows
from lamina.oci import mediatypes as mt
from lamina.oci.layout import ImageRef, OCILayout
from lamina.oci.model import Descriptor


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
    o = meta.get("options", {})
    # a driver that knows what changed (overlay: its upper dir) saves the full walk
    delta = driver_delta(bundle, meta)
    snap: list[tuple[object, ...]] = []
    if delta is None:
        with open(os.path.join(bundle, SNAPSHOT), "rb") as f:
            snap = read_snapshot(f)
    rootfs = os.path.join(bundle, "rootfs") if delta is None else delta[1]
    hooks = HookRunner.load(opts.hooks) if opts.hooks is not None else HookRunner([])
    hook_doc = _hook_doc(bundle, meta, manifest)
    if delta is not None:
        res = ScanResult(delta[0], [], [])
    else:
        res = scan(rootfs, snap, rootless=bool(o.get("rootless")),
                   uid_map=tuple(IdMapping.parse(m) for m in o.get("uid_map", [])),
                   gid_map=tuple(IdMapping.parse(m) for m in o.get("gid_map", [])),
                   only=_hook_delta_list(hooks, hook_doc))
    warnings = [f"skipping socket /{p}: sockets cannot be stored in a layer"
                for p in res.skipped_sockets]
    for w in warnings:
        if warn is not None:
            warn(w)
    result = RepackResult(mdesc.digest, None, None, warnings=warnings)
    if res.changes:
        gen = write_layer(layout, rootfs, res.changes, compression=opts.compression,
                          source_date_epoch=opts.source_date_epoch)
        result.layer, result.diff_id, result.size = gen.desc.digest, gen.diff_id, gen.desc.size
        result.added = sum(1 for c in res.changes if c.kind not in ("whiteout", "opaque"))
        result.whiteouts = len(res.changes) - result.added
        config = dict(config)
        rootfs_cfg = dict(config.get("rootfs") or {"type": "layers"})
        rootfs_cfg["diff_ids"] = [*rootfs_cfg.get("diff_ids", []), gen.diff_id]
        config["rootfs"] = rootfs_cfg
        created = timestamp(opts.source_date_epoch)
        config["created"] = created
        if opts.history:
            h: dict[str, Any] = {"created": created,
                                 "created_by": opts.created_by or "lamina repack"}
            if opts.author:
                h["author"] = opts.author
            if opts.comment:
                h["comment"] = opts.comment
            config["history"] = [*config.get("history", []), h]
        new_cdesc = layout.put_json(config, mt.CONFIG)
        manifest = dict(manifest)
        manifest["config"] = new_cdesc.to_json()
        manifest["layers"] = [*manifest.get("layers", []), gen.desc.to_json()]
        manifest.setdefault("mediaType", mt.MANIFEST)
        mdesc = layout.put_json(manifest, mt.MANIFEST)
        result.manifest = mdesc.digest
        meta["config"] = new_cdesc.digest
        meta["diff_ids"] = rootfs_cfg["diff_ids"]
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
        if delta is not None:
            meta = refresh_driver_bundle(bundle, meta)
        _refresh(bundle, meta, mdesc.digest, opts.image, res.rows, hashes)
    result.seconds = round(time.monotonic() - t0, 3)
    return result


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
