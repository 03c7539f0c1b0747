"""Options shared by ``lamina pull`` and ``lamina push``: TLS, credentials, concurrency."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from lamina.errors import UsageError

if TYPE_CHECKING:
    from lamina.registry.client import RegistryOptions


def add_registry_args(p: argparse.ArgumentParser, *, transfers: bool = True) -> None:
    """The connection options; with *transfers* also --jobs, --quiet and --json (commands
    that have their own --quiet/--json and move no whole blobs pass False)."""
    g = p.add_argument_group("registry connection")
    g.add_argument("--insecure", action="store_true",
                   help="plain http instead of https (loopback registries only)")
    g.add_argument("--force-insecure", action="store_true",
                   help="allow plain http to a registry that is not on this machine")
    g.add_argument("--ca-cert", metavar="FILE",
                   help="PEM file of CA certificates to trust for the registry's TLS")
    g.add_argument("--creds", metavar="USER:PASSWORD",
                   help="credentials (visible to other users in 'ps': prefer --authfile or "
                        "the LAMINA_CREDS environment variable)")
    g.add_argument("--authfile", metavar="FILE",
                   help="containers-auth.json / docker config.json with credentials "
                        "(default: REGISTRY_AUTH_FILE, then podman's and docker's files)")
    g.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="give up on a request that makes no progress for this long "
                        "(default: 60)")
    if not transfers:
        p.set_defaults(jobs=4)
        return
    p.add_argument("-j", "--jobs", type=int, default=4, metavar="N",
                   help="blobs transferred at the same time (default: 4)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or summary")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


def registry_options(args: argparse.Namespace) -> RegistryOptions:
    from lamina.registry.auth import Credentials
    from lamina.registry.client import RegistryOptions

    if not 1 <= args.jobs <= 64:
        raise UsageError(f"--jobs {args.jobs}: expected 1 to 64")
    if args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout}: must be positive")
    return RegistryOptions(
        insecure=args.insecure,
        force_insecure=args.force_insecure,
        ca_cert=args.ca_cert,
        creds=Credentials.parse(args.creds) if args.creds is not None else None,
        authfile=args.authfile,
        timeout=args.timeout,
        connections=args.jobs + 2,
    )
