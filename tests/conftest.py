"""Shared fixtures: the lamina CLI as a real subprocess, and peer tools.

A peer tool (umoci, skopeo, ...) that is missing skips the test on a developer
machine but *fails* it under CI (``CI`` set), where ``make test`` has installed
every peer: a green CI run must have exercised them all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence

import pytest

LAMINA = [sys.executable, "-m", "lamina"]

# every manifest, config and index.json any test writes (in-process or through the CLI,
# which inherits this) is checked against the image-spec schemas
os.environ.setdefault("LAMINA_VALIDATE", "1")


def run_lamina(args: Sequence[str], *, check: bool = False, env: dict[str, str] | None = None,
               **kw: object) -> subprocess.CompletedProcess[str]:
    """Run the real CLI; returns the completed process (text mode, output captured)."""
    e = dict(os.environ)
    if env:
        e.update(env)
    proc: subprocess.CompletedProcess[str] = subprocess.run(
        [*LAMINA, *args], capture_output=True, text=True, check=check, env=e, **kw)  # type: ignore[call-overload]
    return proc


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (make test installs it)")
        pytest.skip(f"{name} not installed")
    return path


@pytest.fixture
def lamina() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_lamina


@pytest.fixture
def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
