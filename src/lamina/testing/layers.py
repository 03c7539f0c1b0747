"""Build layer tars in memory, byte by byte, for tests.

:class:`TarBuilder` writes every header block itself (it does not use
:mod:`tarfile` except to serialise a caller's own :class:`tarfile.TarInfo` in
:meth:`TarBuilder.add_raw`), so it can produce what ``tarfile`` refuses to:
binary (non-UTF-8) xattr values in ``SCHILY.xattr.*`` pax records, GNU long
names next to pax headers, names with ``..`` or a leading ``/``, hard links to
anything, headers whose size field lies, and verbatim hostile header blocks.

Output is deterministic: the same calls give the same bytes (fixed mtime,
empty user/group names, no padding to a 10 KiB record unless asked).

Example::

    t = TarBuilder()
    t.add_dir("etc")
    t.add_file("etc/hostname", b"box\\n", xattrs={"user.k": b"\\xff\\x00"})
    t.add_whiteout("etc/motd")
    layer = t.build()
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field

BLOCK = 512
RECORD = 20 * BLOCK
DEFAULT_MTIME = 1_600_000_000

REGTYPE = b"0"
LNKTYPE = b"1"
SYMTYPE = b"2"
CHRTYPE = b"3"
BLKTYPE = b"4"
DIRTYPE = b"5"
FIFOTYPE = b"6"
XHDTYPE = b"x"
XGLTYPE = b"g"
GNU_LONGNAME = b"L"
GNU_LONGLINK = b"K"

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"

FORMATS = ("pax", "gnu", "ustar")

NameT = str | bytes
PaxValue = str | bytes | int


def _b(s: NameT) -> bytes:
    return s if isinstance(s, bytes) else s.encode("utf-8", "surrogateescape")


def pax_record(key: NameT, value: PaxValue) -> bytes:
    """One ``"%d key=value\\n"`` pax record; *value* may be arbitrary bytes."""
    k = _b(key)
    v = str(value).encode() if isinstance(value, int) else _b(value)
    rest = b" " + k + b"=" + v + b"\n"
    n = len(rest) + len(str(len(rest)))
    if len(str(n)) + len(rest) != n:  # adding the length's digits added a digit
        n = len(rest) + len(str(n))
    return str(n).encode() + rest


def pax_records(records: Mapping[str, PaxValue] | list[tuple[NameT, PaxValue]]) -> bytes:
    items = list(records.items()) if isinstance(records, Mapping) else list(records)
    return b"".join(pax_record(k, v) for k, v in items)


def _octal(value: int, width: int) -> bytes | None:
    """``width``-byte NUL-terminated octal field, or None when it does not fit."""
    if value < 0 or value >= 8 ** (width - 1):
        return None
    return b"%0*o" % (width - 1, value) + b"\0"


def _base256(value: int, width: int) -> bytes:
    if value < 0:
        value += 1 << (8 * width)
        return bytes([0xFF]) + value.to_bytes(width, "big")[1:]
    return bytes([0x80]) + value.to_bytes(width - 1, "big")


def header_block(*, name: NameT, typeflag: bytes = REGTYPE, mode: int = 0o644, uid: int = 0,
                 gid: int = 0, size: int = 0, mtime: int = DEFAULT_MTIME,
                 linkname: NameT = b"", uname: NameT = b"", gname: NameT = b"",
                 devmajor: int = 0, devminor: int = 0, prefix: NameT = b"",
                 gnu: bool = False, checksum: int | None = None) -> bytes:
    """One raw 512-byte header block with fields written exactly as given.

    Fields are truncated to their width; numbers that do not fit in octal use
    GNU base-256.  *checksum* overrides the computed checksum (to corrupt it).
    """
    def num(v: int, width: int) -> bytes:
        return _octal(v, width) or _base256(v, width)

    def txt(v: NameT, width: int) -> bytes:
        return _b(v)[:width].ljust(width, b"\0")

    magic = b"ustar  \0" if gnu else b"ustar\x0000"
    blk = b"".join([
        txt(name, 100), num(mode, 8), num(uid, 8), num(gid, 8), num(size, 12),
        num(mtime, 12), b" " * 8, typeflag[:1].ljust(1, b"\0"), txt(linkname, 100), magic,
        txt(uname, 32), txt(gname, 32), num(devmajor, 8), num(devminor, 8),
        txt(b"" if gnu else prefix, 155), b"\0" * 12,
    ])
    assert len(blk) == BLOCK, len(blk)
    chk = sum(blk) if checksum is None else checksum
    return blk[:148] + b"%06o\0 " % chk + blk[156:]


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


@dataclass
class RawEntry:
    """One member written as given, without any path cleaning.

    *size* overrides the header's size field (the data written is still
    *data*, padded), to build archives whose header lies about its size.
    *pax* records are added (in order) to the member's pax header.
    """

    name: NameT
    typeflag: bytes = REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME
    linkname: NameT = b""
    uname: NameT = b""
    gname: NameT = b""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] | None = None
    pax: dict[str, PaxValue] = field(default_factory=dict)
    size: int | None = None


class TarBuilder:
    """Accumulates layer members and returns the uncompressed tar from :meth:`build`.

    *format*:

    - ``"pax"`` (default): POSIX ustar headers plus a per-member pax ``x``
      header when needed (names or link targets over 100 bytes or not ASCII,
      ids or sizes too large for octal, xattrs, explicit pax records);
    - ``"gnu"``: GNU headers, ``././@LongLink`` ``L``/``K`` members for long
      names, base-256 numbers; xattrs still need a pax ``x`` header (as GNU
      tar itself does), which every reader accepts in a GNU archive;
    - ``"ustar"``: long names split into the 155-byte prefix field;
      ``ValueError`` when a name cannot be represented (no pax, no GNU).
    """

    def __init__(self, format: str = "pax", *, mtime: int = DEFAULT_MTIME,
                 pad_record: bool = False) -> None:
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, not {format!r}")
        self.format = format
        self.mtime = mtime
        self.pad_record = pad_record
        self._chunks: list[bytes] = []
        self.names: list[str] = []

    # -- typed members ---------------------------------------------------------
    def add_dir(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0,
                mtime: int | None = None, xattrs: dict[str, bytes] | None = None, *,
                trailing_slash: bool = True) -> TarBuilder:
        name = path.rstrip("/") + "/" if trailing_slash and path not in ("", "/") else path
        return self._add(RawEntry(name, DIRTYPE, mode=mode, uid=uid, gid=gid,
                                  mtime=self._mt(mtime), xattrs=xattrs))

    def add_file(self, path: str, data: bytes = b"", mode: int = 0o644, uid: int = 0,
                 gid: int = 0, mtime: int | None = None,
                 xattrs: dict[str, bytes] | None = None) -> TarBuilder:
        return self._add(RawEntry(path, REGTYPE, data, mode=mode, uid=uid, gid=gid,
                                  mtime=self._mt(mtime), xattrs=xattrs))

    def add_symlink(self, path: str, target: str, mode: int = 0o777, uid: int = 0,
                    gid: int = 0, mtime: int | None = None,
                    xattrs: dict[str, bytes] | None = None) -> TarBuilder:
        return self._add(RawEntry(path, SYMTYPE, linkname=target, mode=mode, uid=uid,
                                  gid=gid, mtime=self._mt(mtime), xattrs=xattrs))

    def add_hardlink(self, path: str, target: str, mode: int = 0o644, uid: int = 0,
                     gid: int = 0, mtime: int | None = None,
                     xattrs: dict[str, bytes] | None = None) -> TarBuilder:
        return self._add(RawEntry(path, LNKTYPE, linkname=target, mode=mode, uid=uid,
                                  gid=gid, mtime=self._mt(mtime), xattrs=xattrs))

    def add_char(self, path: str, major: int, minor: int, mode: int = 0o666, uid: int = 0,
                 gid: int = 0, mtime: int | None = None,
                 xattrs: dict[str, bytes] | None = None) -> TarBuilder:
        return self._add(RawEntry(path, CHRTYPE, mode=mode, uid=uid, gid=gid,
                                  mtime=self._mt(mtime), devmajor=major, devminor=minor,
                                  xattrs=xattrs))

    def add_block(self, path: str, major: int, minor: int, mode: int = 0o660, uid: int = 0,
                  gid: int = 0, mtime: int | None = None,
                  xattrs: dict[str, bytes] | None = None) -> TarBuilder:
        return self._add(RawEntry(path, BLKTYPE, mode=mode, uid=uid, gid=gid,
                                  mtime=self._mt(mtime), devmajor=major, devminor=minor,
                                  xattrs=xattrs))

    def add_fifo(self, path: str, mode: int = 0o644, uid: int = 0, gid: int = 0,
                 mtime: int | None = None,
                 xattrs: dict[str, bytes] | None = None) -> TarBuilder:
        return self._add(RawEntry(path, FIFOTYPE, mode=mode, uid=uid, gid=gid,
                                  mtime=self._mt(mtime), xattrs=xattrs))

    def add_whiteout(self, path: str, mode: int = 0o644) -> TarBuilder:
        """``dir/.wh.name``: delete *path* (and everything below it) from lower layers."""
        d, base = posixpath.split(path.rstrip("/"))
        if not base:
            raise ValueError(f"cannot white out {path!r}")
        return self.add_file(posixpath.join(d, WHITEOUT_PREFIX + base), b"", mode=mode)

    def add_opaque(self, dir: str, mode: int = 0o644) -> TarBuilder:
        """``dir/.wh..wh..opq``: hide every lower-layer entry below *dir*."""
        d = dir.strip("/")
        return self.add_file(posixpath.join(d, OPAQUE_MARKER) if d not in ("", ".")
                             else OPAQUE_MARKER, b"", mode=mode)

    def add_pax_global(self, records: Mapping[str, PaxValue] | list[tuple[NameT, PaxValue]],
                       name: str = "pax_global_header") -> TarBuilder:
        """A pax global extended header (typeflag ``g``), like ``git archive`` writes."""
        payload = pax_records(records)
        self._chunks.append(header_block(name=name, typeflag=XGLTYPE, size=len(payload),
                                         mode=0o666, mtime=0))
        self._chunks.append(_pad(payload))
        return self

    # -- anything ---------------------------------------------------------------
    def add_raw(self, entry: RawEntry | tarfile.TarInfo | bytes, data: bytes = b"") -> TarBuilder:
        """Add a member without any checking.

        - :class:`RawEntry`: encoded like the typed members (pax/GNU long names
          as the format needs) but with name, link target, size field and pax
          records exactly as given;
        - :class:`tarfile.TarInfo`: serialised by :mod:`tarfile` in this
          builder's format, followed by *data* (padded);
        - ``bytes``: appended verbatim (header blocks, data, garbage...; no
          padding is added, so the caller controls block alignment).
        """
        if isinstance(entry, bytes):
            self._chunks.append(entry)
        elif isinstance(entry, tarfile.TarInfo):
            fmt = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT,
                   "ustar": tarfile.USTAR_FORMAT}[self.format]
            self._chunks.append(entry.tobuf(fmt, "utf-8", "surrogateescape"))  # type: ignore[arg-type]
            if data:
                self._chunks.append(_pad(data))
            self.names.append(entry.name)
        else:
            self._add(entry)
        return self

    def build(self) -> bytes:
        """The archive: members, two zero blocks, padded to 10 KiB if asked."""
        out = b"".join(self._chunks) + b"\0" * (2 * BLOCK)
        if self.pad_record:
            out += b"\0" * (-len(out) % RECORD)
        return out

    def fileobj(self) -> io.BytesIO:
        return io.BytesIO(self.build())

    # -- encoding -------------------------------------------------------------
    def _mt(self, mtime: int | None) -> int:
        return self.mtime if mtime is None else mtime

    def _add(self, e: RawEntry) -> TarBuilder:
        name, link = _b(e.name), _b(e.linkname)
        size = len(e.data) if e.size is None else e.size
        pax: dict[bytes, bytes] = {}
        chunks: list[bytes] = []
        prefix = b""
        gnu = self.format == "gnu"

        def fits(s: bytes, width: int = 100) -> bool:
            return len(s) <= width and (gnu or s.isascii())

        if not fits(name):
            if self.format == "pax":
                pax[b"path"] = name
                name = _ascii_stub(name)
            elif gnu:
                chunks += self._longlink(GNU_LONGNAME, name)
                name = name[:100]
            else:
                prefix, name = _ustar_split(name)
        if not fits(link):
            if self.format == "pax":
                pax[b"linkpath"] = link
                link = _ascii_stub(link)
            elif gnu:
                chunks += self._longlink(GNU_LONGLINK, link)
                link = link[:100]
            else:
                raise ValueError(f"link target too long for ustar: {link!r}")
        numbers = {"uid": (e.uid, 8), "gid": (e.gid, 8), "size": (size, 12),
                   "mtime": (e.mtime, 12)}
        for key, (value, width) in numbers.items():
            if _octal(value, width) is None:
                if self.format == "pax":
                    pax[key.encode()] = str(value).encode()
                elif self.format == "ustar":
                    raise ValueError(f"{key} {value} does not fit a ustar header")
        for k, v in (e.xattrs or {}).items():
            pax[b"SCHILY.xattr." + _b(k)] = v
        for k, pv in e.pax.items():
            pax[_b(k)] = str(pv).encode() if isinstance(pv, int) else _b(pv)
        if pax:
            payload = pax_records(list(pax.items()))
            hdr = header_block(name=b"././@PaxHeader", typeflag=XHDTYPE, size=len(payload),
                               mtime=e.mtime if _octal(e.mtime, 12) else 0)
            chunks = [hdr, _pad(payload), *chunks]

        def clamp(v: int, width: int) -> int:
            # pax carries the real value; the ustar field gets 0 rather than base-256
            return v if self.format != "pax" or _octal(v, width) is not None else 0

        chunks.append(header_block(
            name=name, typeflag=e.typeflag, mode=e.mode, uid=clamp(e.uid, 8),
            gid=clamp(e.gid, 8), size=clamp(size, 12), mtime=clamp(e.mtime, 12),
            linkname=link, uname=e.uname, gname=e.gname, devmajor=e.devmajor,
            devminor=e.devminor, prefix=prefix, gnu=gnu))
        if e.data:
            chunks.append(_pad(e.data))
        self._chunks += chunks
        self.names.append(_b(e.name).decode("utf-8", "surrogateescape"))
        return self

    @staticmethod
    def _longlink(kind: bytes, value: bytes) -> list[bytes]:
        payload = value + b"\0"
        return [header_block(name=b"././@LongLink", typeflag=kind, size=len(payload),
                             mtime=0, gnu=True), _pad(payload)]


def _ascii_stub(name: bytes) -> bytes:
    """What goes in the 100-byte ustar field when pax carries the real name."""
    return bytes(c if 0x20 <= c < 0x7F else 0x5F for c in name)[:100]


def _ustar_split(name: bytes) -> tuple[bytes, bytes]:
    if not name.isascii():
        raise ValueError(f"non-ASCII name needs pax or GNU format: {name!r}")
    for i in range(len(name) - 1, 0, -1):
        if name[i:i + 1] == b"/" and i <= 155 and 0 < len(name) - i - 1 <= 100:
            return name[:i], name[i + 1:]
    raise ValueError(f"name cannot be split into ustar prefix/name: {name!r}")
