"""A dataset's identity: the fingerprint that says two runs trained on the very same data.

``dataset_fingerprint`` hashes the manifest (its shard paths relative to its folder, so a dataset
moved whole keeps its identity) with every shard's size and modification time (what the feature
cache watches for rewrites). A rebuilt or copied dataset gets a new fingerprint even when its bytes
are equal: the fingerprint may call the same data different, never different data the same. The
sweep tags each trial run with it (``uml_ray.data``); ``uml-ray tune --warm-start`` compares it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from uml_ray.data.manifest import Manifest
from uml_ray.data.parquet_source import shard_stat
from uml_ray.uri import is_remote


def dataset_fingerprint(manifest: Manifest) -> str:
    """A short stable hash of the manifest and the (size, mtime) of each of its shards."""
    folder = (
        None
        if manifest.path is None or is_remote(manifest.path)
        else str(Path(manifest.path).resolve().parent)
    )
    shards = sorted(
        {uri for spec in manifest.modalities.values() for uris in spec.splits.values() for uri in uris}
    )
    payload = [manifest.to_dict(relative_to=folder), [list(shard_stat(uri)) for uri in shards]]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
