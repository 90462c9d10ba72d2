"""Starting or joining Ray, and cluster-side checks that run on the driver before any trial starts.

Ray writes results and checkpoints to ``tracking.storage_path`` from whichever node a worker
landed on, and restores them on another node after a failure. A node-local folder therefore
only works when every node sees the same disk: all nodes on one host, or a network file system
mounted at the same path everywhere. Anything else loses checkpoints silently, so we refuse it.
"""

from __future__ import annotations

import os
from pathlib import Path

from uml_ray.errors import ConfigError
from uml_ray.uri import is_remote

# Mount types whose contents every client host sees (NFS/EFS, SMB, parallel file systems,
# FUSE mounts of object stores such as gcsfuse, s3fs and mountpoint-s3).
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "glusterfs")
NETWORK_FUSE_PREFIXES = (
    "fuse.gcsfuse",
    "fuse.s3fs",
    "fuse.mountpoint-s3",
    "fuse.juicefs",
    "fuse.glusterfs",
    "fuse.ceph",
)


def mount_type(path: str, mounts_file: str = "/proc/mounts") -> str:
    """File-system type of the mount holding ``path`` on this host ('' when unknown)."""
    target = Path(os.path.abspath(path))
    best, best_type = "", ""
    try:
        lines = Path(mounts_file).read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts escapes spaces in mount points as \040
        point, fstype = fields[1].replace("\\040", " "), fields[2]
        if (target == Path(point) or Path(point) in target.parents) and len(point) > len(best):
            best, best_type = point, fstype
    return best_type


def is_network_filesystem(path: str, mounts_file: str = "/proc/mounts") -> bool:
    """True when ``path`` lies on a network file system mount on this host."""
    fstype = mount_type(path, mounts_file)
    return fstype in NETWORK_FILESYSTEMS or fstype.startswith(NETWORK_FUSE_PREFIXES)


def cluster_hosts(ray_nodes: list[dict]) -> set[str]:
    """Distinct host addresses of the alive nodes in a ``ray.nodes()`` listing."""
    return {node["NodeManagerAddress"] for node in ray_nodes if node.get("Alive")}


def check_storage_path(storage_path: str) -> None:
    """Refuse a local ``tracking.storage_path`` that is a file, or a folder that cannot be created."""
    if is_remote(storage_path):
        return
    path = Path(storage_path)
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(
            f"tracking.storage_path={storage_path!r}: {existing} is a file, not a folder; "
            "point it at a folder (created if missing) or an s3:// / gs:// URI"
        )
    if existing is not None and not os.access(existing, os.W_OK):
        raise ConfigError(
            f"tracking.storage_path={storage_path!r}: {existing} is not writable; choose a writable folder"
        )


def check_storage_for_cluster(
    storage_path: str, ray_nodes: list[dict], mounts_file: str = "/proc/mounts"
) -> None:
    """Refuse a node-local ``tracking.storage_path`` when the Ray cluster spans several hosts.

    ``ray_nodes`` is the list ``ray.nodes()`` returns. Several Ray nodes on one host (a laptop,
    ``ray.cluster_utils.Cluster``) share its disk, so a local folder is fine there; so is a path
    on a network file system. Raises ConfigError naming the path, the hosts and the fix.
    """
    if is_remote(storage_path):
        return
    hosts = cluster_hosts(ray_nodes)
    if len(hosts) <= 1 or is_network_filesystem(storage_path, mounts_file):
        return
    shown = ", ".join(sorted(hosts)[:4]) + (", ..." if len(hosts) > 4 else "")
    raise ConfigError(
        f"tracking.storage_path={storage_path!r} is a folder on one machine, but this Ray cluster spans "
        f"{len(hosts)} hosts ({shown}); checkpoints written on one node could not be restored on another. "
        "Set tracking.storage_path to shared storage, e.g. s3://bucket/uml_runs or gs://bucket/uml_runs, "
        "or to a network file system (NFS/EFS/Filestore) mounted at the same path on every node."
    )


def start_local_ray(num_cpus: int | None = None) -> None:
    """A new local Ray of our own (``address="local"``: never a stale `ray start` cluster here).

    The dashboard runs, on 127.0.0.1: Ray Train's PlacementGroupCleaner asks the state API (served
    by the dashboard) whether a TorchTrainer's controller is still alive. Without it, a trial that
    ASHA stops while its TorchTrainer runs leaks the workers' placement group, and later trials
    wait for ever for those CPUs.
    """
    import ray

    ray.init(
        address="local",
        num_cpus=num_cpus or None,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
    )


def cluster_address(address: str = "") -> str:
    """The cluster to attach to: ``address`` (``resources.address``), else ``$RAY_ADDRESS``.

    '' means a local Ray.
    """
    return address or os.environ.get("RAY_ADDRESS", "")


def attach_or_start_ray(address: str = "", num_cpus: int | None = None) -> None:
    """Join ``address`` (or ``$RAY_ADDRESS``) when given, else start a local Ray; no-op when attached."""
    import ray

    if ray.is_initialized():
        return
    address = cluster_address(address)
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        start_local_ray(num_cpus)
