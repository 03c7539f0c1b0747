"""Driver registry: name -> factory, loaded lazily from entry points.

Drivers are found in the ``lamina.drivers`` entry-point group; lamina's own
are declared in its pyproject.toml exactly as a third party declares one::

    [project.entry-points."lamina.drivers"]
    mydriver = "mypkg.driver:factory"

Nothing is imported until a driver is needed: an entry is a "module:attr"
string, resolved on first use (an attribute that is a class is instantiated
without arguments).  :func:`register` adds one at run time (tests, embedders).
The default registry reads the entry points only when it needs more than a
built-in named by ``--driver`` (:data:`BUILTINS`, lamina's own entry points):
a plugin cannot take a built-in's name, so no scan can change that answer,
and scanning every installed distribution is a noticeable part of a small
unpack's run time.

Which driver serves an unpack (:func:`select`): ``--driver NAME`` forces one;
otherwise third-party drivers are asked first (sorted by name, so the order
does not depend on install order), then the built-ins in :data:`BUILTIN_ORDER`,
then lamina's other drivers (``lazy``: copy claims everything before them, so
they serve only when forced).
A driver that cannot run here (:meth:`DriverFactory.check_here`) is passed
over; the first one whose ``claim`` returns a driver wins.  A plugin that fails
to import or raises is a clear error naming it, never a silent fallback.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from lamina.drivers.base import ClaimRequest, Driver, DriverFactory, cannot_run
from lamina.errors import EnvironmentError_, LaminaError, UsageError

GROUP = "lamina.drivers"
DIST = "lamina"
# built-ins, in the order they are asked; btrfs declines unless the store is on btrfs
BUILTIN_ORDER = ("overlay", "btrfs", "objects", "copy")
# lamina's entry points (pyproject.toml; a test keeps the two equal)
BUILTINS = {
    "copy": "lamina.drivers.copy:factory",
    "overlay": "lamina.drivers.overlay:factory",
    "objects": "lamina.drivers.objects:factory",
    "btrfs": "lamina.drivers.btrfs:factory",
    "lazy": "lamina.drivers.lazy:factory",
}


@dataclass
class Entry:
    name: str
    target: str | DriverFactory         # "module:attr" until loaded
    origin: str                         # "lamina" or the distribution that provides it

    @property
    def builtin(self) -> bool:
        return self.origin == DIST

    def load(self) -> DriverFactory:
        if not isinstance(self.target, str):
            return self.target
        try:
            obj = _resolve(self.target)
            if isinstance(obj, type):
                obj = obj()
        except LaminaError:
            raise
        except Exception as e:
            raise plugin_error(self, "could not be loaded", e) from e
        if not isinstance(obj, DriverFactory):
            raise EnvironmentError_(
                f"driver {self.name} ({self.target}, from {self.origin}) is not a driver "
                "factory (it needs name, capabilities, description, check_here, claim, open)",
                hint=f"fix or uninstall {self.origin}")
        self.target = obj
        return obj


def _resolve(target: str) -> Any:
    mod, _, attr = target.partition(":")
    obj: Any = importlib.import_module(mod.strip())
    for part in attr.strip().split(".") if attr.strip() else ():
        obj = getattr(obj, part)
    return obj


def plugin_error(entry: Entry, what: str, e: BaseException) -> EnvironmentError_:
    where = entry.target if isinstance(entry.target, str) else type(entry.target).__name__
    return EnvironmentError_(
        f"driver {entry.name} ({where}, from {entry.origin}) {what}: "
        f"{type(e).__name__}: {e}",
        hint=f"upgrade or uninstall {entry.origin}, or choose a driver with --driver")


class Registry:
    """The known drivers.  :func:`default_registry` reads the entry points once."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._unscanned = False     # entry points still to read (a deferred registry)

    @classmethod
    def from_entry_points(cls) -> Registry:
        reg = cls()
        reg._scan()
        return reg

    @classmethod
    def deferred(cls) -> Registry:
        """A registry that reads the entry points on first need (see the module
        docstring): :meth:`entry` of a built-in name does not."""
        reg = cls()
        reg._unscanned = True
        return reg

    def _scan(self) -> None:
        self._unscanned = False
        from importlib import metadata  # slow to import: only when scanning
        for ep in metadata.entry_points(group=GROUP):
            dist = ep.dist.name if ep.dist is not None else "?"
            if ep.name in self._entries and self._entries[ep.name].builtin:
                continue  # a plugin cannot replace a built-in by reusing its name
            self._entries[ep.name] = Entry(ep.name, ep.value, DIST if dist == DIST else dist)

    def _scanned(self) -> dict[str, Entry]:
        if self._unscanned:
            self._scan()
        return self._entries

    def register(self, name: str, target: str | DriverFactory, origin: str = "runtime",
                 clobber: bool = False) -> None:
        """Add a driver ("module:attr" or a factory object)."""
        if name in self._scanned() and not clobber:
            raise UsageError(f"driver {name} is already registered")
        self._entries[name] = Entry(name, target, origin)

    def names(self) -> list[str]:
        """Every driver, in the order :func:`select` asks them."""
        entries = self._scanned()
        third = sorted(n for n, e in entries.items() if not e.builtin)
        builtin = [n for n in BUILTIN_ORDER if n in entries]
        rest = sorted(n for n, e in entries.items() if e.builtin and n not in BUILTIN_ORDER)
        return third + builtin + rest

    def entry(self, name: str) -> Entry:
        got = self._entries.get(name)
        if got is not None:
            return got
        if self._unscanned and name in BUILTINS:
            # the scan keeps a built-in it already holds, as it keeps lamina's own
            got = self._entries[name] = Entry(name, BUILTINS[name], DIST)
            return got
        try:
            return self._scanned()[name]
        except KeyError:
            raise UsageError(f"unknown driver {name!r}",
                             hint="known drivers: " + ", ".join(self.names())) from None

    def get(self, name: str) -> DriverFactory:
        return self.entry(name).load()

    def __iter__(self) -> Iterator[Entry]:
        return (self._entries[n] for n in self.names())


_default: Registry | None = None


def default_registry() -> Registry:
    global _default
    if _default is None:
        _default = Registry.deferred()
    return _default


def register(name: str, target: str | DriverFactory, clobber: bool = False) -> None:
    """Register a driver in the default registry (fsspec's register_implementation)."""
    default_registry().register(name, target, clobber=clobber)


@dataclass
class Selection:
    factory: DriverFactory
    driver: Driver
    passed: list[tuple[str, str]]       # (name, why) of drivers asked before, for --verbose


def select(req: ClaimRequest, driver: str | None = None, *, store_path: str | None = None,
           registry: Registry | None = None) -> Selection:
    """The driver serving *req*: *driver* if given, else the first claim."""
    reg = registry or default_registry()
    if driver:
        entry = reg.entry(driver)
        fac = entry.load()
        reason = _guard(entry, "check_here", fac.check_here, store_path)
        if reason:
            raise cannot_run(entry.name, reason)
        got = _guard(entry, "claim", fac.claim, dataclasses.replace(req, forced=True))
        if got is None:
            raise cannot_run(entry.name, "it declined this image")
        return Selection(fac, _check_driver(entry, got), [])
    passed: list[tuple[str, str]] = []
    for entry in reg:
        fac = entry.load()
        reason = _guard(entry, "check_here", fac.check_here, store_path)
        if reason:
            passed.append((entry.name, reason))
            continue
        got = _guard(entry, "claim", fac.claim, req)
        if got is not None:
            return Selection(fac, _check_driver(entry, got), passed)
        passed.append((entry.name, "declined"))
    raise EnvironmentError_(
        "no driver can unpack this image here: "
        + "; ".join(f"{n}: {why}" for n, why in passed),
        hint="see 'lamina drivers'")


def _guard(entry: Entry, what: str, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except LaminaError as e:
        if not e.message.startswith(f"driver {entry.name}"):
            e.message = f"driver {entry.name}: {e.message}"
            e.args = (e.message,)
        raise
    except Exception as e:
        raise plugin_error(entry, f"failed in {what}", e) from e


def _check_driver(entry: Entry, got: object) -> Driver:
    if not isinstance(got, Driver):
        raise EnvironmentError_(
            f"driver {entry.name} ({entry.origin}) claimed with a {type(got).__name__}, "
            "not a lamina.drivers.base.Driver",
            hint=f"fix or uninstall {entry.origin}")
    return got


def factory_for_bundle(meta: dict[str, Any], registry: Registry | None = None) -> DriverFactory:
    """The factory of the driver that prepared a bundle (``lamina.json`` "driver";
    bundles made before drivers existed are ``copy``)."""
    return (registry or default_registry()).get(str(meta.get("driver") or "copy"))
