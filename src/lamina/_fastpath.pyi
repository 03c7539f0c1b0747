from typing import Any

def extract_files(buf: bytes, pos: int, dirs: dict[str, tuple[int, str]], stale: list[int],
                  limit: int, hashes: dict[str, bytes], layer_paths: set[str],
                  dir_meta: dict[str, tuple[int, int]], rootless: bool, euid: int, egid: int,
                  umask: int, /) -> tuple[int, int, int, int, list[str], int]: ...
def snapshot_rows(dir_fd: int, hashes: dict[str, bytes], /) -> list[tuple[object, ...]]: ...
def replay_tree(root_fd: int, objects_fd: int, farm_fds: list[int], entries: list[tuple[
                    str, str, int, int, int, int, tuple[tuple[bytes, bytes], ...], object, int,
                    bytes | None]],
                copy_only: bool, rootless: bool, euid: int, egid: int, umask: int,
                hashes: dict[str, bytes], dir_meta: dict[str, tuple[int, int]],
                final_dirs: bool = False, /
                ) -> tuple[int, int, int, list[tuple[str, bytes, int]]]: ...
def place_files(buf: bytes, pos: int, dirs: dict[str, tuple[int, str]], stale: list[int],
                limit: int, hashes: dict[str, bytes], layer_paths: set[str],
                dir_meta: dict[str, tuple[int, int]], rootless: bool, euid: int, egid: int,
                umask: int, files: list[Any], fi: int, objects_fd: int, copy_only: bool,
                farm_fd: int, farm_key: bytes, adopt: bool, /) -> tuple[
                    int, int, int, int, list[str], int, int, int, int, int, list[str], int]: ...
def link_objects(src_objects_fd: int, dst_subdir_fds: list[int], hexes: list[str], /
                 ) -> list[int]: ...
