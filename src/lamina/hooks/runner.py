"""Run configured hooks: JSON on stdin, exit status as the answer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lamina.errors import HookError
from lamina.hooks.config import EVENTS, QUESTION_EVENTS, Hook, HookOptions, load_hooks

PROTOCOL_VERSION = 1
EXIT_HANDLED = 0
EXIT_DECLINED = 3
_STDERR_TAIL = 2000


@dataclass(frozen=True)
class HookResult:
    status: Literal["handled", "declined"]
    stdout: bytes = b""
    hook: str | None = None          # path of the hook that handled, if any


class HookRunner:
    """The hooks of one operation; ``run`` is a no-op without hooks for the event."""

    def __init__(self, hooks: Sequence[Hook]) -> None:
        self.hooks = list(hooks)

    @classmethod
    def load(cls, opts: HookOptions) -> HookRunner:
        return cls(load_hooks(opts))

    def configured(self, event: str) -> bool:
        return any(h.event == event for h in self.hooks)

    def run(self, event: str, doc: Mapping[str, Any]) -> HookResult:
        """Ask the matching hooks of *event* in order.

        Question events stop at the first ``handled``; the others run every
        matching hook and report ``handled`` if any did.  A failure raises
        :class:`HookError`.
        """
        if event not in EVENTS:
            raise ValueError(f"unknown hook event {event!r}")
        full: dict[str, Any] | None = None
        result = HookResult("declined")
        for h in self.hooks:
            if h.event != event or not h.matches(doc):
                continue
            if full is None:
                full = {"version": PROTOCOL_VERSION, "event": event, **doc}
            r = _run_one(h, full)
            if r.status == "handled":
                if event in QUESTION_EVENTS:
                    return r
                result = r
        return result


def _run_one(h: Hook, doc: dict[str, Any]) -> HookResult:
    env = dict(os.environ)
    env.update(h.env)
    env["LAMINA_HOOK_EVENT"] = h.event
    data = json.dumps(doc, sort_keys=True).encode()
    t0 = time.monotonic()
    try:
        # own session: a timeout kills the hook and everything it started
        proc = subprocess.Popen([h.path, *h.args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                start_new_session=True, close_fds=True)
    except OSError as e:
        raise HookError(f"{h.event} hook {h.path} could not be started: {e.strerror}",
                        hint=f"check the hook configured in {h.source}") from None
    try:
        out, err = proc.communicate(data, timeout=h.timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        _, err = proc.communicate()
        raise HookError(
            f"{h.event} hook {h.path} timed out after {h.timeout:g}s{_tail(err)}",
            hint=f"raise 'timeout' for this hook in {h.source} or fix the hook") from None
    except BaseException:
        _kill_group(proc)  # Ctrl-C / SIGTERM: do not leave the hook running
        proc.wait()
        raise
    rc = proc.returncode
    if rc == EXIT_HANDLED:
        return HookResult("handled", out, h.path)
    if rc == EXIT_DECLINED:
        return HookResult("declined", out, None)
    what = (f"was killed by signal {-rc}" if rc < 0 else f"failed with exit status {rc}")
    raise HookError(
        f"{h.event} hook {h.path} {what} after {time.monotonic() - t0:.1f}s{_tail(err)}",
        hint=f"exit {EXIT_HANDLED} = handled, {EXIT_DECLINED} = declined, anything else "
             f"aborts; the hook is configured in {h.source}")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(err: bytes | None) -> str:
    text = (err or b"").decode("utf-8", "replace").strip()
    if not text:
        return ""
    if len(text) > _STDERR_TAIL:
        text = "..." + text[-_STDERR_TAIL:]
    return ":\n" + text


def parse_paths(out: bytes, *, source: str = "hook") -> list[str]:
    """The NUL-separated rootfs-relative paths of a ``repack.delta-list`` answer.

    A leading ``./`` is dropped (``find . -print0`` output); absolute paths,
    ``..``, ``.`` and empty components are refused.  Duplicates are dropped.
    """
    seen: dict[str, None] = {}
    for raw in out.split(b"\0"):
        if not raw:
            continue
        p = raw.decode("utf-8", "surrogateescape")
        while p.startswith("./"):
            p = p[2:]
        if p in (".", ""):
            continue  # the rootfs itself: always compared anyway
        p = p.rstrip("/") if p.endswith("/") and p.strip("/") else p
        if p.startswith("/") or any(c in ("", ".", "..") for c in p.split("/")):
            raise HookError(f"{source} answered an invalid path {p!r}",
                            hint="delta-list paths are relative to the rootfs, NUL-separated, "
                                 "without '..' or empty components")
        seen[p] = None
    return list(seen)
