"""The lazy index artifact format and remote blob reads, without a registry:

- an artifact layer blob round-trips and is checked against the image layer it claims;
- hostile blobs (bombs, malformed members) are refused with ImageFormatError;
- RemoteBlob over a fake range reader: exact bytes anywhere, hints fetched in one
  request, blocks reused, short answers refused, transient failures retried;
- the Fetcher reading gzip, zstd and plain layers through RemoteBlob: the right
  content with about one request per file and far less than the blob transferred.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import pytest

from lamina.errors import CorruptLayerError, DigestMismatchError, ImageFormatError, RegistryError
from lamina.lazy import artifact
from lamina.lazy.fetch import Fetcher, FetchStats
from lamina.lazy.index import LayerIndex, ensure_index
from lamina.lazy.model import ROOT_INO, FrozenTree, build_tree
from lamina.lazy.remote import BLOCK, BlockCache, RemoteBlob
from lamina.oci.layout import OCILayout
from lamina.oci.model import Descriptor
from lamina.testing.images import build_image
from lamina.testing.layers import TarBuilder


def _image(tmp_path: Path, compression: str) -> tuple[OCILayout, Descriptor, str]:
    rng = random.Random(7)
    tb = TarBuilder().add_dir("etc").add_file("etc/os-release", b"ID=test\n")
    for i in range(60):      # 60 x 100 kB, half of it random: several gzip checkpoints
        tb.add_file(f"data/f{i}", rng.randbytes(50_000) + bytes(50_000))
    tb.add_symlink("link", "etc/os-release").add_file("last", b"the end\n")
    build_image(str(tmp_path / "l"), "t", [tb.build()], compression=compression)
    lay = OCILayout.open(str(tmp_path / "l"))
    m = lay.resolve("t")
    return lay, m.layers[0], lay.config_for(m).diff_ids[0]


def test_layer_blob_round_trip_and_checks(tmp_path: Path) -> None:
    lay, desc, diff_id = _image(tmp_path, "gzip")
    idx, _ = ensure_index(lay, desc, diff_id)
    blob = artifact.encode_layer(lay, desc, diff_id)
    assert blob == artifact.encode_layer(lay, desc, diff_id)     # deterministic
    dec = artifact.decode_layer(blob, desc, diff_id, "t")
    assert dec.compression == "gzip" and dec.seek_kind == "gzidx"
    assert dec.seek == Path(idx.seek_path).read_bytes()
    assert [m.to_json() for m in dec.members] == [m.to_json() for m in idx.members]
    # claimed for another layer / diff_id: refused
    other = Descriptor(desc.media_type, "sha256:" + "0" * 64, desc.size)
    with pytest.raises(DigestMismatchError):
        artifact.decode_layer(blob, other, diff_id, "t")
    with pytest.raises(DigestMismatchError):
        artifact.decode_layer(blob, desc, "sha256:" + "1" * 64, "t")
    # the manifest lists one blob per layer, annotated, with the subject
    man = json.loads(artifact.artifact_manifest(desc, [(desc.digest, blob)]))
    assert man["artifactType"] == artifact.ARTIFACT_TYPE
    assert man["subject"]["digest"] == desc.digest
    assert man["layers"][0]["annotations"] == {artifact.LAYER_ANNOTATION: desc.digest}
    assert man["config"]["digest"] == artifact.EMPTY_DIGEST


def _blob(head: dict[str, object], seek: bytes = b"") -> bytes:
    return gzip.compress(json.dumps(head).encode() + b"\n" + seek)


def test_hostile_layer_blobs_are_refused(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _lay, desc, diff_id = _image(tmp_path, "none")
    head: dict[str, object] = {"version": 1, "blob": desc.digest, "diff_id": diff_id,
                               "compression": "none", "seek": "", "seek_size": 0}
    good = ["f", "file", 0o644, 0, 0, 1, 0, "", 0, 0, {}, 512, "a" * 64]
    artifact.decode_layer(_blob({**head, "members": [good]}), desc, diff_id, "t")
    bad_rows = [
        good[:12],                                  # short row
        [*good[:1], "socket", *good[2:]],           # unknown kind
        [*good[:5], -1, *good[6:]],                 # negative size
        [*good[:12], "zz"],                         # a file without a sha256
        [*good[:10], {"user.x": 5}, *good[11:]],    # xattr value not base64 text
        "not a list",
    ]
    for row in bad_rows:
        with pytest.raises(ImageFormatError):
            artifact.decode_layer(_blob({**head, "members": [row]}), desc, diff_id, "t")
    with pytest.raises(ImageFormatError):          # seek data where none belongs
        artifact.decode_layer(_blob({**head, "seek_size": 3, "members": []}, b"abc"),
                              desc, diff_id, "t")
    with pytest.raises(ImageFormatError):          # trailing garbage after the gzip
        artifact.decode_layer(_blob({**head, "members": []}) + b"x", desc, diff_id, "t")
    monkeypatch.setattr(artifact, "MAX_DATA", 1 << 16)
    bomb = gzip.compress(json.dumps({**head, "members": []}).encode() + b"\n" +
                         bytes(1 << 20))
    with pytest.raises(ImageFormatError, match="uncompressed"):
        artifact.decode_layer(bomb, desc, diff_id, "t")


class FakeRanges:
    """read_range over bytes, counting requests; optionally failing or short."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.requests: list[tuple[int, int]] = []
        self.fail = 0
        self.short = False

    def read_range(self, digest: str, start: int, length: int) -> bytes:
        if self.fail:
            self.fail -= 1
            raise RegistryError("connection lost")
        self.requests.append((start, length))
        out = self.data[start:start + length]
        return out[:-1] if self.short else out


def test_remote_blob_reads_and_hints() -> None:
    data = os.urandom(5 * BLOCK + 123)
    src = FakeRanges(data)
    stats = FetchStats()
    f = RemoteBlob(src, "sha256:x", len(data), BlockCache(), stats)
    rng = random.Random(1)
    for _ in range(200):
        pos, n = rng.randrange(len(data)), rng.randrange(1, 3 * BLOCK)
        f.seek(pos)
        assert f.read(n) == data[pos:pos + n] and f.tell() == min(pos + n, len(data))
    f.seek(-10, 2)
    assert f.read() == data[-10:] and f.read(5) == b""
    # a hint over cached and missing blocks fetches each gap once, then reads are free
    src2 = FakeRanges(data)
    g = RemoteBlob(src2, "sha256:y", len(data), BlockCache(), FetchStats())
    g.hint(2 * BLOCK, 2 * BLOCK + 10)                 # exactly block 2, no read-ahead
    assert src2.requests == [(2 * BLOCK, BLOCK)]
    g.hint(0, len(data))                              # the gaps: blocks 0-1 and 3-end
    assert src2.requests[1:] == [(0, 2 * BLOCK), (3 * BLOCK, len(data) - 3 * BLOCK)]
    g.seek(0)
    assert g.read() == data and len(src2.requests) == 3
    assert stats.range_requests == len(src.requests)
    assert stats.blob_bytes_read == sum(n for _s, n in src.requests)


def test_remote_blob_failures() -> None:
    data = os.urandom(3 * BLOCK)
    src = FakeRanges(data)
    src.fail = 2                                       # two drops, then it answers
    f = RemoteBlob(src, "sha256:x", len(data), BlockCache(), FetchStats(), retries=2)
    assert f.read(100) == data[:100]
    src.fail = 3                                       # more drops than retries
    f1 = RemoteBlob(src, "sha256:x", len(data), BlockCache(), FetchStats(), retries=2)
    with pytest.raises(RegistryError):
        f1.read(10)
    src.short = True
    f2 = RemoteBlob(src, "sha256:z", len(data), BlockCache(), FetchStats())
    with pytest.raises(CorruptLayerError, match="sent"):
        f2.read(10)


class FakeRemote:
    def __init__(self, path: str) -> None:
        self.src = FakeRanges(Path(path).read_bytes())
        self.cache = BlockCache()

    def open(self, digest: str, size: int, stats: FetchStats) -> RemoteBlob:
        return RemoteBlob(self.src, digest, size, self.cache, stats)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("compression", ["gzip", "none", "zstd"])
def test_fetcher_over_remote_blobs(tmp_path: Path, compression: str) -> None:
    lay, desc, diff_id = _image(tmp_path, compression)
    idx, _ = ensure_index(lay, desc, diff_id)
    tree = FrozenTree.of(build_tree([idx]), "sha256:m")
    remote = FakeRemote(idx.blob_path)
    # the blob is not local: every byte comes through the remote source
    li = LayerIndex(idx.blob, idx.diff_id, idx.compression, [], "", idx.seek_path)
    fetcher = Fetcher([li], [desc.to_json()], str(tmp_path / "cache"), remote=remote)
    root = tree.node(ROOT_INO)
    assert root is not None
    want = {m.name: m for m in idx.members}
    full: dict[str, bytes] = {}
    for name in ("etc/os-release", "data/f45", "last", "data/f3"):
        node = root
        for part in name.split("/"):
            got = tree.lookup(node, part)
            assert got is not None
            node = got
        full[name] = Path(fetcher.cached(node)).read_bytes()
        assert len(full[name]) == want[name].size
    assert full["etc/os-release"] == b"ID=test\n" and full["last"] == b"the end\n"
    s = fetcher.stats
    assert s.files_fetched == 4
    if compression == "zstd":       # one frame: the whole blob, once
        assert s.blob_bytes_read == desc.size
    else:
        # about one request per file, and far from the whole 3 MB blob
        assert s.range_requests <= 6, remote.src.requests
        assert s.blob_bytes_read < desc.size / 2
