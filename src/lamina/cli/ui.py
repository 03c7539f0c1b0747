"""Terminal rendering: rich progress and errors on stderr, JSON on stdout."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from lamina.bundle import Progress as ProgressHooks
from lamina.errors import LaminaError


class UI:
    def __init__(self, *, json_mode: bool = False, quiet: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet or json_mode
        # soft_wrap: a message piped to a log stays on one line (rich wraps at 80 otherwise)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)

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
        if self.quiet or not self.err.is_terminal:
            return _Quiet(self)
        return _Bar(self, label)


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
        self.p = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                          TransferSpeedColumn(), TimeRemainingColumn(), console=ui.err,
                          transient=True)
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
