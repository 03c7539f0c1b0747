"""Identifiers: OCI ChainIDs and the store's ``NAME:TAG`` ref names."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from lamina.errors import UsageError

DEFAULT_TAG = "latest"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]{0,254}$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


def chain_id(parent: str | None, diff_id: str) -> str:
    """The image-spec's ChainID: ``DiffID`` for the bottom layer, else
    ``sha256(parent_chain_id + " " + diff_id)`` (both as ``sha256:<hex>`` text)."""
    if parent is None:
        return diff_id
    return "sha256:" + hashlib.sha256(f"{parent} {diff_id}".encode()).hexdigest()


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The ChainID of every prefix of *diff_ids* (bottom layer first)."""
    out: list[str] = []
    parent: str | None = None
    for d in diff_ids:
        parent = chain_id(parent, d)
        out.append(parent)
    return out


def parse_ref(text: str) -> str:
    """Normalise ``NAME[:TAG]`` to ``NAME:TAG`` (tag ``latest`` by default).

    The tag is what follows the last ':' after the last '/', so a registry
    port (``host:5000/app``) stays part of the name.
    """
    head, sep, tail = text.rpartition(":")
    if sep and head and "/" not in tail:
        name, tag = head, tail
    else:
        name, tag = text, DEFAULT_TAG
    if not _NAME_RE.match(name) or name.endswith(":"):
        raise UsageError(f"invalid image name {name!r}",
                         hint="use letters, digits and . _ - / (e.g. app or library/app:1.0)")
    if not _TAG_RE.match(tag):
        raise UsageError(f"invalid tag {tag!r} in {text!r}",
                         hint="a tag is up to 128 of letters, digits, '.', '_' and '-'")
    return f"{name}:{tag}"


def check_driver(driver: str) -> str:
    if not re.match(r"^[a-z0-9][a-z0-9_-]{0,63}$", driver):
        raise UsageError(f"invalid driver name {driver!r}",
                         hint="driver names are lowercase letters, digits, '_' and '-'")
    return driver


def hex_of(digest: str) -> str:
    """The hex part of a ``sha256:<hex>`` digest (validated: it names files)."""
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
        raise UsageError(f"not a sha256 digest: {digest!r}",
                         hint="digests look like sha256:<64 lowercase hex digits>")
    return hexd
