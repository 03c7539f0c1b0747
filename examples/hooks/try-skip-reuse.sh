#!/bin/sh
# layer.try-skip hook: reuse a root filesystem another tool already extracted.
#
# The other tool keeps one directory per ChainID, holding the image's tree up to
# and including that layer (what `umoci raw unpack` of the image, or `tar -x` of
# a one-layer image, produces):
#
#     $REUSE_CACHE/<chain id hex>/        (default REUSE_CACHE=/var/cache/other-tool)
#
# lamina asks from the top layer down, with an empty rootfs; when a tree for the
# layer's chain id exists we copy it in (reflinks where the filesystem has them)
# and answer "handled", and lamina extracts only the layers above it.
#
# hooks.toml:
#     [["layer.try-skip"]]
#     path = "/usr/local/libexec/lamina/try-skip-reuse.sh"
#     env = { REUSE_CACHE = "/var/cache/other-tool" }
#
# Exit status: 0 handled, 3 declined, anything else failed (lamina aborts).
set -eu

HANDLED=0
DECLINED=3
cache=${REUSE_CACHE:-/var/cache/other-tool}

doc=$(cat)
field() { printf '%s' "$doc" | jq -er "$1"; }

# only the copy unpack path asks for a whole chain; other callers: not for us
[ "$(field '.scope // ""')" = chain ] || exit $DECLINED
# id-mapped or rootless trees differ from a plain extraction: let lamina do those
[ "$(field '.options.rootless')" = false ] || exit $DECLINED
[ "$(field '.options.uid_map | length')" = 0 ] || exit $DECLINED
[ "$(field '.options.gid_map | length')" = 0 ] || exit $DECLINED

chain=$(field .chain_id)
rootfs=$(field .rootfs)
case $chain in
    sha256:*) hex=${chain#sha256:} ;;
    *) exit $DECLINED ;;
esac
case $hex in
    *[!0-9a-f]* | "") echo "bad chain id $chain" >&2; exit 1 ;;
esac

src=$cache/$hex
[ -d "$src" ] && [ ! -L "$src" ] || exit $DECLINED

# -a keeps owners, modes, times, links, devices and xattrs; a failure half-way
# exits non-zero and lamina throws the staged bundle away
cp -a --reflink=auto -- "$src/." "$rootfs/"
echo "reused $src for layer $(field .index) of $(field .manifest)" >&2
exit $HANDLED
