"""Starting or joining Ray, and cluster-side checks that run on the driver before any trial starts.

Ray writes results and checkpoints to ``tracking.storage_path`` from whichever node a worker
landed on, and restores them on another node after a failure. A node-local folder therefore
only works when every node sees the same disk: all nodes on one host, or a network file system
mounted at the same path everywhere. Anything else loses checkpoints silently, so we refuse it.

A local Ray we start is ours to stop: whole at the driver's exit, and, when its driver was killed,
by the next command (each is recorded while it runs).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import tempfile
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


def local_ray_records() -> Path:
    """Where each local Ray this user's drivers started is recorded (driver pid and start, session
    name) while it runs: what the next command stops when its driver was killed."""
    return Path(tempfile.gettempdir()) / f"uml-ray-{os.getuid()}" / "local-ray"


def _started(pid: int) -> str:
    """A process's start time (clock ticks since boot), '' when it is gone: a pid and this name one
    process, though pids are reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def session_processes(session: str, folder: str = "") -> list[int]:
    """Pids of the processes of Ray session ``session`` on this host, this process aside: those naming
    it in their command line (GCS, raylet, dashboard) or holding a file of its ``folder`` open (logs:
    agents, workers and the dashboard's modules rename themselves, ``ray::DashboardAgent``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if session.encode() in (entry / "cmdline").read_bytes() or (folder and _holds(entry, folder)):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def _holds(process: Path, folder: str) -> bool:
    """Whether a /proc entry's process has a file under ``folder`` open."""
    inside = folder.rstrip("/") + "/"
    for fd in (process / "fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd).startswith(inside):
                return True
    return False


def stop_session(session: str, folder: str = "") -> list[int]:
    """SIGKILL every process of Ray session ``session`` left on this host; returns their pids."""
    pids = session_processes(session, folder)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return pids


def stop_leftover_rays() -> list[int]:
    """Stop what is left of local Rays whose driver is gone (killed: its GCS and raylet die with it, but
    the agents and workers the raylet started linger); returns the pids stopped."""
    stopped = []
    for record in local_ray_records().glob("*.json"):
        try:
            held = json.loads(record.read_text())
        except (OSError, ValueError):  # being written, or removed meanwhile
            continue
        if _started(held["driver"]) == held["started"]:
            continue  # its driver still runs
        stopped += stop_session(held["session"], held.get("folder", ""))
        record.unlink(missing_ok=True)
    return stopped


def _record_local_ray() -> None:
    """Record this driver's local Ray, and stop it whole at exit: ``ray.shutdown()`` ends its GCS and
    raylet, and then what they started that is still running."""
    import ray

    node = ray._private.worker._global_node
    session, folder = node.session_name, node.get_session_dir_path()
    records = local_ray_records()
    records.mkdir(parents=True, exist_ok=True)
    record = records / f"{session}.json"
    held = {"driver": os.getpid(), "started": _started(os.getpid()), "session": session, "folder": folder}
    record.write_text(json.dumps(held))

    def stop():
        ray.shutdown()
        stop_session(session, folder)
        record.unlink(missing_ok=True)

    atexit.register(stop)


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
    _record_local_ray()


def cluster_address(address: str = "") -> str:
    """The cluster to attach to: ``address`` (``resources.address``), else ``$RAY_ADDRESS``.

    '' means a local Ray.
    """
    return address or os.environ.get("RAY_ADDRESS", "")


def attach_or_start_ray(address: str = "", num_cpus: int | None = None) -> None:
    """Join ``address`` (or ``$RAY_ADDRESS``) when given, else start a local Ray; no-op when attached."""
    import ray

    stop_leftover_rays()
    if ray.is_initialized():
        return
    address = cluster_address(address)
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        start_local_ray(num_cpus)
