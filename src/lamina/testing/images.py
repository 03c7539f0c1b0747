"""Write test images into an OCI image layout.

:func:`build_image` stores layers (compressing each as asked), an image config
whose ``rootfs.diff_ids`` are the sha256 of the *uncompressed* tars, a
manifest, and tags it.  :func:`build_index_image` does the same for several
platforms under one image index.  Everything is deterministic: gzip streams
carry no timestamp, the config's ``created`` is fixed.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import zstandard

from lamina.oci import mediatypes as mt
from lamina.oci.layout import OCILayout
from lamina.oci.model import Descriptor, Platform

CREATED = "2020-09-13T12:26:40Z"

#: compression name -> (codec, layer media type)
COMPRESSIONS: dict[str, tuple[str, str]] = {
    "none": ("none", mt.LAYER_TAR),
    "tar": ("none", mt.LAYER_TAR),
    "gzip": ("gzip", mt.LAYER_GZIP),
    "zstd": ("zstd", mt.LAYER_ZSTD),
    "nd-none": ("none", mt.LAYER_ND_TAR),
    "nd-tar": ("none", mt.LAYER_ND_TAR),
    "nd-gzip": ("gzip", mt.LAYER_ND_GZIP),
    "nd-zstd": ("zstd", mt.LAYER_ND_ZSTD),
    "docker-gzip": ("gzip", mt.DOCKER_LAYER_GZIP),
    "docker-foreign": ("gzip", mt.DOCKER_LAYER_FOREIGN),
}

PlatformSpec = str | tuple[str, str] | tuple[str, str, str | None] | Platform


def compress(data: bytes, codec: str) -> bytes:
    """*data* compressed with ``none``, ``gzip`` (mtime 0) or ``zstd`` (any name of
    :data:`COMPRESSIONS` is accepted too)."""
    codec = COMPRESSIONS[codec][0] if codec in COMPRESSIONS else codec
    if codec == "none":
        return data
    if codec == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if codec == "zstd":
        return bytes(zstandard.ZstdCompressor(level=3).compress(data))
    raise ValueError(f"unknown compression {codec!r}")


def diff_id(tar: bytes) -> str:
    return "sha256:" + hashlib.sha256(tar).hexdigest()


def to_platform(spec: PlatformSpec | None) -> Platform:
    if spec is None:
        return Platform.host()
    if isinstance(spec, Platform):
        return spec
    if isinstance(spec, str):
        return Platform.parse(spec)
    if len(spec) == 2:
        return Platform(spec[0], spec[1])
    return Platform(spec[0], spec[1], spec[2])


def put_image(lay: OCILayout, layers: Sequence[bytes], *,
              compression: str | Sequence[str] = "gzip",
              config: Mapping[str, Any] | None = None,
              platform: PlatformSpec | None = None,
              annotations: Mapping[str, str] | None = None,
              layer_annotations: Sequence[Mapping[str, str] | None] | None = None,
              extra_config: Mapping[str, Any] | None = None) -> Descriptor:
    """Store the blobs of one image (layers, config, manifest); return the
    manifest's descriptor (untagged, without platform)."""
    comps = [compression] * len(layers) if isinstance(compression, str) else list(compression)
    if len(comps) != len(layers):
        raise ValueError(f"{len(layers)} layers but {len(comps)} compressions")
    plat = to_platform(platform)
    layer_descs: list[Descriptor] = []
    for i, (tar, comp) in enumerate(zip(layers, comps, strict=True)):
        if comp not in COMPRESSIONS:
            raise ValueError(f"unknown compression {comp!r}; one of {sorted(COMPRESSIONS)}")
        codec, media_type = COMPRESSIONS[comp]
        ann = (layer_annotations[i] if layer_annotations else None) or {}
        layer_descs.append(lay.put_blob(compress(tar, codec), media_type, dict(ann)))
    cfg: dict[str, Any] = {
        "created": CREATED,
        "architecture": plat.architecture,
        "os": plat.os,
        "config": dict(config or {}),
        "rootfs": {"type": "layers", "diff_ids": [diff_id(t) for t in layers]},
        "history": [{"created": CREATED, "created_by": f"lamina.testing layer {i}"}
                    for i in range(len(layers))],
    }
    if plat.variant:
        cfg["variant"] = plat.variant
    cfg.update(extra_config or {})
    cfg_desc = lay.put_json(cfg, mt.CONFIG, validate=not extra_config)  # hostile tests
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mt.MANIFEST,
        "config": cfg_desc.to_json(),
        "layers": [d.to_json() for d in layer_descs],
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    return lay.put_json(manifest, mt.MANIFEST)


def build_image(layout_dir: str, tag: str, layers: Sequence[bytes], *,
                compression: str | Sequence[str] = "gzip",
                config: Mapping[str, Any] | None = None,
                platform: PlatformSpec | None = None,
                annotations: Mapping[str, str] | None = None,
                layer_annotations: Sequence[Mapping[str, str] | None] | None = None,
                extra_config: Mapping[str, Any] | None = None) -> Descriptor:
    """Create (or add to) the layout at *layout_dir* an image of *layers*
    (uncompressed tars, bottom first), tagged *tag*.

    *compression*: one name for every layer or one per layer, from
    :data:`COMPRESSIONS` (``gzip``, ``zstd``, ``none``, ``nd-gzip``, ...).
    *config*: the image config's ``config`` object (``Env``, ``Cmd``,
    ``Entrypoint``, ``WorkingDir``, ``User``, ``Labels``...).  *extra_config*
    is merged into the top level of the image config (to override
    ``rootfs``, ``os``... in hostile tests).  *platform* defaults to the host's
    linux platform.  Returns the tagged manifest descriptor.
    """
    lay = OCILayout.init(layout_dir)
    desc = put_image(lay, layers, compression=compression, config=config, platform=platform,
                     annotations=annotations, layer_annotations=layer_annotations,
                     extra_config=extra_config)
    lay.set_ref(tag, desc)
    return Descriptor(desc.media_type, desc.digest, desc.size,
                      {**desc.annotations, mt.REF_NAME: tag})


def build_index_image(layout_dir: str, tag: str,
                      images: Sequence[tuple[PlatformSpec | None, Sequence[bytes]]], *,
                      compression: str | Sequence[str] = "gzip",
                      config: Mapping[str, Any] | None = None,
                      annotations: Mapping[str, str] | None = None) -> Descriptor:
    """An image index tagged *tag* with one manifest per ``(platform, layers)``.

    A platform of ``None`` writes a manifest descriptor *without* a platform
    field in the index (the config then says the host platform).  Each image's
    config gets a ``Labels`` entry ``lamina.test.platform`` naming its platform
    so tests can see which one was picked.  Returns the tagged index descriptor.
    """
    lay = OCILayout.init(layout_dir)
    entries: list[dict[str, Any]] = []
    for spec, layers in images:
        plat = to_platform(spec)
        cfg = dict(config or {})
        labels = dict(cfg.get("Labels") or {})
        labels["lamina.test.platform"] = str(plat) if spec is not None else "none"
        cfg["Labels"] = labels
        desc = put_image(lay, layers, compression=compression, config=cfg, platform=plat)
        d = desc.to_json()
        if spec is not None:
            p = {"architecture": plat.architecture, "os": plat.os}
            if plat.variant:
                p["variant"] = plat.variant
            d["platform"] = p
        entries.append(d)
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": mt.INDEX, "manifests": entries}
    if annotations:
        index["annotations"] = dict(annotations)
    idx_desc = lay.put_json(index, mt.INDEX)
    lay.set_ref(tag, idx_desc)
    return Descriptor(idx_desc.media_type, idx_desc.digest, idx_desc.size,
                      {mt.REF_NAME: tag})
