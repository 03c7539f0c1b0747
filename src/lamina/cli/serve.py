"""``lamina serve``: the io.lamina.Store varlink service on a unix socket."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any

from lamina.cli.common import open_store, store_arg
from lamina.cli.ui import UI
from lamina.errors import UsageError
from lamina.ipc.backend import LayoutBackend, StoreBackend
from lamina.ipc.service import ServerOptions, VarlinkServer
from lamina.ipc.store import StoreService


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "serve", help="serve a store or layout over varlink (io.lamina.Store)",
        description="Listen on a unix socket and answer io.lamina.Store varlink calls "
                    "(list, inspect, get/put layers as splitdirfdstream with fd passing, "
                    "finalize, unpack, gc) for the local store (default) or LAYOUT until "
                    "SIGTERM or SIGINT.  A store hands out its objects directory and blobs as "
                    "descriptors, so clients on the same reflink filesystem clone them.  "
                    "Only the server's own user and root may connect unless --allow-gid is "
                    "given.")
    p.add_argument("--socket", required=True, metavar="PATH", help="unix socket to create")
    store_arg(p)
    p.add_argument("--layout", metavar="LAYOUT", help="serve an OCI image layout instead")
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
    if args.layout is not None and args.store is not None:
        raise UsageError("--store and --layout exclude each other", hint="serve one of them")
    backend: StoreBackend
    if args.layout is not None:
        backend = LayoutBackend(args.layout)
        what = backend.layout.path
    else:
        from lamina.ipc.store_backend import LocalStoreBackend
        store = open_store(args.store, create=True)
        backend = LocalStoreBackend(store)
        what = f"the store {store.path}"
    opts = ServerOptions(args.socket, mode=0o600 if args.allow_gid is None else 0o660,
                         allow_gid=args.allow_gid)
    log = logging.getLogger("lamina.ipc")
    log.addHandler(_ToUI(ui))
    log.setLevel(logging.INFO)
    log.propagate = False
    asyncio.run(_serve(opts, backend, what, ui))
    return 0


async def _serve(opts: ServerOptions, backend: StoreBackend, what: str, ui: UI) -> None:
    service = StoreService(backend)
    server = VarlinkServer(opts, [service.interface()])
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ui.info(f"serving {what} on {opts.socket_path}")
    try:
        await stop.wait()
    finally:
        await server.close()
        await service.close()
    ui.info("stopped")
