"""OCI and Docker media types lamina understands."""

from __future__ import annotations

OCI_LAYOUT_VERSION = "1.0.0"

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
LAYER_ND_TAR = "application/vnd.oci.image.layer.nondistributable.v1.tar"
LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

INDEX_TYPES = frozenset({INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({MANIFEST, DOCKER_MANIFEST})

#: layer media type -> compression name ("none", "gzip", "zstd")
LAYER_COMPRESSION: dict[str, str] = {
    LAYER_TAR: "none",
    LAYER_ND_TAR: "none",
    LAYER_GZIP: "gzip",
    LAYER_ND_GZIP: "gzip",
    DOCKER_LAYER_GZIP: "gzip",
    DOCKER_LAYER_FOREIGN: "gzip",
    LAYER_ZSTD: "zstd",
    LAYER_ND_ZSTD: "zstd",
}

COMPRESSION_LAYER_TYPE = {"none": LAYER_TAR, "gzip": LAYER_GZIP, "zstd": LAYER_ZSTD}

REF_NAME = "org.opencontainers.image.ref.name"
