"""Registry credentials and authentication challenges.

A registry answers an unauthenticated request with ``401`` and a
``WWW-Authenticate`` header (RFC 7235).  With ``Basic`` the client resends the
request with the user's credentials; with ``Bearer`` it asks the token server
named by ``realm`` for a token covering ``service`` and ``scope`` (sending the
credentials as basic auth, or nothing for anonymous pulls) and resends the
request with ``Authorization: Bearer TOKEN`` (the distribution spec's token
authentication).

Credentials come, first match wins, from ``--creds USER:PASS``, the
``LAMINA_CREDS`` environment variable, ``--authfile FILE``, the file named by
``REGISTRY_AUTH_FILE``, then the default files of podman/skopeo
(``$XDG_RUNTIME_DIR/containers/auth.json``, ``~/.config/containers/auth.json``)
and docker (``~/.docker/config.json``).  Those files map a registry (or a
``registry/namespace`` prefix, the longest match wins) to
``{"auth": base64("user:password")}``; credential helpers are not run.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field

from lamina.errors import UsageError

ENV_CREDS = "LAMINA_CREDS"
ENV_AUTHFILE = "REGISTRY_AUTH_FILE"


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    identity_token: str | None = field(default=None, repr=False)  # docker's OAuth refresh token

    @classmethod
    def parse(cls, text: str, what: str = "--creds") -> Credentials:
        user, sep, password = text.partition(":")
        if not sep or not user:
            raise UsageError(f"{what}: expected USER:PASSWORD",
                             hint="the password may contain ':'; the user name may not")
        return cls(user, password)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class Challenge:
    scheme: str                  # lower-case: "basic", "bearer", ...
    params: dict[str, str]

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def parse_challenges(header: str) -> list[Challenge]:
    """Parse one ``WWW-Authenticate`` value, which may hold several challenges::

        Bearer realm="https://auth.example/token",service="reg",scope="repository:a:pull"
        Basic realm="Registry", Bearer realm="x"

    Parameter names are lower-cased; quoted values are unescaped.  A token68
    (``Negotiate abc==``) is kept as the parameter ``""``.
    """
    out: list[Challenge] = []
    i, n = 0, len(header)

    def skip(chars: str) -> None:
        nonlocal i
        while i < n and header[i] in chars:
            i += 1

    def token() -> str:
        nonlocal i
        start = i
        while i < n and header[i] not in ' \t,="':
            i += 1
        return header[start:i]

    def quoted() -> str:
        nonlocal i
        i += 1  # opening quote
        buf: list[str] = []
        while i < n and header[i] != '"':
            if header[i] == "\\" and i + 1 < n:
                i += 1
            buf.append(header[i])
            i += 1
        i += 1  # closing quote (or end of input)
        return "".join(buf)

    while i < n:
        skip(" \t,")
        if i >= n:
            break
        word = token()
        if not word:  # stray character: skip it
            i += 1
            continue
        j = i
        while j < n and header[j] in " \t":
            j += 1
        if j < n and header[j] == "=" and out:
            # a parameter of the current challenge
            i = j + 1
            skip(" \t")
            value = quoted() if i < n and header[i] == '"' else token()
            out[-1].params[word.lower()] = value
            continue
        out.append(Challenge(word.lower(), {}))
        skip(" \t")
        # token68: a bare value after the scheme, possibly ending in '=' padding
        start = i
        t68 = token()
        if t68:
            k = i
            while k < n and header[k] == "=":
                k += 1
            rest = header[k:].lstrip(" \t")
            if not rest or rest.startswith(","):
                out[-1].params[""] = t68 + header[i:k]
                i = k
            else:
                i = start  # it was the first parameter's name
    return out


def pick_challenge(challenges: list[Challenge]) -> Challenge | None:
    """The challenge lamina can answer: Bearer preferred, then Basic."""
    for scheme in ("bearer", "basic"):
        for c in challenges:
            if c.scheme == scheme:
                return c
    return None


# -- auth files -------------------------------------------------------------------------


def default_authfiles() -> list[str]:
    home = os.path.expanduser("~")
    files = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        files.append(os.path.join(runtime, "containers", "auth.json"))
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    files.append(os.path.join(xdg, "containers", "auth.json"))
    docker = os.environ.get("DOCKER_CONFIG") or os.path.join(home, ".docker")
    files.append(os.path.join(docker, "config.json"))
    return files


def _normalize_key(key: str) -> str:
    k = key.removeprefix("https://").removeprefix("http://").rstrip("/")
    # docker writes Docker Hub as "https://index.docker.io/v1/"
    if k.endswith("/v1") or k.endswith("/v2"):
        k = k[:-3]
    if k in ("index.docker.io", "registry-1.docker.io"):
        k = "docker.io"
    return k


def lookup_authfile(path: str, registry: str, repository: str,
                    *, required: bool = False) -> Credentials | None:
    """Credentials for ``registry/repository`` from a containers-auth.json or docker
    config.json file; a missing file is an error only when *required*."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(1 << 20))
    except FileNotFoundError:
        if required:
            raise UsageError(f"auth file {path} does not exist") from None
        return None
    except (OSError, ValueError) as e:
        raise UsageError(f"auth file {path}: {e}",
                         hint="expected JSON like {\"auths\": {\"HOST\": {\"auth\": "
                              "\"base64(user:password)\"}}}") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        if required:
            raise UsageError(f"auth file {path} has no \"auths\" object")
        return None
    full = f"{registry}/{repository}"
    best: tuple[int, dict[str, object]] | None = None
    for key, entry in auths.items():
        if not isinstance(key, str) or not isinstance(entry, dict):
            continue
        k = _normalize_key(key)
        matches = full == k or full.startswith(k + "/") or k == registry
        if matches and (best is None or len(k) > best[0]):
            best = (len(k), entry)
    if best is None:
        return None
    entry = best[1]
    raw_ident = entry.get("identitytoken")
    ident = raw_ident if isinstance(raw_ident, str) and raw_ident else None
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            raw = base64.b64decode(auth, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise UsageError(f"auth file {path}: entry for {registry} is not "
                             "base64(user:password)") from None
        user, _, password = raw.partition(":")
        return Credentials(user, password, ident)
    u, p = entry.get("username"), entry.get("password")
    if isinstance(u, str) and isinstance(p, str):
        return Credentials(u, p, ident)
    if ident:
        return Credentials("<token>", "", ident)
    return None


def resolve_credentials(registry: str, repository: str, *, creds: Credentials | None = None,
                        authfile: str | None = None) -> Credentials | None:
    """Credentials in the documented order of precedence, or ``None`` (anonymous)."""
    if creds is not None:
        return creds
    env = os.environ.get(ENV_CREDS)
    if env:
        return Credentials.parse(env, ENV_CREDS)
    if authfile:
        return lookup_authfile(authfile, registry, repository, required=True)
    env_file = os.environ.get(ENV_AUTHFILE)
    if env_file:
        return lookup_authfile(env_file, registry, repository, required=True)
    for path in default_authfiles():
        found = lookup_authfile(path, registry, repository)
        if found is not None:
            return found
    return None
