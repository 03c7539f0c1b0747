"""Highly compressible layers: memory stays bounded by the decode queue, not the ratio."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LAMINA
from lamina.testing.images import build_image
from lamina.testing.layers import TarBuilder

SIZE = 384 << 20     # zeros: ~12 KiB as zstd (one frame), ~380 KiB as gzip


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_bomb_layer_unpacks_in_bounded_memory(tmp_path: Path, compression: str) -> None:
    layer = TarBuilder().add_file("zeros", bytes(SIZE)).build()
    build_image(str(tmp_path / "oci"), "bomb", [layer], compression=compression)
    del layer
    # the peak RSS a child reports includes its parent's at fork time: measure lamina
    # from a small launcher, not from this (large) test process
    launcher = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); "
                "_, st, ru = os.wait4(p.pid, 0); print(ru.ru_maxrss); "
                "sys.exit(os.waitstatus_to_exitcode(st))")
    proc = subprocess.run([sys.executable, "-c", launcher, *LAMINA, "unpack", "--quiet",
                           "--rootless", "--image", f"{tmp_path / 'oci'}:bomb",
                           str(tmp_path / "b")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.path.getsize(tmp_path / "b/rootfs/zeros") == SIZE
    peak_kb = int(proc.stdout.split()[-1])
    assert peak_kb < 160 * 1024, f"peak RSS {peak_kb // 1024} MiB"
