"""Where a store lives: a local path or any fsspec URL (`file://`, `memory://`, `s3://` with s3fs, ...)."""

from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from instructsae.errors import UserError, first_line


def filesystem(path: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file system a store lives on and its path there (local paths and file:// URLs: the local disk)."""
    try:
        return fsspec.core.url_to_fs(str(path))
    except (ImportError, ValueError) as error:  # an unknown protocol, or one whose package is missing
        raise UserError(f"cannot open store location {path}: {first_line(error)}") from None


def zarr_location(path: str | Path) -> str:
    """What zarr opens: a plain path on the local disk (zarr's own LocalStore), the URL anywhere else."""
    fs, root = filesystem(path)
    return root if isinstance(fs, LocalFileSystem) else str(path)


def location_exists(path: str | Path) -> bool:
    fs, root = filesystem(path)
    return fs.exists(root)


def location_is_occupied(path: str | Path) -> bool:
    """Something is there: a file, or a folder with anything in it."""
    fs, root = filesystem(path)
    return fs.exists(root) and (not fs.isdir(root) or bool(fs.ls(root)))


def remove_store(path: str | Path) -> None:
    fs, root = filesystem(path)
    if fs.exists(root):
        fs.rm(root, recursive=True)
