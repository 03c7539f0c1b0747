"""Byte ranges of a registry's blobs, for a lazy driver that reads on demand.

A range read cannot verify the blob's digest (that needs every byte); callers
that need integrity check what they read against their own per-chunk digests
(the lazy driver's table of contents) or fetch the whole blob with a pull.
"""

from __future__ import annotations

import httpx

from lamina.errors import NotFoundError, RegistryError, UsageError
from lamina.registry.client import (
    CONTENT_RANGE,
    RegistryClient,
    RegistryOptions,
    transport_error,
)
from lamina.registry.reference import RegistryRef


class RemoteBlobSource:
    """``read_range(digest, start, length)`` over HTTP range requests, thread-safe."""

    def __init__(self, ref: RegistryRef, options: RegistryOptions | None = None) -> None:
        self.ref = ref
        self.client = RegistryClient(ref, options or RegistryOptions(),
                                     [f"repository:{ref.repository}:pull"])

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> RemoteBlobSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def size(self, digest: str) -> int:
        """The blob's size (``NotFoundError`` if the repository does not have it)."""
        n = self.client.blob_size(self.ref.repository, digest)
        if n is None:
            raise NotFoundError(f"blob {digest} not found in {self.ref.registry}/"
                                f"{self.ref.repository}")
        return n

    def read_range(self, digest: str, start: int, length: int) -> bytes:
        """*length* bytes of the blob from offset *start* (fewer only at its end)."""
        if start < 0 or length < 0:
            raise UsageError(f"bad range start={start} length={length}")
        if length == 0:
            return b""
        what = f"range {start}+{length} of blob {digest}"
        buf = bytearray()
        try:
            with self.client.open_blob(self.ref.repository, digest, start,
                                       start + length - 1) as resp:
                skip = 0
                if resp.status_code == 200:  # range ignored: the whole blob comes
                    skip = start
                else:
                    m = CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                    if not m or int(m.group(1)) != start:
                        raise RegistryError(
                            f"{what}: the registry answered with Content-Range "
                            f"{resp.headers.get('Content-Range')!r}",
                            hint="the registry does not support range requests correctly")
                for chunk in resp.iter_raw():
                    if skip:
                        if len(chunk) <= skip:
                            skip -= len(chunk)
                            continue
                        chunk = chunk[skip:]
                        skip = 0
                    buf += chunk
                    if len(buf) >= length:
                        break
        except httpx.HTTPError as e:
            raise transport_error(e, self.ref.registry, what) from None
        return bytes(buf[:length])
