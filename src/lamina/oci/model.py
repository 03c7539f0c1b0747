"""Typed views of the OCI image-spec JSON documents lamina reads and writes.

Only the fields lamina acts on are modelled; every document keeps its raw JSON
so nothing unknown is lost when it is rewritten.
"""

from __future__ import annotations

import platform as _platform
import re
from dataclasses import dataclass, field
from typing import Any

from lamina.errors import ImageFormatError

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_ANY_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")


def check_digest(digest: object, what: str) -> str:
    """Return *digest* if it is a sha256 digest lamina can verify, else raise."""
    if not isinstance(digest, str) or not _ANY_DIGEST_RE.match(digest):
        raise ImageFormatError(f"{what}: malformed digest {digest!r}")
    if not _DIGEST_RE.match(digest):
        raise ImageFormatError(
            f"{what}: unsupported digest {digest!r}",
            hint="lamina verifies sha256 digests only (64 lowercase hex digits)")
    return digest


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ImageFormatError(f"bad platform {text!r}", hint="use OS/ARCH[/VARIANT]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def host(cls) -> Platform:
        machine = _platform.machine().lower()
        arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
                "armv7l": "arm", "armv6l": "arm", "i386": "386", "i686": "386",
                "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}.get(machine, machine)
        variant = {"armv7l": "v7", "armv6l": "v6"}.get(machine)
        return cls("linux", arch, variant)

    def matches(self, other: Platform) -> bool:
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        # arm64 images usually omit the variant ("v8"); compare only when both say one
        return self.variant is None or other.variant is None or self.variant == other.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_json(cls, obj: object, what: str = "descriptor") -> Descriptor:
        if not isinstance(obj, dict):
            raise ImageFormatError(f"{what}: expected an object")
        media_type = obj.get("mediaType")
        size = obj.get("size")
        if not isinstance(media_type, str):
            raise ImageFormatError(f"{what}: missing mediaType")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageFormatError(f"{what}: bad size {size!r}")
        digest = check_digest(obj.get("digest"), what)
        ann = obj.get("annotations") or {}
        if not isinstance(ann, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
            raise ImageFormatError(f"{what}: annotations must map strings to strings")
        plat = None
        p = obj.get("platform")
        if isinstance(p, dict) and isinstance(p.get("os"), str) and isinstance(
                p.get("architecture"), str):
            v = p.get("variant")
            plat = Platform(p["os"], p["architecture"], v if isinstance(v, str) else None)
        return cls(media_type, digest, size, dict(ann), plat, dict(obj))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.raw)
        out.update({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        else:
            out.pop("annotations", None)
        if self.platform is not None:
            p: dict[str, str] = {"architecture": self.platform.architecture,
                                 "os": self.platform.os}
            if self.platform.variant:
                p["variant"] = self.platform.variant
            out["platform"] = p
        return out

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]


@dataclass(frozen=True)
class Manifest:
    digest: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str]
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, digest: str, obj: object) -> Manifest:
        if not isinstance(obj, dict):
            raise ImageFormatError(f"manifest {digest}: expected a JSON object")
        if obj.get("schemaVersion") != 2:
            raise ImageFormatError(f"manifest {digest}: schemaVersion must be 2")
        config = Descriptor.from_json(obj.get("config"), f"manifest {digest} config")
        layers_raw = obj.get("layers")
        if not isinstance(layers_raw, list):
            raise ImageFormatError(f"manifest {digest}: 'layers' must be a list")
        layers = tuple(Descriptor.from_json(x, f"manifest {digest} layer {i}")
                       for i, x in enumerate(layers_raw))
        ann = obj.get("annotations") or {}
        return cls(digest, config, layers, dict(ann) if isinstance(ann, dict) else {}, obj)


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config (``application/vnd.oci.image.config.v1+json``) we use."""

    digest: str
    os: str
    architecture: str
    diff_ids: tuple[str, ...]
    config: dict[str, Any]
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, digest: str, obj: object) -> ImageConfig:
        if not isinstance(obj, dict):
            raise ImageFormatError(f"config {digest}: expected a JSON object")
        rootfs = obj.get("rootfs")
        if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
            raise ImageFormatError(f"config {digest}: rootfs.type must be 'layers'")
        diff_ids = rootfs.get("diff_ids")
        if not isinstance(diff_ids, list):
            raise ImageFormatError(f"config {digest}: rootfs.diff_ids must be a list")
        ids = tuple(check_digest(d, f"config {digest} diff_id") for d in diff_ids)
        cfg = obj.get("config") or {}
        if not isinstance(cfg, dict):
            raise ImageFormatError(f"config {digest}: 'config' must be an object")
        return cls(digest, str(obj.get("os", "")), str(obj.get("architecture", "")), ids,
                   cfg, obj)
