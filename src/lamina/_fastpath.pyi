def extract_files(buf: bytes, pos: int, dirs: dict[str, tuple[int, str]], stale: list[int],
                  limit: int, hashes: dict[str, bytes], layer_paths: set[str],
                  dir_meta: dict[str, tuple[int, int]], rootless: bool, euid: int, egid: int,
                  umask: int, /) -> tuple[int, int, int, int, list[str], int]: ...
