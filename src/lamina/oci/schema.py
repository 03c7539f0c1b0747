"""Validate OCI documents against the image-spec's own JSON schemas.

The schemas (``lamina/oci/schemas/*.json``, image-spec v1.1.1, see the README
there) are draft-04 JSON schemas that ``$ref`` each other by relative file
name under several different base URIs.  They are resolved offline through a
:class:`referencing.Registry` whose retriever maps any URI to the shipped file
of the same name, as the image-spec's Go validator does.

:func:`validate` is called on every manifest, config and index lamina writes;
a failure is an :class:`~lamina.errors.ImageFormatError`, which there means
lamina (or an input document it carried fields over from) is at fault.
"""

from __future__ import annotations

import copy
import datetime as _dt
import functools
import json
import os
import re
from importlib import resources
from typing import TYPE_CHECKING, Any

from lamina.errors import ImageFormatError
from lamina.oci import mediatypes as mt

if TYPE_CHECKING:  # jsonschema is imported on first use: read-only commands never pay for it
    from jsonschema import Draft4Validator
    from jsonschema.exceptions import ValidationError
    from referencing import Resource

#: pseudo media type for the ``oci-layout`` marker file
LAYOUT_FILE = "oci-layout"

#: media type -> schema file that validates it
SCHEMAS: dict[str, str] = {
    mt.MANIFEST: "image-manifest-schema.json",
    mt.DOCKER_MANIFEST: "image-manifest-schema.json",
    mt.INDEX: "image-index-schema.json",
    mt.DOCKER_MANIFEST_LIST: "image-index-schema.json",
    mt.CONFIG: "config-schema.json",
    mt.DOCKER_CONFIG: "config-schema.json",
    LAYOUT_FILE: "image-layout-schema.json",
}

_FILES = frozenset({
    "config-schema.json", "content-descriptor.json", "defs-descriptor.json", "defs.json",
    "image-index-schema.json", "image-layout-schema.json", "image-manifest-schema.json",
})

_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})$")


def is_date_time(value: object) -> bool:
    """Whether *value* is an RFC 3339 date-time (the schemas' ``format: date-time``)."""
    if not isinstance(value, str) or not _RFC3339.match(value):
        return False
    try:
        _dt.datetime.fromisoformat(value.upper())
    except ValueError:
        return False
    return True


@functools.cache
def load_schema(name: str) -> dict[str, Any]:
    """The parsed schema file *name* as shipped (unmodified)."""
    if name not in _FILES:
        raise KeyError(name)
    text = resources.files("lamina.oci").joinpath("schemas", name).read_text("utf-8")
    doc = json.loads(text)
    assert isinstance(doc, dict)
    return doc


def _retrieve(uri: str) -> Resource[Any]:
    from referencing.jsonschema import DRAFT4

    name = uri.split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    if name not in _FILES:
        raise KeyError(f"no shipped schema for {uri}")  # Unretrievable to referencing
    return DRAFT4.create_resource(load_schema(name))


@functools.cache
def _validator(name: str) -> Draft4Validator:
    from jsonschema import Draft4Validator, FormatChecker
    from referencing import Registry

    formats = FormatChecker(formats=())
    formats.checks("date-time")(lambda v: not isinstance(v, str) or is_date_time(v))
    schema = load_schema(name)
    if name == "image-manifest-schema.json":
        # the spec's text says layers SHOULD be non-empty; empty images are legitimate
        schema = copy.deepcopy(schema)
        schema["properties"]["layers"].pop("minItems", None)
    registry: Registry[Any] = Registry(retrieve=_retrieve)  # type: ignore[call-arg]
    return Draft4Validator(schema, registry=registry, format_checker=formats)


def _where(e: ValidationError) -> str:
    out = ""
    for p in e.absolute_path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def errors(doc: object, media_type: str) -> list[str]:
    """Every schema violation of *doc* as ``path: message`` (empty when valid).

    Media types without a schema (layers, artifacts' configs) have no errors.
    """
    name = SCHEMAS.get(media_type)
    if name is None:
        return []
    found = sorted(_validator(name).iter_errors(doc), key=lambda e: list(map(str, e.path)))
    return [f"{_where(e)}: {e.message}" for e in found]


def check_derived() -> bool:
    """Whether to validate documents lamina derives mechanically from verified ones
    (repack's config and manifest, index.json updates, copies): ``LAMINA_VALIDATE=1``.

    Off by default: importing jsonschema and building a validator costs ~0.25 s,
    more than a whole overlay repack, to re-check documents typed code assembled.
    The test suite turns it on, so every document any test writes is checked.
    Documents carrying user input (the editing commands) are always validated.
    """
    return os.environ.get("LAMINA_VALIDATE", "") == "1"


def validate(doc: object, media_type: str) -> bool:
    """Raise :class:`ImageFormatError` unless *doc* is valid for *media_type*.

    Returns whether a schema was checked (False for media types that have none).
    """
    if media_type not in SCHEMAS:
        return False
    problems = errors(doc, media_type)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ImageFormatError(
            f"refusing to write an invalid {media_type} document: "
            f"{'; '.join(problems[:3])}{more}",
            hint="this is a lamina bug, or the input image already had this invalid field; "
                 "please report it with the command that failed")
    return True
