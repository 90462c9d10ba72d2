"""Where a path lives: one answer to "is this URI remote?" for the whole package.

A URI with a scheme other than ``file``/``local`` (``s3://``, ``gs://``, ``gcs://``, ``hdfs://``,
``abfs://``, ...) names an object store or a distributed file system: it is passed to pyarrow /
Ray as it is and never touched by ``os.path``. Everything else is a local path.
"""

from __future__ import annotations

import os
import re
import urllib.parse
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


# Query keys that carry a credential (case-insensitive): these exact names, and any name containing one
# of the fragments (``aws_secret_access_key``, ``X-Amz-Security-Token``, ``X-Amz-Signature``, ...).
SECRET_QUERY_KEYS = ("sig", "pwd", "passwd", "auth")
SECRET_QUERY_FRAGMENTS = ("secret", "key", "token", "password", "credential", "signature")
# a URI in free text: a scheme, then anything up to whitespace or a quote, not ending in punctuation
_URI_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]*[^\s'\"<>`.,;:)\]}]")


def redact(uri: str) -> str:
    """``uri`` as it may be recorded or shown: the password of its userinfo dropped (the user name kept:
    ``http://alice@host:5000``) and every credential query parameter removed; a URI holding no secret,
    and any local path, comes back unchanged.

    The user name is kept so that a record says whose account wrote it, and so that a recorded config
    (``uml-ray best --output``) authenticates again once the password is given by environment variable
    (``MLFLOW_TRACKING_PASSWORD``). Idempotent: a redacted URI redacts to itself.
    """
    uri = str(uri)
    parts = _split_authority(uri)
    if parts is None:
        return uri
    scheme, userinfo, host, tail = parts
    user = (userinfo or "").partition(":")[0]
    authority = f"{user}@{host}" if user else host
    tail, hash_, fragment = tail.partition("#")
    path, question, query = tail.partition("?")
    if question:
        kept = [pair for pair in query.split("&") if pair and not is_secret_key(pair.partition("=")[0])]
        query = "&".join(kept)
        question = "?" if kept else ""
    return f"{scheme}://{authority}{path}{question}{query}{hash_}{fragment}"


def is_secret_key(name: str) -> bool:
    """Whether a query parameter's name says it carries a credential."""
    name = urllib.parse.unquote_plus(name).lower()
    return name in SECRET_QUERY_KEYS or any(fragment in name for fragment in SECRET_QUERY_FRAGMENTS)


def redact_text(text: str) -> str:
    """Free text (a message, a traceback, a YAML file) with every URI in it redacted (``redact``)."""
    return _URI_IN_TEXT.sub(lambda found: redact(found.group(0)), str(text))


def redact_values(value):
    """A nested structure of dicts, lists and scalars (a config's ``to_dict()``) with every string in it
    redacted (``redact_text``): what a checkpoint or a record may hold of a config."""
    if isinstance(value, dict):
        return {key: redact_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_values(item) for item in value)
    return redact_text(value) if isinstance(value, str) else value


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(``uri`` without its userinfo, user name, password), the last two percent-decoded; None where
    the URI gives none. A client connects to the first and authenticates with the others."""
    parts = _split_authority(str(uri))
    if parts is None or parts[1] is None:
        return str(uri), None, None
    scheme, userinfo, host, tail = parts
    user, colon, password = userinfo.partition(":")
    return (
        f"{scheme}://{host}{tail}",
        urllib.parse.unquote(user) or None,
        urllib.parse.unquote(password) if colon else None,
    )


def _split_authority(uri: str) -> tuple[str, str | None, str, str] | None:
    """(scheme, userinfo or None, host[:port], the rest) of a URI; None for a plain path. The authority
    ends at the first '/', '?' or '#', and its last '@' ends the userinfo (a password may hold '@')."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return None
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    userinfo, at, host = rest[:end].rpartition("@")
    return scheme, userinfo if at else None, host, rest[end:]
