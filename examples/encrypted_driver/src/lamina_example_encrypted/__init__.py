"""Example lamina driver: layer files encrypted at rest (AES-GCM), decrypted on unpack.

See this package's README.md.  Built on the public driver interface
(:mod:`lamina.drivers.base`) and the store's extraction records.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lamina.drivers import storebundle
from lamina.drivers.base import Capabilities, ChainLayer, ClaimRequest, Driver, check_capabilities
from lamina.errors import CorruptLayerError, NotFoundError, UsageError
from lamina.layer.compression import LayerPipeline, LayerSource
from lamina.layer.extract import ExtractOptions, LayerStats, RootfsWriter
from lamina.layer.snapshot import row as snapshot_row
from lamina.layer.snapshot import take_snapshot
from lamina.layer.tarstream import TarReader

if TYPE_CHECKING:
    from lamina.bundle import Progress, UnpackResult
    from lamina.store import Store

NAME = "encrypted"
KEY_ANNOTATION = "io.lamina.example.encrypt.key-file"
_BLOCK = 512


def load_key(path: str) -> bytes:
    """A 256-bit key from *path*: 32 raw bytes or 64 hex digits."""
    try:
        with open(path, "rb") as f:
            data = f.read(200)
    except OSError as e:
        raise UsageError(f"{KEY_ANNOTATION}={path}: cannot read the key: {e.strerror}",
                         hint="point the annotation at a readable 32-byte key file") from None
    text = data.strip()
    if len(data) == 32:
        return data
    if len(text) == 64:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise UsageError(f"{KEY_ANNOTATION}={path}: not a 256-bit key ({len(data)} bytes)",
                     hint="make one with: head -c 32 /dev/urandom > KEYFILE")


class _Crypt:
    def __init__(self, key: bytes) -> None:
        self.aead = AESGCM(key)
        self.mac_key = hmac.new(key, b"lamina-example-encrypted names", hashlib.sha256).digest()

    def name(self, data: bytes) -> str:
        return hmac.new(self.mac_key, data, hashlib.sha256).hexdigest()

    def seal(self, data: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self.aead.encrypt(nonce, data, aad)

    def open(self, blob: bytes, aad: bytes, what: str) -> bytes:
        try:
            return self.aead.decrypt(blob[:12], blob[12:], aad)
        except InvalidTag:
            raise UsageError(f"{what} does not decrypt with this key",
                             hint="use the key the layer was first unpacked with, or remove "
                                  "the encrypted extraction (lamina gc)") from None


class EncryptedDriver(Driver):
    name = NAME

    def __init__(self, req: ClaimRequest | None = None, *, key: bytes = b"",
                 meta: Mapping[str, Any] | None = None, store: Store | None = None) -> None:
        super().__init__(req, meta=meta, store=store)
        self.crypt = _Crypt(key) if key else None
        self.stats = LayerStats()
        self.reused = 0
        self._writer: RootfsWriter | None = None

    def prepare(self, progress: Progress | None = None) -> UnpackResult:
        req = self.req
        assert req.store is not None
        t0 = time.monotonic()
        warnings: list[str] = []

        def warn(msg: str) -> None:
            warnings.append(msg)
            if progress is not None:
                progress.warn(msg)

        stage = storebundle.begin(req.bundle)
        try:
            rootfs = os.path.join(stage, "rootfs")
            os.mkdir(rootfs, 0o755)
            opts = ExtractOptions(req.rootless, req.uid_map, req.gid_map, req.keep_dirlinks)
            with req.store.session():
                writer = RootfsWriter(rootfs, opts, warn)
                self._writer = writer
                try:
                    if progress is not None:
                        progress.start(sum(c.desc.size for c in req.chain), len(req.chain))
                    for i, layer in enumerate(req.chain):
                        self.extract(layer, i)
                        if progress is not None:
                            progress.layer_done(i)
                    snap = take_snapshot(rootfs, writer.hashes)
                    for path, st in writer.finish().items():
                        snap[path] = snapshot_row(path, "d", st, "")
                    storebundle.complete(stage, req, NAME, writer.root_fd,
                                         list(snap.values()), {"reused": self.reused})
                finally:
                    self._writer = None
                    writer.close()
        except BaseException:
            storebundle.abort(stage)
            raise
        return storebundle.result(req, NAME, t0, self.stats, self.reused, warnings)

    def extract(self, layer: ChainLayer, index: int) -> None:
        """Apply *layer* from its encrypted extraction, making that first if needed."""
        st, w, crypt = self.req.store, self._writer, self.crypt
        assert st is not None and w is not None and crypt is not None
        with st.extraction_lock(NAME, layer.chain_id):
            ex = st.extraction(NAME, layer.chain_id)
            if ex is not None and os.path.isfile(os.path.join(ex.path, "index.enc")):
                self.reused += 1
                path = ex.path
            else:
                if ex is not None:  # recorded but gone: make it again
                    st.remove_extraction(NAME, layer.chain_id)
                with st.stage_extraction(NAME, layer.chain_id) as tmp:
                    _encrypt_layer(st, layer, crypt, tmp)
                path = st.extraction_dir(NAME, layer.chain_id)
        reader = TarReader(_DecryptedTar(path, layer, crypt).read)
        w.apply(reader, self.stats)
        reader.drain()


def _encrypt_layer(st: Store, layer: ChainLayer, crypt: _Crypt, out: str) -> None:
    """Read the layer's blob (verified) and write its encrypted index and objects."""
    objects = os.path.join(out, "objects")
    os.mkdir(objects, 0o700)
    blob = st.blob_path(layer.desc.digest)

    def open_blob() -> Any:
        try:
            return open(blob, "rb", buffering=0)
        except FileNotFoundError:
            raise NotFoundError(f"layer blob {layer.desc.digest} is not in the store",
                                hint="import the image again") from None

    entries: list[tuple[str, str | None]] = []
    with LayerPipeline([LayerSource(layer.desc, layer.diff_id, open_blob)]) as pipe:
        stream = pipe.stream(0)
        reader = TarReader(stream.read)
        for e in reader:
            name: str | None = None
            if e.size:
                data = b"".join(iter(reader.read_data, b""))
                name = crypt.name(data)
                p = os.path.join(objects, name)
                if not os.path.exists(p):
                    _write(p, crypt.seal(data, b"object:" + name.encode()))
            entries.append((base64.b64encode(e.raw_header).decode(), name))
        reader.drain()
        stream.finish()  # digest and diff_id checked: only now is the index written
    index = json.dumps({"diff_id": layer.diff_id, "entries": entries}).encode()
    _write(os.path.join(out, "index.enc"),
           crypt.seal(index, b"index:" + layer.diff_id.encode()))


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class _DecryptedTar:
    """The layer's tar, rebuilt from the encrypted index and objects, as a read()."""

    def __init__(self, path: str, layer: ChainLayer, crypt: _Crypt) -> None:
        with open(os.path.join(path, "index.enc"), "rb") as f:
            index = json.loads(crypt.open(f.read(), b"index:" + layer.diff_id.encode(),
                                          f"the encrypted index of layer {layer.diff_id}"))
        if index.get("diff_id") != layer.diff_id:
            raise CorruptLayerError(f"encrypted extraction {path} is not layer {layer.diff_id}")
        self.objects = os.path.join(path, "objects")
        self.crypt = crypt
        self.parts = self._parts(index["entries"])
        self.buf = b""

    def _parts(self, entries: list[list[Any]]) -> Iterator[bytes]:
        for header_b64, name in entries:
            yield base64.b64decode(header_b64)
            if name is not None:
                try:
                    with open(os.path.join(self.objects, name), "rb") as f:
                        sealed = f.read()
                except FileNotFoundError:
                    raise CorruptLayerError(f"encrypted object {name} is missing",
                                            hint="lamina gc, then unpack again") from None
                data = self.crypt.open(sealed, b"object:" + name.encode(), f"object {name}")
                yield data + b"\0" * (-len(data) % _BLOCK)
        yield b"\0" * (2 * _BLOCK)

    def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            part = next(self.parts, None)
            if part is None:
                break
            self.buf += part
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


class EncryptedFactory:
    name = NAME
    description = "example: layer files kept AES-GCM encrypted in the store, decrypted on unpack"
    capabilities = Capabilities(needs_root=False, rootless_ok=True, needs_store=True,
                                writes=("bundle", "store"))

    def check_here(self, store_path: str | None) -> str | None:
        return check_capabilities(self.capabilities, store_path)

    def claim(self, req: ClaimRequest) -> Driver | None:
        key_file = req.annotations.get(KEY_ANNOTATION)
        if not key_file or req.store is None:
            if req.forced:
                raise UsageError(
                    "the encrypted driver needs a store and a key" if key_file else
                    f"the encrypted driver needs the annotation {KEY_ANNOTATION}=PATH",
                    hint=f"unpack with --store and --annotation {KEY_ANNOTATION}=KEYFILE")
            return None
        return EncryptedDriver(req, key=load_key(key_file))

    def open(self, bundle: str, meta: Mapping[str, Any], store: Store | None) -> Driver:
        # remove/usage/repack need no key: the bundle's rootfs is plain files
        return EncryptedDriver(meta=meta, store=store)


factory = EncryptedFactory()
