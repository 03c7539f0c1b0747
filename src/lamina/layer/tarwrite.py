"""Deterministic tar writing (POSIX pax) for generated layers.

Headers are ustar with a pax extended header only where ustar cannot say it
(long or non-ASCII names, large ids/sizes, sub-second mtimes, xattrs), the way
Go's archive/tar writes them, so layers are byte-stable: the same tree gives
the same diff_id.  uname/gname are left empty (ids are what count in images).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

BLOCK = 512
_TYPES = {"file": b"0", "hardlink": b"1", "symlink": b"2", "char": b"3", "block": b"4",
          "dir": b"5", "fifo": b"6"}


@dataclass
class Header:
    name: str                      # relative path, no leading "/"; dirs get a trailing "/"
    kind: str                      # file, hardlink, symlink, char, block, dir, fifo
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _octal(n: int, width: int) -> bytes | None:
    """*n* as a NUL-terminated octal field of *width* bytes, or None if it does not fit."""
    s = b"%0*o" % (width - 1, n)
    return s + b"\0" if len(s) == width - 1 and n >= 0 else None


def _pax_record(key: str, value: bytes) -> bytes:
    body = key.encode("utf-8", "surrogateescape") + b"=" + value + b"\n"
    n = len(body) + 2
    while len(str(n)) + 1 + len(body) != n:
        n = len(str(n)) + 1 + len(body)
    return str(n).encode() + b" " + body


def _ustar_name(name: bytes) -> tuple[bytes, bytes] | None:
    """Split into (prefix, name) for ustar, or None if it needs a pax path."""
    if len(name) <= 100:
        return b"", name
    if len(name) > 256:
        return None
    i = name.find(b"/", max(0, len(name) - 101))
    while i != -1:
        if i <= 155 and len(name) - i - 1 <= 100 and i > 0:
            return name[:i], name[i + 1:]
        i = name.find(b"/", i + 1)
    return None


def _block(name: bytes, prefix: bytes, mode: int, uid: bytes, gid: bytes, size: bytes,
           mtime: bytes, typ: bytes, link: bytes, major: int, minor: int) -> bytes:
    b = bytearray(BLOCK)
    b[0:len(name)] = name
    b[100:108] = _octal(mode, 8) or b"0000000\0"
    b[108:116] = uid
    b[116:124] = gid
    b[124:136] = size
    b[136:148] = mtime
    b[148:156] = b" " * 8
    b[156:157] = typ
    b[157:157 + len(link)] = link
    b[257:265] = b"ustar\x0000"
    b[329:337] = _octal(major, 8) or b"0000000\0"
    b[337:345] = _octal(minor, 8) or b"0000000\0"
    b[345:345 + len(prefix)] = prefix
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def header_bytes(h: Header) -> bytes:
    """The header block(s) for *h*: an optional pax 'x' header, then the ustar block."""
    name_b = h.name.encode("utf-8", "surrogateescape")
    link_b = h.linkname.encode("utf-8", "surrogateescape")
    pax: list[bytes] = []
    split = _ustar_name(name_b) if name_b.isascii() else None
    if split is None:
        pax.append(_pax_record("path", name_b))
        split = (b"", name_b[-100:].lstrip(b"/")[:100])
    if len(link_b) > 100 or not link_b.isascii():
        pax.append(_pax_record("linkpath", link_b))
        link_b = link_b[:100]
    uid = _octal(h.uid, 8)
    if uid is None:
        pax.append(_pax_record("uid", str(h.uid).encode()))
    gid = _octal(h.gid, 8)
    if gid is None:
        pax.append(_pax_record("gid", str(h.gid).encode()))
    size = _octal(h.size, 12)
    if size is None:
        pax.append(_pax_record("size", str(h.size).encode()))
    sec, frac = divmod(abs(h.mtime_ns), 1_000_000_000)
    mtime = _octal(sec, 12) if h.mtime_ns >= 0 else None
    if frac or mtime is None:
        # pax times are signed decimals: -1.5 is 1.5 s before the epoch
        txt = ("-" if h.mtime_ns < 0 else "") + str(sec) + (
            ("." + f"{frac:09d}".rstrip("0")) if frac else "")
        pax.append(_pax_record("mtime", txt.encode()))
    for k in sorted(h.xattrs):
        pax.append(_pax_record("SCHILY.xattr." + k, h.xattrs[k]))
    out = b""
    if pax:
        data = b"".join(pax)
        pname = (b"PaxHeaders.0/" + split[1])[:100]
        out = _block(pname, b"", 0o644, b"0000000\0", b"0000000\0",
                     _octal(len(data), 12) or b"", b"00000000000\0", b"x", b"", 0, 0)
        out += data + bytes(-len(data) % BLOCK)
    out += _block(split[1], split[0], h.mode & 0o7777, uid or b"0000000\0", gid or b"0000000\0",
                  size or b"00000000000\0", mtime or b"00000000000\0", _TYPES[h.kind], link_b,
                  h.devmajor, h.devminor)
    return out


def padding(size: int) -> bytes:
    return bytes(-size % BLOCK)


END_OF_ARCHIVE = bytes(2 * BLOCK)


def write_tar(members: Iterable[tuple[Header, bytes]]) -> bytes:
    """A whole archive in memory (tests and small layers)."""
    out = bytearray()
    for h, data in members:
        if h.kind == "file":
            h.size = len(data)
        out += header_bytes(h)
        if h.kind == "file":
            out += data + padding(len(data))
    out += END_OF_ARCHIVE
    return bytes(out)
