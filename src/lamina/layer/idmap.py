"""User/group id mapping (``--uid-map CTR:HOST:SIZE``) and the rootless xattr."""

from __future__ import annotations

from dataclasses import dataclass

from lamina.errors import UnsafeLayerError, UsageError

ROOTLESS_XATTR = "user.rootlesscontainers"
NOOP_ID = 0xFFFFFFFF  # rootlesscontainers' "leave this id alone" (umoci writes it)


@dataclass(frozen=True)
class IdMapping:
    container: int
    host: int
    size: int

    @classmethod
    def parse(cls, text: str) -> IdMapping:
        parts = text.split(":")
        try:
            c, h, n = (int(p) for p in parts)
        except ValueError:
            raise UsageError(f"bad id mapping {text!r}", hint="use CONTAINER:HOST:SIZE") from None
        if c < 0 or h < 0 or n <= 0 or c + n > 1 << 32 or h + n > 1 << 32:
            raise UsageError(f"id mapping {text!r} is out of range")
        return cls(c, h, n)

    def __str__(self) -> str:
        return f"{self.container}:{self.host}:{self.size}"


def map_id(container_id: int, mappings: tuple[IdMapping, ...], what: str) -> int:
    """Container id -> host id; identity when there are no mappings."""
    if not mappings:
        return container_id
    for m in mappings:
        if m.container <= container_id < m.container + m.size:
            return m.host + container_id - m.container
    raise UnsafeLayerError(f"{what} {container_id} is not covered by the id mappings",
                           hint="extend --uid-map/--gid-map to cover every owner in the image")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_rootless(uid: int, gid: int) -> bytes:
    """Protobuf ``rootlesscontainers.Resource{uid=1, gid=2}`` (proto3: zeros omitted)."""
    out = b""
    if uid:
        out += b"\x08" + _varint(uid)
    if gid:
        out += b"\x10" + _varint(gid)
    return out


def decode_rootless(data: bytes) -> tuple[int, int]:
    """Inverse of :func:`encode_rootless`; unknown fields are skipped."""
    uid = gid = 0
    i = 0
    while i < len(data):
        key = data[i]
        i += 1
        val = shift = 0
        while True:
            if i >= len(data):
                raise ValueError("truncated varint in user.rootlesscontainers")
            b = data[i]
            i += 1
            val |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        if val == NOOP_ID:
            val = 0  # "unchanged": the file's owner, i.e. the container's root
        if key >> 3 == 1:
            uid = val
        elif key >> 3 == 2:
            gid = val
    return uid, gid
