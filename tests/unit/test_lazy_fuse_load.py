"""pyfuse3 is loaded in its asyncio mode without importing trio (a lazy mount's wait)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("pyfuse3")

_PROBE = """
import sys
import lamina.lazy.fuse
import lamina.lazy.mount
import pyfuse3, pyfuse3.asyncio
assert pyfuse3.trio is pyfuse3.asyncio, pyfuse3.trio
print(sorted(m for m in sys.modules if m == "trio" or m.startswith("trio.")))
"""


def test_the_daemon_modules_do_not_import_trio() -> None:
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_pyfuse3_imported_with_trio_first_is_switched_to_asyncio() -> None:
    probe = "import trio\n" + _PROBE.replace('print(sorted(m for m in sys.modules if m == "trio" '
                                             'or m.startswith("trio.")))', "print('ok')")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
