"""lamina: store, unpack, repack and serve OCI image layers through pluggable storage backends."""

__version__ = "0.1.0"
