"""Registry image references: ``REGISTRY/REPO[:TAG][@DIGEST]``.

The grammar is the distribution project's: the first path component is the
registry when it looks like a host (has a ``.`` or a ``:``, or is
``localhost``); otherwise the reference is on Docker Hub (``docker.io``), where
a one-component name lives under ``library/``.  A leading ``docker://`` (as
skopeo writes it) is accepted.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from lamina.errors import ImageFormatError, UsageError
from lamina.oci.model import check_digest

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST_RE = re.compile(
    r"^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)(?::[0-9]{1,5})?$")
_HINT = "write REGISTRY/REPO[:TAG][@sha256:DIGEST], e.g. 127.0.0.1:5000/app:1.0"


@dataclass(frozen=True)
class RegistryRef:
    registry: str            # host[:port] as the user wrote it (docker.io for Docker Hub)
    repository: str          # path below /v2/, e.g. library/debian
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> RegistryRef:
        s = text.removeprefix("docker://")
        if not s or any(c.isspace() for c in s):
            raise UsageError(f"bad image reference {text!r}", hint=_HINT)
        name, at, digest = s.partition("@")
        dig: str | None = None
        if at:
            try:
                dig = check_digest(digest, f"image reference {text!r}")
            except ImageFormatError as e:
                raise UsageError(f"bad digest in {text!r}", hint=_HINT) from e
        tag: str | None = None
        head, colon, tail = name.rpartition(":")
        if colon and "/" not in tail and head:
            if not _TAG_RE.match(tail):
                raise UsageError(f"bad tag {tail!r} in {text!r}", hint=_HINT)
            name, tag = head, tail
        first, slash, rest = name.partition("/")
        if slash and ("." in first or ":" in first or first == "localhost"
                      or first.startswith("[")):
            registry, repo = first, rest
            if not _HOST_RE.match(registry):
                raise UsageError(f"bad registry host {registry!r} in {text!r}", hint=_HINT)
        else:
            registry, repo = DOCKER_HUB, name
            if "/" not in repo:
                repo = "library/" + repo
        if registry in ("index.docker.io", "registry-1.docker.io"):
            registry = DOCKER_HUB
        if not _REPO_RE.match(repo) or len(repo) > 255:
            raise UsageError(f"bad repository name {repo!r} in {text!r}",
                             hint="repository names are lowercase letters, digits and "
                                  "separators (. _ __ -) in /-separated components")
        return cls(registry, repo, tag, dig)

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest if there is one, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def hostname(self) -> str:
        """The host without port or IPv6 brackets."""
        host = self.registry
        if host.startswith("["):
            return host[1:host.index("]")]
        return host.rsplit(":", 1)[0] if ":" in host else host

    def with_repository(self, repository: str) -> RegistryRef:
        return RegistryRef(self.registry, repository, self.tag, self.digest)

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals; names are not resolved, so
    what the answer allows cannot change with DNS."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
