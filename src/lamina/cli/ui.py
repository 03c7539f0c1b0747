"""Terminal rendering: rich progress and errors on stderr, JSON on stdout."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

from lamina.errors import LaminaError
from lamina.progress import Progress as ProgressHooks
from lamina.registry.progress import TransferProgress

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID


def _new_progress(console: Console) -> Progress:
    # rich is imported on first use: a --quiet run never pays for it
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                    transient=True)


class UI:
    def __init__(self, *, json_mode: bool = False, quiet: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet or json_mode
        self._err: Console | None = None

    @property
    def err(self) -> Console:
        if self._err is None:
            from rich.console import Console
            # soft_wrap: a message piped to a log stays on one line (rich wraps at 80)
            self._err = Console(stderr=True, highlight=False, soft_wrap=True)
        return self._err

    def emit_json(self, obj: Any) -> None:
        sys.stdout.write(json.dumps(obj, indent=None, sort_keys=True) + "\n")
        sys.stdout.flush()

    def info(self, text: str) -> None:
        if not self.quiet:
            self.err.print(text)

    def warn(self, text: str) -> None:
        if not self.json_mode:
            self.err.print(f"[yellow]warning:[/] {text}", markup=True, highlight=False)

    def error(self, e: LaminaError) -> None:
        if self.json_mode:
            self.emit_json(e.to_json())
            return
        self.err.print(f"[bold red]error:[/] {_esc(e.message)}")
        if e.hint:
            self.err.print(f"[cyan]hint:[/] {_esc(e.hint)}")

    def interrupted(self) -> None:
        if self.json_mode:
            self.emit_json({"error": "interrupted", "code": 130, "message": "interrupted",
                            "hint": None})
        else:
            self.err.print("[bold red]interrupted[/]: nothing was left half-written")

    def progress(self, label: str) -> ProgressHooks:
        if self.quiet or not sys.stderr.isatty():
            return _Quiet(self)
        return _Bar(self, label)

    def transfer(self, label: str) -> TransferProgress:
        """Progress of a pull or push: a total bar and one bar per blob in flight."""
        if self.quiet or not sys.stderr.isatty():
            return _QuietTransfer(self)
        return _TransferBar(self, label)


def _esc(text: str) -> str:
    from rich.markup import escape
    return escape(text)


class _Quiet(ProgressHooks):
    def __init__(self, ui: UI) -> None:
        self.ui = ui

    def warn(self, message: str) -> None:
        self.ui.warn(message)


class _Bar(ProgressHooks):
    def __init__(self, ui: UI, label: str) -> None:
        self.ui = ui
        self.label = label
        self.p = _new_progress(ui.err)
        self.task: TaskID | None = None
        self.layers = 0

    def start(self, total_bytes: int, layers: int) -> None:
        self.layers = layers
        self.p.start()
        self.task = self.p.add_task(f"{self.label} layer 1/{layers}", total=total_bytes)

    def advance(self, nbytes: int) -> None:  # called from the decoder thread
        if self.task is not None:
            self.p.advance(self.task, nbytes)

    def layer_done(self, index: int) -> None:
        if self.task is not None:
            n = min(index + 2, self.layers)
            self.p.update(self.task, description=f"{self.label} layer {n}/{self.layers}")
            if index + 1 == self.layers:
                self.p.stop()

    def warn(self, message: str) -> None:
        self.p.console.print(f"[yellow]warning:[/] {_esc(message)}")

    def __del__(self) -> None:
        self.p.stop()


class _QuietTransfer(TransferProgress):
    def __init__(self, ui: UI) -> None:
        self.ui = ui

    def warn(self, message: str) -> None:
        self.ui.warn(message)


class _TransferBar(TransferProgress):
    """Called from the transfer threads; rich's Progress takes its own lock."""

    def __init__(self, ui: UI, label: str) -> None:
        self.label = label
        self.p = _new_progress(ui.err)
        self.total: TaskID | None = None
        self.tasks: dict[str, TaskID] = {}
        self.blobs = 0
        self.done = 0

    def start(self, total_bytes: int, blobs: int) -> None:
        self.blobs = blobs
        if blobs:
            self.p.start()
            self.total = self.p.add_task(f"{self.label} 0/{blobs} blobs", total=total_bytes)

    def blob_start(self, digest: str, size: int) -> None:
        self.tasks[digest] = self.p.add_task(f"  {digest[7:19]}", total=size)

    def advance(self, digest: str, nbytes: int) -> None:
        task = self.tasks.get(digest)
        if task is not None:
            self.p.advance(task, nbytes)
        if self.total is not None:
            self.p.advance(self.total, nbytes)

    def blob_done(self, digest: str) -> None:
        self.done += 1
        task = self.tasks.pop(digest, None)
        if task is not None:
            self.p.remove_task(task)
        if self.total is not None:
            self.p.update(self.total, description=f"{self.label} {self.done}/{self.blobs} blobs")

    def warn(self, message: str) -> None:
        self.p.console.print(f"[yellow]warning:[/] {_esc(message)}")

    def finish(self) -> None:
        self.p.stop()
