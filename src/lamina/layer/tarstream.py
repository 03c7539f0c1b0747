"""A streaming tar reader that keeps every header's raw bytes.

Python's :mod:`tarfile` parses well but hides the raw header blocks, and later
parts of lamina (the object store's per-layer metadata, splitdirfdstream) must
rebuild a layer byte for byte.  This reader yields one :class:`TarEntry` per
member with its parsed fields *and* the exact bytes of its header blocks
(PAX/GNU long-name prefixes included), then lets the caller stream the data.

Supported: ustar, POSIX pax (per-entry 'x'; global 'g' is parsed and ignored,
like Go's archive/tar and so umoci/containerd), GNU long names ('L'/'K') and
base-256 numbers.  Rejected with :class:`UnsupportedError`: sparse files and
multi-volume archives.  Malformed input raises :class:`CorruptLayerError`.
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from lamina.errors import CorruptLayerError, UnsafeLayerError, UnsupportedError

BLOCK = 512
MAX_META = 1 << 20          # pax / long-name payloads larger than this are hostile
MAX_XATTR_TOTAL = 1 << 20

REG, AREG, LNK, SYM, CHR, BLK = b"0", b"\0", b"1", b"2", b"3", b"4"
DIR, FIFO, CONT = b"5", b"6", b"7"
PAX, GPAX, GNU_LONGNAME, GNU_LONGLINK = b"x", b"g", b"L", b"K"

TYPE_NAMES = {REG: "file", AREG: "file", CONT: "file", LNK: "hardlink", SYM: "symlink",
              CHR: "char", BLK: "block", DIR: "dir", FIFO: "fifo"}

ReadFn = Callable[[int], bytes]
# buf, pos -> (new pos, bytes wanted in the buffer for the member at new pos, or 0)
FastFn = Callable[[bytes, int], tuple[int, int]]
_READ = 1 << 20
_FAST_MAX = 4 << 20
_HDR = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s")
_ZERO = bytes(BLOCK)


@dataclass(slots=True)
class TarEntry:
    name: str                   # as in the archive (pax/GNU long names applied)
    kind: str                   # file, dir, symlink, hardlink, char, block, fifo
    mode: int
    uid: int
    gid: int
    size: int                   # data bytes following the header (0 unless file)
    mtime_ns: int
    linkname: str = ""
    uname: str = ""
    gname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    raw_header: bytes = b""     # every header block of this member, verbatim
    offset: int = 0             # offset of raw_header in the uncompressed tar


def _nts(b: bytes) -> bytes:
    i = b.find(b"\0")
    return b if i < 0 else b[:i]


def _num(b: bytes, what: str) -> int:
    if b and b[0] & 0x80:  # base-256 (GNU): 0x80 positive, 0xff negative
        v = int.from_bytes(b[1:], "big")
        if b[0] == 0xFF:
            v -= 1 << (8 * (len(b) - 1))
        return v
    try:
        return int(b.strip(b" \0") or b"0", 8)
    except ValueError:
        raise CorruptLayerError(f"bad octal number in tar {what} field: {b!r}") from None


def _decode(b: bytes) -> str:
    # names are bytes on Linux; surrogateescape keeps non-UTF-8 names round-trippable
    return b.decode("utf-8", "surrogateescape")


def _checksum_ok(block: bytes) -> bool:
    stored = _num(block[148:156], "checksum")
    # fast path: adler32's low half is 1 + the byte sum mod 65521, ~7x cheaper than sum()
    if stored == ((zlib.adler32(block[:148] + b"        " + block[156:]) & 0xFFFF) - 1) % 65521:
        return True
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    signed = sum((c - 256 if c > 127 else c) for c in block[:148]) + 256 + sum(
        (c - 256 if c > 127 else c) for c in block[156:])
    return stored == signed


def parse_pax(data: bytes) -> dict[str, bytes]:
    """Parse pax extended-header records ``"%d %s=%s\\n"`` (values stay bytes)."""
    out: dict[str, bytes] = {}
    pos = 0
    n = len(data)
    while pos < n:
        if data[pos] == 0:  # some writers pad with NULs
            break
        sp = data.find(b" ", pos, pos + 21)
        if sp < 0:
            raise CorruptLayerError("malformed pax record (no length)")
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise CorruptLayerError("malformed pax record length") from None
        end = pos + length
        if length < 5 or end > n or data[end - 1:end] != b"\n":
            raise CorruptLayerError("malformed pax record (bad length)")
        rec = data[sp + 1:end - 1]
        eq = rec.find(b"=")
        if eq <= 0:
            raise CorruptLayerError("malformed pax record (no '=')")
        key = rec[:eq].decode("utf-8", "surrogateescape")
        out[key] = rec[eq + 1:]
        pos = end
    return out


def _pax_time_ns(v: bytes) -> int:
    s = v.decode("ascii", "replace")
    neg = s.startswith("-")
    if neg:
        s = s[1:]
    sec, _, frac = s.partition(".")
    try:
        ns = int(sec or "0") * 1_000_000_000 + int((frac + "000000000")[:9] or "0")
    except ValueError:
        raise CorruptLayerError(f"bad pax time {v!r}") from None
    return -ns if neg else ns


def _pax_xattrs(pax: dict[str, bytes]) -> dict[str, bytes]:
    xattrs: dict[str, bytes] = {}
    total = 0
    for k, v in pax.items():
        if k.startswith("SCHILY.xattr."):
            xattrs[k[13:]] = v
        elif k.startswith("LIBARCHIVE.xattr."):
            try:
                name = base64.urlsafe_b64decode(k[17:] + "==").decode("utf-8")
                xattrs.setdefault(name, base64.b64decode(v))
            except (ValueError, UnicodeDecodeError):
                raise CorruptLayerError(f"bad LIBARCHIVE.xattr record {k!r}") from None
        else:
            continue
        total += len(k) + len(v)
    if total > MAX_XATTR_TOTAL:
        raise CorruptLayerError("tar member carries more than 1 MiB of xattrs")
    return xattrs


def _pax_int(v: bytes, key: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise CorruptLayerError(f"bad pax {key} value {v!r}") from None
    if n < 0:
        raise CorruptLayerError(f"negative pax {key} value")
    return n


class TarReader:
    """Iterate the members of an uncompressed tar stream read by *read*.

    After each yielded entry the caller may call :meth:`read_data` (repeatedly)
    to consume the member's content; whatever is left is skipped automatically.
    """

    def __init__(self, read: ReadFn) -> None:
        self._read = read
        self._buf = b""             # read-ahead; headers are parsed from here, not per read
        self._pos = 0
        self.offset = 0             # bytes consumed so far
        self._remaining = 0         # data bytes of the current member not yet read
        self._pad = 0               # padding after the current member's data
        self.end_offset = -1        # offset of the end-of-archive marker
        # consumer's fast path: handles members in place in the buffer, before they
        # are parsed here (see RootfsWriter); members it handles are never yielded
        self.fast: FastFn | None = None

    def _fill(self) -> bool:
        chunk = self._read(_READ)
        if not chunk:
            return False
        rest = len(self._buf) - self._pos
        self._buf = self._buf[self._pos:] + chunk if rest else chunk
        self._pos = 0
        return True

    def _exact(self, n: int, what: str) -> bytes:
        while len(self._buf) - self._pos < n:
            if not self._fill():
                raise CorruptLayerError(
                    f"truncated tar: unexpected end of stream in {what} at offset "
                    f"{self.offset + len(self._buf) - self._pos}",
                    hint="the layer blob is incomplete or not a tar archive")
        p = self._pos
        self._pos = p + n
        self.offset += n
        return self._buf[p:p + n]

    def read_data(self, n: int = _READ) -> bytes:
        """Up to *n* bytes of the current member's data (b"" at its end)."""
        if self._remaining <= 0:
            return b""
        if self._pos >= len(self._buf) and not self._fill():
            raise CorruptLayerError(
                f"truncated tar: stream ended inside a file's data at offset {self.offset}",
                hint="the layer blob is incomplete")
        p = self._pos
        k = min(n, self._remaining, len(self._buf) - p)
        data = self._buf if (p == 0 and k == len(self._buf)) else self._buf[p:p + k]
        self._pos = p + k
        self._remaining -= k
        self.offset += k
        return data

    def _skip_rest(self) -> None:
        while self._remaining > 0:
            self.read_data(_READ)
        if self._pad:
            self._exact(self._pad, "padding")
            self._pad = 0

    def drain(self) -> int:
        """Consume what follows the end-of-archive marker (normally zero blocks).

        Like GNU tar and Go's archive/tar, bytes after the marker are not members;
        they are still covered by the diff_id, so nothing unverified slips through.
        """
        n = len(self._buf) - self._pos
        self._buf, self._pos = b"", 0
        while True:
            data = self._read(_READ)
            if not data:
                self.offset += n
                return n
            n += len(data)

    def _run_fast(self, fast: FastFn) -> None:
        while True:
            pos, need = fast(self._buf, self._pos)
            self.offset += pos - self._pos
            self._pos = pos
            # a member cut by the end of the buffer: read on, unless it is big
            # (then streaming it through read_data is cheaper than buffering it)
            if not need or need > _FAST_MAX or not self._fill():
                return

    def __iter__(self) -> Iterator[TarEntry]:
        pax: dict[str, bytes] = {}
        longname: bytes | None = None
        longlink: bytes | None = None
        raw = bytearray()
        start = self.offset
        while True:
            self._skip_rest()
            if not raw:
                if self.fast is not None:
                    self._run_fast(self.fast)
                start = self.offset
            block = self._exact(BLOCK, "tar header")
            if block == _ZERO:
                if pax or longname is not None or longlink is not None:
                    raise CorruptLayerError("tar ends after an extended header with no member")
                self.end_offset = start
                return  # end of archive (the second zero block is drained by the caller)
            if not _checksum_ok(block):
                raise CorruptLayerError(f"tar header checksum mismatch at offset {start}",
                                        hint="the layer is corrupt or not a tar archive")
            typ = block[156:157]
            size = _num(block[124:136], "size")
            if size < 0:
                raise CorruptLayerError(f"negative size in tar header at offset {start}")
            pad = -size % BLOCK
            if typ in (PAX, GPAX, GNU_LONGNAME, GNU_LONGLINK):
                if size > MAX_META:
                    raise CorruptLayerError(
                        f"tar extended header of {size} bytes at offset {start} exceeds the "
                        f"{MAX_META}-byte limit", hint="the layer is hostile or corrupt")
                payload = self._exact(size + pad, "extended header")
                raw += block
                raw += payload
                payload = payload[:size]
                if typ == PAX:
                    pax.update(parse_pax(payload))
                elif typ == GPAX:
                    # validated, then ignored (see module docstring); its bytes stay in
                    # the next member's raw_header so the stream can be rebuilt exactly
                    parse_pax(payload)
                elif typ == GNU_LONGNAME:
                    longname = _nts(payload)
                else:
                    longlink = _nts(payload)
                continue
            if typ in (b"S", b"M", b"N") or (pax and any(
                    k.startswith("GNU.sparse.") for k in pax)):
                raise UnsupportedError(
                    f"tar member at offset {start} is a sparse or multi-volume file",
                    hint="re-create the layer without sparse files (tar --sparse off)")
            entry = self._make_entry(block, typ, size, pax, longname, longlink)
            entry.raw_header = bytes(raw) + block if raw else block
            entry.offset = start
            if entry.kind == "file":
                self._remaining = entry.size
                self._pad = -entry.size % BLOCK
            else:
                # header-only types carry no data whatever their size field says
                # (as Go's archive/tar, hence umoci and containerd, read them)
                entry.size = 0
            pax = {}
            longname = longlink = None
            raw = bytearray()
            yield entry

    def _make_entry(self, block: bytes, typ: bytes, size: int, pax: dict[str, bytes],
                    longname: bytes | None, longlink: bytes | None) -> TarEntry:
        (name_b, mode_b, uid_b, gid_b, _size_b, mtime_b, _ck, _t, link_b, magic, _ver,
         uname_b, gname_b, _dmaj, _dmin, prefix) = _HDR.unpack_from(block)
        name_b = _nts(name_b)
        if magic == b"ustar\0":  # POSIX ustar: prefix field
            prefix = _nts(prefix)
            if prefix:
                name_b = prefix + b"/" + name_b
        link_b = _nts(link_b)
        if longname is not None:
            name_b = longname
        if longlink is not None:
            link_b = longlink
        if pax:
            name_b = pax.get("path", name_b)
            link_b = pax.get("linkpath", link_b)
        if b"\0" in name_b:
            raise UnsafeLayerError(f"tar member name contains a NUL byte: {name_b!r}")
        if b"\0" in link_b:
            raise UnsafeLayerError(
                f"tar member {name_b!r}: link target contains a NUL byte: {link_b!r}")
        kind = TYPE_NAMES.get(typ)
        if kind is None:
            if typ == b"D":
                kind = "dir"
            elif typ == b"V":
                kind = "skip"
            else:
                raise UnsupportedError(f"unsupported tar member type {typ!r} for {name_b!r}")
        if kind == "file" and name_b.endswith(b"/") and typ == AREG:
            kind = "dir"  # old V7 archives mark directories with a trailing slash
        mode = _num(mode_b, "mode") & 0o7777
        uid = _num(uid_b, "uid")
        gid = _num(gid_b, "gid")
        mtime_ns = _num(mtime_b, "mtime") * 1_000_000_000
        xattrs: dict[str, bytes] = {}
        if pax:
            if "size" in pax:
                size = _pax_int(pax["size"], "size")
            if "uid" in pax:
                uid = _pax_int(pax["uid"], "uid")
            if "gid" in pax:
                gid = _pax_int(pax["gid"], "gid")
            if "mtime" in pax:
                mtime_ns = _pax_time_ns(pax["mtime"])
            xattrs = _pax_xattrs(pax)
            uname_b = pax.get("uname", uname_b)
            gname_b = pax.get("gname", gname_b)
        e = TarEntry(
            name=_decode(name_b), kind=kind, mode=mode, uid=uid, gid=gid, size=size,
            mtime_ns=mtime_ns, linkname=_decode(link_b),
            uname=_decode(_nts(uname_b)), gname=_decode(_nts(gname_b)),
            xattrs=xattrs)
        if kind in ("char", "block"):
            e.devmajor = _num(block[329:337], "devmajor")
            e.devminor = _num(block[337:345], "devminor")
        return e
