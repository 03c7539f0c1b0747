"""The conformance kit catches what a broken driver gets wrong (and passes copy)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from lamina.bundle import Progress, UnpackResult
from lamina.drivers.base import Capabilities, ClaimRequest, Driver
from lamina.drivers.copy import CopyDriver, CopyFactory
from lamina.errors import UsageError
from lamina.testing.conformance import (
    ConformanceOptions,
    DriverUnavailable,
    Failure,
    check_driver,
)


def checks(failures: list[Failure]) -> set[str]:
    return {f.check for f in failures}


class _Factory(CopyFactory):
    driver: type[CopyDriver] = CopyDriver

    def claim(self, req: ClaimRequest) -> Driver | None:
        return self.driver(req)

    def open(self, bundle: str, meta: Mapping[str, Any], store: Any) -> Driver:
        return self.driver(meta=meta, store=store)


def factory(driver: type[CopyDriver], **kw: Any) -> _Factory:
    f = _Factory()
    f.driver = driver
    for k, v in kw.items():
        setattr(f, k, v)
    return f


def test_copy_driver_conforms(tmp_path: Path) -> None:
    assert check_driver(CopyFactory(), str(tmp_path / "w")) == []


def test_a_wrong_tree_is_caught(tmp_path: Path) -> None:
    class DropsModes(CopyDriver):
        def prepare(self, progress: Progress | None = None) -> UnpackResult:
            res = super().prepare(progress)
            os.chmod(os.path.join(self.req.bundle, "rootfs", "etc", "shadow"), 0o644)
            return res

    failures = check_driver(factory(DropsModes), str(tmp_path / "w"),
                            ConformanceOptions(read_only=(True,)))
    assert "tree" in checks(failures)
    assert any("etc/shadow: mode" in f.message for f in failures)


def test_undeclared_writes_are_caught(tmp_path: Path) -> None:
    class Scribbles(CopyDriver):
        def prepare(self, progress: Progress | None = None) -> UnpackResult:
            res = super().prepare(progress)
            with open(os.path.join(os.path.dirname(self.req.bundle), "layout", "notes"),
                      "w") as f:
                f.write("not declared\n")
            return res

    failures = check_driver(factory(Scribbles), str(tmp_path / "w"),
                            ConformanceOptions(read_only=(True,)))
    assert any(f.check == "writes" and "layout/notes" in f.message for f in failures)


def test_claim_that_writes_and_bad_declaration(tmp_path: Path) -> None:
    class Eager(_Factory):
        name = "eager one!"

        def claim(self, req: ClaimRequest) -> Driver | None:
            os.makedirs(req.bundle)
            return CopyDriver(req)

    failures = check_driver(Eager(), str(tmp_path / "w"))
    assert failures and checks(failures) == {"declaration"}
    Eager.name = "eager"
    failures = check_driver(Eager(), str(tmp_path / "w2"), ConformanceOptions(read_only=(True,)))
    assert any(f.check == "claim" and "claim() wrote" in f.message for f in failures)


def test_declining_is_checked(tmp_path: Path) -> None:
    key = "org.example.mine"

    class Picky(_Factory):
        def claim(self, req: ClaimRequest) -> Driver | None:
            if key not in req.annotations:
                if req.forced:
                    raise UsageError("not mine", hint=f"annotate the image with {key}")
                return None
            return CopyDriver(req)

    opts = ConformanceOptions(annotations={key: "1"}, declines_without=True, read_only=(True,))
    assert check_driver(Picky(), str(tmp_path / "w"), opts) == []
    # the same driver, tested as if it should claim everything
    failures = check_driver(Picky(), str(tmp_path / "w2"), ConformanceOptions(read_only=(True,)))
    assert any("declined a request it should serve" in f.message for f in failures)
    # a stock-like driver claims what it should decline
    failures = check_driver(CopyFactory(), str(tmp_path / "w3"), opts)
    assert any("claimed a request it should decline" in f.message for f in failures)


def test_unverified_blob_is_caught(tmp_path: Path) -> None:
    class Trusting(CopyDriver):
        def prepare(self, progress: Progress | None = None) -> UnpackResult:
            if "corrupt" in self.req.image:
                os.makedirs(os.path.join(self.req.bundle, "rootfs"))
                return UnpackResult(self.req.bundle, "", "", 0)
            return super().prepare(progress)

    failures = check_driver(factory(Trusting), str(tmp_path / "w"),
                            ConformanceOptions(read_only=(True,)))
    assert any(f.check == "errors" and f.case == "corrupt layer blob" for f in failures)


def test_unavailable_driver(tmp_path: Path) -> None:
    class Needs(_Factory):
        capabilities = Capabilities(tools=("no-such-tool-anywhere",))

    with pytest.raises(DriverUnavailable, match="needs the no-such-tool-anywhere program"):
        check_driver(Needs(), str(tmp_path / "w"))
