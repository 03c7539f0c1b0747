"""Hostile layers below the CLI: RootfsWriter and TarReader fed directly.

The end-to-end versions (exit codes, sentinels outside the bundle) are in
tests/integration/test_breakouts.py; these pin the same behaviour at the
library level so a failure points at the component.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from lamina.errors import CorruptLayerError, UnsafeLayerError
from lamina.layer.extract import clean_name
from lamina.layer.tarstream import TarReader
from lamina.testing.extract import apply_layers
from lamina.testing.layers import XHDTYPE, RawEntry, TarBuilder, header_block


def apply(root: Path, *layers: bytes, keep_dirlinks: bool = False) -> None:
    apply_layers(root, *layers, keep_dirlinks=keep_dirlinks)


def entries(data: bytes) -> list[str]:
    return [e.name for e in TarReader(io.BytesIO(data).read)]


# -- a replaced symlink must not keep redirecting later entries ---------------------

def test_symlink_replaced_by_dir_in_same_layer(tmp_path: Path) -> None:
    """containerd SymlinkOverridePath: foo -> / then foo/ again; the last write is foo/tmp/f."""
    t = (TarBuilder().add_dir("foo").add_dir("foo/tmp").add_file("foo/tmp/f", b"012")
         .add_symlink("foo", "/").add_file("foo/tmp/f", b"345")
         .add_dir("foo").add_dir("foo/tmp").add_file("foo/tmp/f", b"678"))
    root = tmp_path / "r"
    apply(root, t.build())
    assert (root / "foo/tmp/f").read_bytes() == b"678"
    assert (root / "tmp/f").read_bytes() == b"345"


def test_symlink_replaced_by_dir_in_upper_layer(tmp_path: Path) -> None:
    """containerd DirectoryOverrideSymlinkAndHardlink: localetc -> etc, then a real localetc/."""
    lower = (TarBuilder().add_dir("etc").add_file("etc/passwd", b"inside")
             .add_symlink("localetc", "etc")
             .add_hardlink("localetc/localpasswd", "etc/passwd").build())
    upper = TarBuilder().add_dir("localetc").add_file("localetc/localpasswd", b"new").build()
    root = tmp_path / "r"
    apply(root, lower, upper)
    assert not (root / "localetc").is_symlink()
    assert (root / "localetc/localpasswd").read_bytes() == b"new"
    assert (root / "etc/localpasswd").read_bytes() == b"inside"
    assert (root / "etc/passwd").read_bytes() == b"inside"


def test_dir_replaced_by_symlink_redirects(tmp_path: Path) -> None:
    """The converse: once d is a symlink, d/x goes where it points (inside the rootfs)."""
    t = (TarBuilder().add_dir("d").add_file("d/x", b"1").add_dir("other")
         .add_symlink("d", "/other").add_file("d/x", b"2"))
    root = tmp_path / "r"
    apply(root, t.build())
    assert (root / "other/x").read_bytes() == b"2"
    assert os.readlink(root / "d") == "/other"


# -- names ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["..", "../x", "a/../b", "/../x", "./..", "a/.."])
def test_clean_name_refuses_dotdot(name: str) -> None:
    with pytest.raises(UnsafeLayerError):
        clean_name(name)


@pytest.mark.parametrize(("name", "parts"), [("/etc/passwd", ("etc", "passwd")),
                                              ("./a//b/", ("a", "b")), ("", ()), ("/", ())])
def test_clean_name_strips_root_and_dots(name: str, parts: tuple[str, ...]) -> None:
    assert clean_name(name) == parts


# -- headers -------------------------------------------------------------------------

def test_huge_declared_pax_header_is_refused_before_reading() -> None:
    reads: list[int] = []
    data = (TarBuilder().add_raw(header_block(name="././@PaxHeader", typeflag=XHDTYPE,
                                              size=8 << 30)).build())
    src = io.BytesIO(data)

    def read(n: int) -> bytes:
        reads.append(n)
        return src.read(n)

    with pytest.raises(CorruptLayerError):
        entries_list = list(TarReader(read))
        assert not entries_list
    assert all(n <= 16 << 20 for n in reads)


@pytest.mark.parametrize("key", ["path", "linkpath"])
def test_nul_in_pax_name(key: str) -> None:
    e = (RawEntry("innocent", pax={"path": b"a\x00b"}) if key == "path" else
         RawEntry("innocent", b"2", linkname="x", pax={"linkpath": b"a\x00b"}))
    with pytest.raises(UnsafeLayerError):
        entries(TarBuilder().add_raw(e).build())


def test_bad_checksum() -> None:
    data = TarBuilder().add_raw(header_block(name="f", checksum=1)).build()
    with pytest.raises(CorruptLayerError, match="checksum"):
        entries(data)
