"""Driver operations on existing bundles and on the registry, for the CLI."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from lamina.drivers.registry import Registry, default_registry, factory_for_bundle
from lamina.errors import BundleError, LaminaError

if TYPE_CHECKING:
    from lamina.drivers.base import Driver
    from lamina.layer.diff import Change


def bundle_meta(bundle: str) -> dict[str, Any] | None:
    """A bundle's ``lamina.json``, or None when *bundle* is not a lamina bundle."""
    try:
        with open(os.path.join(bundle, "lamina.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise BundleError(f"{bundle}/lamina.json is unreadable: {e}") from None
    return meta if isinstance(meta, dict) else None


@contextlib.contextmanager
def bundle_driver(bundle: str, registry: Registry | None = None, *,
                  store: str | None = None) -> Iterator[Driver | None]:
    """The driver that prepared *bundle* (None: not a lamina bundle), with its
    store (*store*, else the recorded one) open for the duration."""
    meta = bundle_meta(bundle)
    if meta is None:
        yield None
        return
    fac = factory_for_bundle(meta, registry)
    store_path = store or meta.get("store")
    if store_path and os.path.isdir(str(store_path)):
        from lamina.store import Store
        with Store.open(str(store_path), create=False) as opened:
            yield fac.open(bundle, meta, opened)
        return
    yield fac.open(bundle, meta, None)


def release_bundle(bundle: str, registry: Registry | None = None, *,
                   store: str | None = None) -> bool:
    """Remove a bundle's mounts (``lamina umount``); False when *bundle* is not a
    lamina bundle."""
    b = os.path.abspath(bundle)
    with bundle_driver(b, registry, store=store) as drv:
        if drv is None:
            return False
        drv.release(b)
        return True


def describe_drivers(store_path: str | None,
                     registry: Registry | None = None) -> list[dict[str, Any]]:
    """Every registered driver in claim order: origin, capabilities, whether it
    can run here (and why not).  A plugin that fails to load is listed with
    the failure as its reason."""
    out: list[dict[str, Any]] = []
    for entry in registry or default_registry():
        d: dict[str, Any] = {"name": entry.name, "origin": entry.origin,
                             "builtin": entry.builtin,
                             "target": entry.target if isinstance(entry.target, str) else ""}
        try:
            fac = entry.load()
            d["target"] = d["target"] or type(fac).__module__
            d["description"] = fac.description
            d["capabilities"] = fac.capabilities.to_json()
            reason = fac.check_here(store_path)
        except LaminaError as e:
            d.setdefault("description", "")
            d.setdefault("capabilities", {})
            reason = e.message
        except Exception as e:  # a plugin's bug must not hide the other drivers
            d.setdefault("description", "")
            d.setdefault("capabilities", {})
            reason = f"{type(e).__name__}: {e}"
        d["can_run"] = reason is None
        d["reason"] = reason
        out.append(d)
    return out


def driver_delta(bundle: str, meta: dict[str, Any]) -> tuple[list[Change], str] | None:
    """For repack: the changes the bundle's driver knows and the directory holding
    their content, or None (walk the rootfs against its snapshot)."""
    if str(meta.get("driver") or "copy") == "copy":
        return None
    with bundle_driver(bundle) as drv:
        if drv is None:
            return None
        changes = drv.delta_list(bundle)
        return None if changes is None else (changes, drv.delta_root(bundle))


def refresh_driver_bundle(bundle: str, meta: dict[str, Any]) -> dict[str, Any]:
    """For repack --refresh-bundle: let the driver make the current rootfs the new
    base; returns *meta* with what the driver changed in ``lamina.json``."""
    with bundle_driver(bundle) as drv:
        if drv is not None:
            drv.refresh(bundle)
    disk = bundle_meta(bundle) or {}
    # repack's in-memory record of the new image wins; the driver's own keys come from disk
    return {**disk, **{k: meta[k] for k in ("manifest", "config", "diff_ids", "layers")
                       if k in meta}}
