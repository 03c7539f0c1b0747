"""The compiled fast path changes speed, never results: same tree, same hashes."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from lamina.layer import extract
from lamina.layer.extract import ExtractOptions, LayerStats, RootfsWriter
from lamina.layer.snapshot import take_snapshot
from lamina.layer.tarstream import TarReader
from lamina.testing.tree import diff_manifests, tree_manifest


def test_fast_path_is_built_in_ci() -> None:
    # the extension is optional at install time; CI must prove the build works
    if os.environ.get("CI") and not extract.fastpath_enabled():
        pytest.fail("lamina._fastpath was not built (C compiler or OpenSSL headers missing?)")
    if not extract.fastpath_enabled():
        pytest.skip("fast path not built here")


def _tar(members: list[tuple[str, str, dict[str, object]]], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for kind, name, attrs in members:
            a = dict(attrs)
            data = a.pop("data", b"")
            assert isinstance(data, bytes)
            ti = tarfile.TarInfo(name)
            ti.type = {"f": tarfile.REGTYPE, "d": tarfile.DIRTYPE, "l": tarfile.SYMTYPE,
                       "h": tarfile.LNKTYPE}[kind]
            ti.mode = 0o755 if kind == "d" else 0o644
            ti.size = len(data)
            ti.mtime = 1_600_000_000 + len(name)
            for k, v in a.items():
                setattr(ti, k, v)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _layers(fmt: int) -> list[bytes]:
    big = bytes(range(256)) * (6 << 12)          # 6 MiB: streamed, not buffered
    mid = b"m" * ((1 << 20) + 77)                # crosses the 1 MiB read size
    lower: list[tuple[str, str, dict[str, object]]] = [
        ("d", "usr", {}), ("d", "usr/lib", {}), ("d", "etc", {"mode": 0o700}),
        ("l", "lib", {"linkname": "usr/lib"}),
        ("d", "srv/", {"uid": 1000, "gid": 1000, "mode": 0o1777}),
        ("d", "srv/ro", {"mode": 0o555}),
        ("f", "srv/ro/inside", {"data": b"in a read-only dir"}),
        ("l", "srv/owned-link", {"linkname": "../etc/x", "uid": 7, "gid": 8}),
        ("l", "srv/replaced-by-file", {"linkname": "nowhere"}),
        ("f", "srv/replaced-by-link", {"data": b"f"}),
    ]
    for i in range(600):
        lower.append(("f", f"usr/lib/f{i:04d}", {"data": os.urandom(i * 7 % 5000)}))
    lower += [
        ("f", "./etc/dotslash", {"data": b"x"}),
        ("f", "/etc/absolute", {"data": b"y"}),
        ("f", "etc//doubled", {"data": b"z"}),           # irregular: Python's path
        ("f", "etc/suid", {"data": b"s", "mode": 0o4755}),
        ("f", "etc/sticky-ro", {"data": b"t", "mode": 0o1444}),
        ("f", "etc/owned", {"data": b"o", "uid": 1000, "gid": 1000}),
        ("f", "etc/empty", {}),
        ("f", "etc/mid", {"data": mid}),
        ("f", "etc/big", {"data": big}),
        ("f", "lib/through-symlink", {"data": b"via lib"}),
        ("f", "etc/caf\udce9", {"data": b"latin-1 name"}),
        ("f", "etc/" + "long" * 40, {"data": b"long name"}),
        ("h", "etc/hard", {"linkname": "usr/lib/f0003"}),
    ]
    upper: list[tuple[str, str, dict[str, object]]] = [
        ("f", "usr/lib/f0001", {"data": b"replaced"}),     # EEXIST: Python replaces
        ("f", "usr/lib/.wh.f0002", {}),
        ("f", "usr/lib/new", {"data": b"new"}),
        ("d", "etc/mid", {}),                               # file -> directory
        ("f", "etc/mid/inside", {"data": b"i"}),
        ("d", "srv", {"mode": 0o750}),                     # existing dir: new metadata
        ("f", "srv/replaced-by-file", {"data": b"now a file"}),
        ("l", "srv/replaced-by-link", {"linkname": "ro/inside"}),
        ("d", "opt/new/deeper", {}),                        # implicit parents
    ]
    return [_tar(lower, fmt), _tar(upper, fmt)]


def _apply(root: Path, layers: list[bytes], rootless: bool) -> tuple[RootfsWriter, int]:
    root.mkdir()
    w = RootfsWriter(str(root), ExtractOptions(rootless=rootless))
    fast = 0
    try:
        for data in layers:
            stats = LayerStats()
            w.apply(TarReader(io.BytesIO(data).read), stats)
            fast += stats.fast
        w.finish()
    finally:
        w.close()
    return w, fast


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT],
                         ids=["gnu", "pax", "ustar"])
@pytest.mark.parametrize("rootless", [True, False], ids=["rootless", "root"])
def test_fast_and_python_paths_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     fmt: int, rootless: bool) -> None:
    if not extract.fastpath_enabled():
        pytest.skip("fast path not built here")
    if not rootless and os.geteuid() != 0:
        pytest.skip("needs root")
    layers = _layers(fmt) if fmt != tarfile.USTAR_FORMAT else _ustar_layers()
    wf, fast = _apply(tmp_path / "fast", layers, rootless)
    monkeypatch.setenv("LAMINA_NO_FASTPATH", "1")
    ws, slow = _apply(tmp_path / "slow", layers, rootless)
    assert slow == 0
    assert fast > 550, "the fast path did not take the plain files"
    diff = diff_manifests(tree_manifest(str(tmp_path / "fast"), mtime=True),
                          tree_manifest(str(tmp_path / "slow"), mtime=True),
                          ignore_root=True, names=("fast", "python"))
    # implicit parents (opt, opt/new) get the time of extraction: not comparable
    diff = [d for d in diff if not (d.startswith(("opt: mtime_ns", "opt/new: mtime_ns")))]
    assert not diff, "\n".join(diff)
    assert wf.hashes == ws.hashes
    assert "usr/lib/through-symlink" in wf.hashes   # real path, not the archive's


def _ustar_layers() -> list[bytes]:
    # ustar cannot carry non-ASCII or >256-byte names: same layers without them
    out = []
    for data in _layers(tarfile.GNU_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=io.BytesIO(data)) as tin, \
                tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for ti in tin.getmembers():
                if not ti.name.isascii() or len(ti.name) >= 100:
                    continue
                tf.addfile(ti, tin.extractfile(ti) if ti.isfile() else None)
        out.append(buf.getvalue())
    return out


def test_compiled_snapshot_matches_the_python_walk(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    if not extract.fastpath_enabled():
        pytest.skip("fast path not built here")
    w, _ = _apply(tmp_path / "r", _layers(tarfile.PAX_FORMAT), rootless=True)
    root = str(tmp_path / "r")
    os.mkfifo(tmp_path / "r/fifo")
    fast = take_snapshot(root, w.hashes)
    (tmp_path / "r" / "/".join(["deep"] * 300)).mkdir(parents=True)   # past the C walk
    deep_fast = take_snapshot(root, w.hashes)
    monkeypatch.setenv("LAMINA_NO_FASTPATH", "1")
    deep_slow = take_snapshot(root, w.hashes)
    shutil.rmtree(tmp_path / "r/deep")
    slow = take_snapshot(root, w.hashes)
    del fast[""], slow[""]      # the root's times moved with deep/
    assert fast == slow
    assert deep_fast == deep_slow
    assert fast["usr/lib/f0003"][9] == w.hashes["usr/lib/f0003"]
    assert fast["lib"][1] == "l" and fast["lib"][9] == "usr/lib"
    assert fast["fifo"][1] == "p"
