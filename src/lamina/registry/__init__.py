"""Registry client: pull images into a blob sink, push them from a layout, and read
remote blob ranges (OCI distribution spec).

Public API::

    from lamina.registry import LayoutSink, PullOptions, PushOptions, RegistryRef
    from lamina.registry.pull import pull
    from lamina.registry.push import push

    ref = RegistryRef.parse("127.0.0.1:5000/app:1.0")
    pull(PullOptions(ref, tag="1.0"), LayoutSink.init("oci"), progress) -> PullResult
    push(PushOptions(ImageRef.parse("oci:1.0"), ref), progress) -> PushResult
    RemoteBlobSource(ref, RegistryOptions()).read_range(digest, start, length)

(``pull`` and ``push`` are functions of the submodules of the same names, which
shadow them as attributes of this package.)

:class:`BlobSink` is the seam for other destinations (the store).

Names are imported on first use: every lamina command imports
``lamina.registry.progress`` (through the CLI's UI), and httpx alone costs a
tenth of a second of start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lamina.registry.auth import Credentials
    from lamina.registry.client import RegistryClient, RegistryOptions
    from lamina.registry.progress import TransferProgress
    from lamina.registry.pull import PullOptions, PullResult
    from lamina.registry.push import PushOptions, PushResult
    from lamina.registry.reference import RegistryRef
    from lamina.registry.remote import RemoteBlobSource
    from lamina.registry.sink import BlobSink, LayoutSink, PartialBlob

_WHERE = {
    "Credentials": "auth",
    "RegistryClient": "client", "RegistryOptions": "client",
    "TransferProgress": "progress",
    "PullOptions": "pull", "PullResult": "pull",
    "PushOptions": "push", "PushResult": "push",
    "RegistryRef": "reference",
    "RemoteBlobSource": "remote",
    "BlobSink": "sink", "LayoutSink": "sink", "PartialBlob": "sink",
}

__all__ = [
    "BlobSink", "Credentials", "LayoutSink", "PartialBlob", "PullOptions", "PullResult",
    "PushOptions", "PushResult", "RegistryClient", "RegistryOptions", "RegistryRef",
    "RemoteBlobSource", "TransferProgress",
]


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'lamina.registry' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lamina.registry.{mod}"), name)
