"""The driver registry: entry-point discovery, claim order, declines, forced
drivers, plugins that fail, and the capability checks."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from lamina.bundle import Progress, UnpackResult
from lamina.drivers.base import (
    Capabilities,
    ClaimRequest,
    Driver,
    check_capabilities,
    fs_type,
)
from lamina.drivers.manage import describe_drivers
from lamina.drivers.registry import BUILTIN_ORDER, Registry, select
from lamina.errors import EnvironmentError_, UnsupportedError, UsageError
from lamina.oci.layout import OCILayout
from lamina.testing.images import build_image
from lamina.testing.layers import TarBuilder


class _Drv(Driver):
    name = "fake"

    def prepare(self, progress: Progress | None = None) -> UnpackResult:
        raise AssertionError("not called here")


class _Factory:
    description = "test"
    capabilities = Capabilities()

    def __init__(self, name: str, *, claims: bool = True, reason: str | None = None,
                 raises: BaseException | None = None, log: list[str] | None = None) -> None:
        self.name, self.claims, self.reason, self.raises = name, claims, reason, raises
        self.log = log if log is not None else []
        self.seen: list[ClaimRequest] = []

    def check_here(self, store_path: str | None) -> str | None:
        return self.reason

    def claim(self, req: ClaimRequest) -> Driver | None:
        self.log.append(self.name)
        self.seen.append(req)
        if self.raises is not None:
            raise self.raises
        if not self.claims:
            return None
        d = _Drv(req)
        d.claimed_by = self.name  # type: ignore[attr-defined]
        return d

    def open(self, bundle: str, meta: Any, store: Any) -> Driver:
        return _Drv(meta=meta)


@pytest.fixture(scope="module")
def req(tmp_path_factory: pytest.TempPathFactory) -> ClaimRequest:
    lay = str(tmp_path_factory.mktemp("lay") / "l")
    build_image(lay, "t", [TarBuilder().add_file("a", b"a").build()],
                annotations={"org.example/x": "1"})
    layout = OCILayout.open(lay)
    m = layout.resolve("t")
    return ClaimRequest(manifest=m, config=layout.config_for(m), chain=(), bundle="/nonexistent",
                        annotations=dict(m.annotations), layout=layout)


def _registry(*facs: _Factory, builtin: tuple[str, ...] = ()) -> Registry:
    reg = Registry()
    for f in facs:
        reg.register(f.name, f, origin="lamina" if f.name in builtin else f"pkg-{f.name}")
    return reg


def test_order_plugins_sorted_then_builtins() -> None:
    names = ["copy", "objects", "overlay", "btrfs", "zeta", "alpha"]
    reg = _registry(*(_Factory(n) for n in names), builtin=BUILTIN_ORDER)
    assert reg.names() == ["alpha", "zeta", "overlay", "btrfs", "objects", "copy"]


def test_first_claim_wins_and_declines_pass(req: ClaimRequest) -> None:
    log: list[str] = []
    reg = _registry(_Factory("a-decline", claims=False, log=log),
                    _Factory("b-cannot", reason="needs a unicorn", log=log),
                    _Factory("c-claims", log=log), _Factory("copy", log=log),
                    builtin=("copy",))
    sel = select(req, registry=reg)
    assert sel.driver.claimed_by == "c-claims"  # type: ignore[attr-defined]
    assert log == ["a-decline", "c-claims"]       # b-cannot was never asked to claim
    assert sel.passed == [("a-decline", "declined"), ("b-cannot", "needs a unicorn")]
    assert sel.factory.name == "c-claims"


def test_claim_sees_request_and_annotations(req: ClaimRequest) -> None:
    f = _Factory("p")
    select(req, registry=_registry(f))
    assert f.seen[0].annotations["org.example/x"] == "1"
    assert f.seen[0].forced is False and f.seen[0].manifest.digest == req.manifest.digest


def test_forced_driver(req: ClaimRequest) -> None:
    first, forced = _Factory("a"), _Factory("copy")
    sel = select(req, "copy", registry=_registry(first, forced, builtin=("copy",)))
    assert sel.driver.claimed_by == "copy"  # type: ignore[attr-defined]
    assert first.seen == [] and forced.seen[0].forced is True
    with pytest.raises(UsageError, match="unknown driver 'nope'"):
        select(req, "nope", registry=_registry(first))
    with pytest.raises(EnvironmentError_, match="driver x cannot run here: needs a unicorn"):
        select(req, "x", registry=_registry(_Factory("x", reason="needs a unicorn")))
    with pytest.raises(EnvironmentError_, match="driver y cannot run here: it declined"):
        select(req, "y", registry=_registry(_Factory("y", claims=False)))


def test_plugin_that_raises_is_named(req: ClaimRequest) -> None:
    reg = _registry(_Factory("broken", raises=ValueError("boom")), _Factory("copy"),
                    builtin=("copy",))
    with pytest.raises(EnvironmentError_) as e:
        select(req, registry=reg)
    assert "driver broken" in e.value.message and "ValueError: boom" in e.value.message
    assert e.value.hint and "pkg-broken" in e.value.hint
    # a LaminaError from a plugin keeps its class and gains the plugin's name
    reg = _registry(_Factory("strict", raises=UnsupportedError("no zstd")))
    with pytest.raises(UnsupportedError, match="driver strict: no zstd"):
        select(req, registry=reg)


def test_no_driver_claims(req: ClaimRequest) -> None:
    with pytest.raises(EnvironmentError_, match=r"no driver can unpack.*a: declined"):
        select(req, registry=_registry(_Factory("a", claims=False)))


def test_claim_must_return_a_driver(req: ClaimRequest) -> None:
    f = _Factory("odd")
    f.claim = lambda r: "yes"  # type: ignore[method-assign,assignment,return-value]
    with pytest.raises(EnvironmentError_, match="claimed with a str"):
        select(req, registry=_registry(f))


def _dist(tmp: Path, dist: str, module: str, body: str, eps: str) -> None:
    (tmp / f"{module}.py").write_text(body)
    info = tmp / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[lamina.drivers]\n{eps}\n")


_PLUGIN = '''
from lamina.drivers.base import Capabilities
LOADED = True

class Factory:
    name = "thirdparty"
    description = "a third-party driver"
    capabilities = Capabilities(needs_root=True, network=True, writes=("/srv/cache",))
    def check_here(self, store_path):
        return None
    def claim(self, req):
        return None
    def open(self, bundle, meta, store):
        raise NotImplementedError
'''


def test_entry_point_discovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _dist(tmp_path, "lamina_thirdparty", "lamina_tp_mod", _PLUGIN,
          "thirdparty = lamina_tp_mod:Factory\ncopy = lamina_tp_mod:Factory\n"
          "broken = lamina_tp_missing:factory")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry.from_entry_points()
    assert reg.names()[:2] == ["broken", "thirdparty"]
    names = reg.names()
    assert names.index("thirdparty") < names.index("overlay") < names.index("copy")
    assert reg.entry("copy").origin == "lamina"          # a plugin cannot take a built-in name
    tp = reg.entry("thirdparty")
    assert tp.origin == "lamina_thirdparty" and isinstance(tp.target, str)
    assert "lamina_tp_mod" not in sys.modules            # lazy: nothing imported yet
    fac = reg.get("thirdparty")                          # a class is instantiated
    assert fac.name == "thirdparty" and "lamina_tp_mod" in sys.modules
    with pytest.raises(EnvironmentError_, match=r"driver broken .*could not be loaded"):
        reg.get("broken")
    rows = {r["name"]: r for r in describe_drivers(None, reg)}
    assert rows["thirdparty"]["capabilities"]["needs_root"] is True
    assert rows["thirdparty"]["capabilities"]["writes"] == ["/srv/cache"]
    assert rows["broken"]["can_run"] is False and "could not be loaded" in rows["broken"]["reason"]
    assert rows["copy"]["can_run"] is True


def test_check_capabilities(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_capabilities(Capabilities(), None) is None
    assert check_capabilities(Capabilities(needs_store=True), None) == "needs a store (--store)"
    assert check_capabilities(Capabilities(tools=("no-such-tool-xyz",)), None) == \
        "needs the no-such-tool-xyz program"
    kind = fs_type(str(tmp_path))
    assert kind
    why = check_capabilities(Capabilities(filesystems=("nosuchfs",)), str(tmp_path / "s"))
    assert why and f"is on {kind}" in why and "nosuchfs" in why
    assert check_capabilities(Capabilities(filesystems=(kind,)), str(tmp_path / "s")) is None
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert check_capabilities(Capabilities(needs_root=True), None) == "needs root"
    assert check_capabilities(Capabilities(rootless_ok=False), None) == \
        "does not support rootless use"


def test_builtins_are_lamina_entry_points() -> None:
    from importlib import metadata

    from lamina.drivers.registry import BUILTINS
    eps = metadata.distribution("lamina").entry_points
    assert {ep.name: ep.value for ep in eps if ep.group == "lamina.drivers"} == BUILTINS


def test_deferred_registry_scans_only_when_needed(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _dist(tmp_path, "lamina_thirdparty2", "lamina_tp_mod2", _PLUGIN,
          "thirdparty2 = lamina_tp_mod2:Factory\nobjects = lamina_tp_mod2:Factory\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    scans: list[int] = []
    real_scan = Registry._scan

    def counted(self: Registry) -> None:
        scans.append(1)
        real_scan(self)

    monkeypatch.setattr(Registry, "_scan", counted)
    reg = Registry.deferred()
    objects = reg.entry("objects")       # a forced built-in: no scan
    assert objects.origin == "lamina" and objects.target == "lamina.drivers.objects:factory"
    assert reg.get("objects").name == "objects" and not scans
    # the scan keeps the built-in (a plugin cannot take its name) and finds the plugin
    assert reg.entry("thirdparty2").origin == "lamina_thirdparty2" and scans == [1]
    assert reg.entry("objects") is objects
    assert reg.names() == Registry.from_entry_points().names() and scans == [1, 1]
    with pytest.raises(UsageError, match="already registered"):
        Registry.deferred().register("thirdparty2", "x:y")
