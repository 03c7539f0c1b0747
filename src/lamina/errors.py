"""Error classes with a stable exit code and a hint.

Modelled on pip's ``DiagnosticPipError``: every failure a user can cause or fix
is a :class:`LaminaError` subclass carrying a machine-stable ``code`` (used as
the process exit status and in ``--json`` output), a one-line ``message`` and an
optional ``hint`` saying what to do about it.  Library code raises these; only
``lamina.cli`` renders them.

Exit codes are part of the public interface and never change meaning:

====  ======================  ==============================================
code  class                   meaning
====  ======================  ==============================================
1     (unexpected)            a bug: anything that is not a LaminaError
2     UsageError              bad command line or option value
3     NotFoundError           image, tag, blob or platform not present
4     ImageFormatError        malformed index/manifest/config JSON
5     DigestMismatchError     a blob or diff_id does not match its digest
6     CorruptLayerError       bad compression, truncated or malformed tar
7     UnsafeLayerError        path traversal, link breakout, hostile name
8     BundleError             target bundle exists or cannot be written
9     UnsupportedError        media type / tar feature lamina does not handle
10    EnvironmentError_       the host lacks a privilege or kernel feature
11    RegistryError           a registry refused, failed or could not be reached
12    HookError               a configured hook failed, timed out or is misconfigured
====  ======================  ==============================================
"""

from __future__ import annotations


class LaminaError(Exception):
    """Base class: a failure with a stable exit code, a message and a hint."""

    code: int = 1
    kind: str = "error"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def to_json(self) -> dict[str, object]:
        return {"error": self.kind, "code": self.code, "message": self.message,
                "hint": self.hint}


class UsageError(LaminaError):
    code = 2
    kind = "usage"


class NotFoundError(LaminaError):
    code = 3
    kind = "not-found"


class ImageFormatError(LaminaError):
    code = 4
    kind = "image-format"


class DigestMismatchError(LaminaError):
    code = 5
    kind = "digest-mismatch"


class CorruptLayerError(LaminaError):
    code = 6
    kind = "corrupt-layer"


class UnsafeLayerError(LaminaError):
    code = 7
    kind = "unsafe-layer"


class BundleError(LaminaError):
    code = 8
    kind = "bundle"


class UnsupportedError(LaminaError):
    code = 9
    kind = "unsupported"


class EnvironmentError_(LaminaError):
    code = 10
    kind = "environment"


class RegistryError(LaminaError):
    code = 11
    kind = "registry"


class HookError(LaminaError):
    code = 12
    kind = "hook"
