"""Layer streams: splitdirfdstream (tar metadata + references to files on disk)."""
