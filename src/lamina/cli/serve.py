"""``lamina serve``: the io.lamina.Store varlink service on a unix socket."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any

from lamina.cli.ui import UI
from lamina.errors import UsageError
from lamina.ipc.backend import LayoutBackend
from lamina.ipc.service import ServerOptions, VarlinkServer
from lamina.ipc.store import StoreService


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "serve", help="serve a layout over varlink (io.lamina.Store)",
        description="Listen on a unix socket and answer io.lamina.Store varlink calls "
                    "(list, inspect, get/put layers as splitdirfdstream with fd passing, "
                    "finalize, unpack, gc) for LAYOUT until SIGTERM or SIGINT.  Only the "
                    "server's own user and root may connect unless --allow-gid is given.")
    p.add_argument("--socket", required=True, metavar="PATH", help="unix socket to create")
    p.add_argument("--layout", required=True, metavar="LAYOUT", help="OCI image layout")
    p.add_argument("--allow-gid", type=int, metavar="GID",
                   help="also admit peers in this group (socket mode becomes 0660)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(run=run)


class _ToUI(logging.Handler):
    def __init__(self, ui: UI) -> None:
        super().__init__(logging.INFO)
        self.ui = ui

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.ui.warn(text)
        else:
            self.ui.info(text)


def run(args: argparse.Namespace, ui: UI) -> int:
    if args.allow_gid is not None and args.allow_gid < 0:
        raise UsageError("--allow-gid must be a group id (>= 0)")
    backend = LayoutBackend(args.layout)
    opts = ServerOptions(args.socket, mode=0o600 if args.allow_gid is None else 0o660,
                         allow_gid=args.allow_gid)
    log = logging.getLogger("lamina.ipc")
    log.addHandler(_ToUI(ui))
    log.setLevel(logging.INFO)
    log.propagate = False
    asyncio.run(_serve(opts, backend, ui))
    return 0


async def _serve(opts: ServerOptions, backend: LayoutBackend, ui: UI) -> None:
    service = StoreService(backend)
    server = VarlinkServer(opts, [service.interface()])
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ui.info(f"serving {backend.layout.path} on {opts.socket_path}")
    try:
        await stop.wait()
    finally:
        await server.close()
        await service.close()
    ui.info("stopped")
