"""Where a path lives: one answer to "is this URI remote?" for the whole package.

A URI with a scheme other than ``file``/``local`` (``s3://``, ``gs://``, ``gcs://``, ``hdfs://``,
``abfs://``, ...) names an object store or a distributed file system: it is passed to pyarrow /
Ray as it is and never touched by ``os.path``. Everything else is a local path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from uml_ray.errors import ConfigError

if TYPE_CHECKING:
    from pyarrow.fs import FileSystem

LOCAL_SCHEMES = ("", "file", "local")


def is_remote(uri: str) -> bool:
    """True for object-store / distributed-file-system URIs (any scheme but file/local)."""
    scheme, sep, _ = str(uri).partition("://")
    return bool(sep) and scheme.lower() not in LOCAL_SCHEMES


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a local folder or a remote URI."""
    if is_remote(base):
        return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])
    return str(Path(base, *parts))


def absolute(uri: str) -> str:
    """Remote URIs as they are; local paths made absolute (recorded configs must run from any folder)."""
    return uri if is_remote(uri) else os.path.abspath(uri)


def check_output_folder(path: str, flag: str) -> None:
    """Refuse an output folder that exists as a local file, up front and naming the flag, instead of
    failing deep inside a writer with NotADirectoryError."""
    if path and not is_remote(path) and Path(path).exists() and not Path(path).is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a folder; give a new or existing folder")


def filesystem_for(uri: str) -> tuple[FileSystem, str]:
    """The pyarrow filesystem holding ``uri`` and the path inside it; a plain local path is made absolute.

    pyarrow is imported on the first call, so importing this module stays cheap.
    """
    from pyarrow import fs

    uri = str(uri)
    return fs.FileSystem.from_uri(uri if "://" in uri else os.path.abspath(uri))
