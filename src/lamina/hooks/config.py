"""Read and validate hooks.toml files (schema: see :mod:`lamina.hooks`)."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lamina.errors import HookError

EVENTS = ("layer.try-skip", "layer.pre-extract", "layer.post-extract", "repack.delta-list",
          "repack.refresh-bundle", "lookup")
#: events answered by the first hook that handles them; on the others every hook runs
QUESTION_EVENTS = frozenset({"layer.try-skip", "repack.delta-list", "lookup"})

DEFAULT_TIMEOUT = 60.0
_KEYS = {"path", "args", "timeout", "env", "when"}
_WHEN_KEYS = {"media_type", "annotations"}


@dataclass(frozen=True)
class HookOptions:
    files: tuple[str, ...] = ()     # --hooks FILE, after the default files
    system: bool = True             # also read /etc and $XDG_CONFIG_HOME hooks.toml


@dataclass(frozen=True)
class Hook:
    event: str
    path: str
    source: str                      # the TOML file it came from
    args: tuple[str, ...] = ()
    timeout: float = DEFAULT_TIMEOUT
    env: Mapping[str, str] = field(default_factory=dict)
    media_types: tuple[str, ...] = ()                 # glob patterns; empty: any
    annotations: Mapping[str, str] = field(default_factory=dict)  # key -> glob

    def matches(self, doc: Mapping[str, Any]) -> bool:
        """Whether the hook's ``when`` accepts this event document."""
        layer = doc.get("layer")
        if self.media_types:
            mtype = layer.get("mediaType") if isinstance(layer, Mapping) else None
            if not isinstance(mtype, str) or not any(
                    fnmatch.fnmatchcase(mtype, p) for p in self.media_types):
                return False
        if self.annotations:
            ann: dict[str, Any] = {}
            if isinstance(layer, Mapping) and isinstance(layer.get("annotations"), Mapping):
                ann.update(layer["annotations"])
            if isinstance(doc.get("annotations"), Mapping):
                ann.update(doc["annotations"])
            for k, pat in self.annotations.items():
                v = ann.get(k)
                if not isinstance(v, str) or not fnmatch.fnmatchcase(v, pat):
                    return False
        return True

    def to_json(self) -> dict[str, Any]:
        return {"event": self.event, "path": self.path, "args": list(self.args),
                "timeout": self.timeout, "env": dict(self.env), "source": self.source,
                "when": {"media_type": list(self.media_types),
                         "annotations": dict(self.annotations)},
                "executable": os.access(self.path, os.X_OK)}


def default_files() -> list[str]:
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return ["/etc/lamina/hooks.toml", os.path.join(xdg, "lamina", "hooks.toml")]


def load_hooks(opts: HookOptions) -> list[Hook]:
    """Every hook of every configured file, in order; a bad file is a HookError."""
    hooks: list[Hook] = []
    if opts.system:
        for f in default_files():
            if os.path.exists(f):
                hooks.extend(_load_file(f))
    for f in opts.files:
        if not os.path.exists(f):
            raise HookError(f"hooks file {f} does not exist",
                            hint="check the path given to --hooks")
        hooks.extend(_load_file(f))
    return hooks


def _check_owner(path: str, what: str) -> None:
    """Hooks run with lamina's privileges: refuse files other users could change."""
    st = os.stat(path)
    if st.st_uid not in (0, os.geteuid()):
        raise HookError(f"{what} {path} belongs to uid {st.st_uid}, not to root or the "
                        "user running lamina", hint="chown it, or remove it from the config")
    if st.st_mode & 0o022:
        raise HookError(f"{what} {path} is writable by other users",
                        hint=f"chmod go-w {path}")


def _load_file(path: str) -> list[Hook]:
    import tomllib  # only when a hooks file exists: most runs have none

    _check_owner(path, "hooks file")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise HookError(f"{path}: not valid TOML: {e}",
                        hint="see docs/plugins.md for the hooks.toml format") from None
    except OSError as e:
        raise HookError(f"cannot read hooks file {path}: {e.strerror}") from None
    hooks: list[Hook] = []
    for event, entries in data.items():
        if event not in EVENTS:
            raise HookError(f"{path}: unknown hook event {event!r}",
                            hint="events: " + ", ".join(EVENTS) + " (quote the name: "
                            f'[["{EVENTS[0]}"]])')
        if not isinstance(entries, list):
            raise HookError(f"{path}: {event} must be an array of tables",
                            hint=f'write each hook as [["{event}"]] followed by its keys')
        for i, entry in enumerate(entries):
            hooks.append(_hook(path, event, i, entry))
    return hooks


def _hook(source: str, event: str, i: int, e: Any) -> Hook:
    where = f"{source}: {event} hook {i + 1}"
    hint = "see docs/plugins.md for the hooks.toml format"
    if not isinstance(e, dict):
        raise HookError(f"{where} is not a table", hint=hint)
    unknown = set(e) - _KEYS
    if unknown:
        raise HookError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}",
                        hint="keys: " + ", ".join(sorted(_KEYS)))
    p = e.get("path")
    if not isinstance(p, str) or not p:
        raise HookError(f"{where}: 'path' (the executable) is required", hint=hint)
    path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(source)),
                                         os.path.expanduser(p)))
    if not os.path.isfile(path):
        raise HookError(f"{where}: executable {path} does not exist",
                        hint="install the hook or remove it from " + source)
    if not os.access(path, os.X_OK):
        raise HookError(f"{where}: {path} is not executable", hint=f"chmod +x {path}")
    _check_owner(path, f"{where}: executable")
    args = e.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise HookError(f"{where}: 'args' must be a list of strings", hint=hint)
    timeout = e.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise HookError(f"{where}: 'timeout' must be a positive number of seconds", hint=hint)
    env = e.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise HookError(f"{where}: 'env' must be a table of strings", hint=hint)
    when = e.get("when", {})
    if not isinstance(when, dict) or set(when) - _WHEN_KEYS:
        raise HookError(f"{where}: 'when' takes only media_type and annotations", hint=hint)
    mts = when.get("media_type", [])
    if isinstance(mts, str):
        mts = [mts]
    if not isinstance(mts, list) or not all(isinstance(m, str) for m in mts):
        raise HookError(f"{where}: when.media_type must be a string or list of strings",
                        hint=hint)
    ann = when.get("annotations", {})
    if not isinstance(ann, dict) or not all(isinstance(v, str) for v in ann.values()):
        raise HookError(f"{where}: when.annotations must be a table of strings "
                        "(glob patterns)", hint=hint)
    return Hook(event, path, source, tuple(args), float(timeout), dict(env), tuple(mts),
                dict(ann))

