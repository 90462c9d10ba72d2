"""The files under cluster/ are checked by the tools that consume them: Ray's cluster-config
validator for the launcher YAMLs, Ray's runtime-env parser, MLflow's auth-config reader, our own
config parser for the job entrypoints, and a structural check of the KubeRay CRD fields."""

from __future__ import annotations

import copy
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from uml_ray.cluster import check_storage_for_cluster, is_network_filesystem
from uml_ray.config import load_config, parse_overrides
from uml_ray.errors import ConfigError
from uml_ray.uri import is_remote

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]


def ray_prepared(name: str) -> dict:
    """A launcher YAML after Ray's own defaults merge and validation (what `ray up` does offline)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((CLUSTER / name).read_text()))
    validate_config(config)
    return config


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_ray_validation(name):
    config = ray_prepared(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "trials and Ray Data must not land on the head"
    gpu = types["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1 and gpu["resources"]["GPU"] >= 1
    cpu = types["cpu_worker"]
    assert cpu["min_workers"] == 0 and cpu["resources"]["CPU"] >= 8 and "GPU" not in cpu["resources"]
    assert config["max_workers"] >= gpu["max_workers"] + cpu["max_workers"]
    assert 0 < config["idle_timeout_minutes"] <= 30


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_installs_uml_ray_and_starts_token_auth(name):
    config = ray_prepared(name)
    setup = "\n".join(config["setup_commands"])
    assert "uv pip install" in setup and "uml-ray[assets]" in setup and "--python 3.11" in setup
    assert config["file_mounts"]["~/uml-ray"] == "."
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert ".venv" in config["rsync_exclude"] and ".git" in config["rsync_exclude"]
    head_start = config["head_start_ray_commands"][-1]
    worker_start = config["worker_start_ray_commands"][-1]
    for flag in (
        "--head",
        "--num-cpus=0",
        "--autoscaling-config=~/ray_bootstrap_config.yaml",
        "--dashboard-port=8265",
    ):
        assert flag in head_start
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    assert "--address=$RAY_HEAD_IP:6379" in worker_start


def test_ray_validation_rejects_a_misspelled_key():
    """The check above has teeth: Ray's schema refuses unknown top-level keys."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    config["idle_timout_minutes"] = 5
    with pytest.raises(jsonschema.ValidationError, match="idle_timout_minutes"):
        validate_config(prepare_config(config))


# --- KubeRay ----------------------------------------------------------------------------------


def raycluster_problems(spec: dict, where: str) -> list[str]:
    """Fields the KubeRay ray.io/v1 RayClusterSpec requires, and the ones this setup relies on."""
    problems = []
    head = spec.get("headGroupSpec") or {}
    if "rayStartParams" not in head:
        problems.append(f"{where}.headGroupSpec.rayStartParams missing (required by the CRD)")
    containers = ((head.get("template") or {}).get("spec") or {}).get("containers") or []
    if not containers or not all(c.get("name") and c.get("image") for c in containers):
        problems.append(f"{where}.headGroupSpec.template.spec.containers needs name and image")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{where}.enableInTreeAutoscaling must be true")
    if "idleTimeoutSeconds" not in (spec.get("autoscalerOptions") or {}):
        problems.append(f"{where}.autoscalerOptions.idleTimeoutSeconds missing")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append(f"{where}.authOptions.mode must be token")
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        problems.append(f"{where}.headGroupSpec.serviceType exposes the head outside the cluster")
    groups = spec.get("workerGroupSpecs") or []
    for i, group in enumerate(groups):
        at = f"{where}.workerGroupSpecs[{i}]"
        for key in ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            if key not in group:
                problems.append(f"{at}.{key} missing")
        if group.get("minReplicas", 0) > group.get("maxReplicas", 0):
            problems.append(f"{at}: minReplicas > maxReplicas")
        for c in ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]:
            limits = (c.get("resources") or {}).get("limits") or {}
            if not c.get("image") or "cpu" not in limits or "memory" not in limits:
                problems.append(f"{at}: container needs an image and cpu/memory limits")
    if not groups:
        problems.append(f"{where}.workerGroupSpecs is empty")
    return problems


def gpu_and_cpu_groups(spec: dict) -> tuple[dict, dict]:
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    return groups["gpu"], groups["cpu"]


def check_worker_groups(spec: dict) -> None:
    gpu, cpu = gpu_and_cpu_groups(spec)
    gpu_limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1 and gpu_limits["nvidia.com/gpu"] >= 1
    assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_raycluster_manifest_carries_the_crd_fields():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    assert raycluster_problems(doc["spec"], "spec") == []
    check_worker_groups(doc["spec"])
    assert doc["spec"]["rayVersion"] == "2.60.0"


def test_rayjob_manifest_carries_the_crd_fields_and_a_valid_entrypoint():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert raycluster_problems(spec["rayClusterSpec"], "spec.rayClusterSpec") == []
    check_worker_groups(spec["rayClusterSpec"])
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http://mlflow.")
    # The entrypoint names real files and real config keys; the image holds the repository.
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["uml-ray", "tune"]
    config_path, space_path = ROOT / argv[2], ROOT / argv[argv.index("--space") + 1]
    assert config_path.is_file() and space_path.is_file()
    overrides = argv[3 : argv.index("--space")]
    parsed = parse_overrides(overrides)
    assert parsed["tracking.storage_path"].startswith("s3://") and parsed["resources.gpus_per_worker"] == 1
    cfg = load_config(config_path, overrides)
    assert cfg.resources.num_workers == 2 and cfg.tracking.uri.startswith("http://")


def test_structural_check_reports_what_is_missing():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    broken = copy.deepcopy(doc["spec"])
    del broken["workerGroupSpecs"][0]["minReplicas"]
    broken["workerGroupSpecs"][1]["minReplicas"] = 9
    broken["headGroupSpec"]["serviceType"] = "LoadBalancer"
    problems = raycluster_problems(broken, "spec")
    assert "spec.workerGroupSpecs[0].minReplicas missing" in problems
    assert "spec.workerGroupSpecs[1]: minReplicas > maxReplicas" in problems
    assert any("serviceType" in p for p in problems) and len(problems) == 3


# --- runtime env and MLflow server ------------------------------------------------------------


def test_runtime_env_file_is_what_ray_job_submit_parses():
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    env = parse_runtime_env_args(runtime_env=str(CLUSTER / "runtime_env.yaml"))
    RuntimeEnv(**env)  # Ray's own field validation
    assert env["working_dir"] == "."
    assert {".venv/", ".git/", "uml_runs/"} <= set(env["excludes"])
    assert "MLFLOW_TRACKING_URI" in env["env_vars"]
    assert not any("PASSWORD" in key for key in env["env_vars"]), (
        "credentials do not belong in a committed file"
    )


def test_basic_auth_ini_reads_with_mlflow(monkeypatch):
    from mlflow.server.auth.config import read_auth_config

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(CLUSTER / "mlflow" / "basic_auth.ini"))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    auth = read_auth_config()
    assert auth.default_permission == "NO_PERMISSIONS"
    assert auth.database_uri.startswith("postgresql://") and auth.admin_username == "admin"


def test_mlflow_server_setups_stay_on_the_cluster_network():
    script = (CLUSTER / "mlflow" / "mlflow-server.sh").read_text()
    subprocess.run(["bash", "-n", str(CLUSTER / "mlflow" / "mlflow-server.sh")], check=True)
    assert (
        '--host "$MLFLOW_HOST"' in script
        and "--host 0.0.0.0" not in script
        and "--host=0.0.0.0" not in script
    )
    for flag in ("--app-name basic-auth", "--serve-artifacts", "--artifacts-destination", "postgresql://"):
        assert flag in script
    docs = list(yaml.safe_load_all((CLUSTER / "mlflow" / "mlflow-k8s.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert kinds["Service"]["spec"]["type"] == "ClusterIP"
    assert all("nodePort" not in p for p in kinds["Service"]["spec"]["ports"])
    args = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--app-name=basic-auth" in args and "--serve-artifacts" in args
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    ingress = kinds["NetworkPolicy"]["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert ingress == {"ray.io/is-ray-node": "yes"}


# --- storage path check -------------------------------------------------------------------------


def nodes(*hosts, dead=()):
    """A ray.nodes()-shaped listing with one node per host address."""
    listing = [{"NodeID": f"n{i}", "Alive": True, "NodeManagerAddress": h} for i, h in enumerate(hosts)]
    listing += [{"NodeID": f"d{i}", "Alive": False, "NodeManagerAddress": h} for i, h in enumerate(dead)]
    return listing


def test_local_storage_is_refused_on_a_multi_host_cluster(tmp_path):
    with pytest.raises(ConfigError) as exc:
        check_storage_for_cluster(str(tmp_path / "runs"), nodes("10.0.0.1", "10.0.0.2", "10.0.0.3"))
    message = str(exc.value)
    assert "tracking.storage_path" in message and "3 hosts" in message and "s3://" in message


def test_local_storage_is_fine_on_one_host_and_remote_uris_everywhere(tmp_path):
    local = str(tmp_path / "runs")
    check_storage_for_cluster(local, nodes("10.0.0.1"))
    # ray.cluster_utils.Cluster: several nodes, one host, one disk.
    check_storage_for_cluster(local, nodes("10.0.0.1", "10.0.0.1", "10.0.0.1"))
    # A dead node on another host no longer needs the checkpoints.
    check_storage_for_cluster(local, nodes("10.0.0.1", dead=["10.0.0.9"]))
    for uri in ("s3://bucket/runs", "gs://bucket/runs", "hdfs://nn/runs", "abfs://container@account/runs"):
        assert is_remote(uri)
        check_storage_for_cluster(uri, nodes("10.0.0.1", "10.0.0.2"))
    assert not is_remote("file:///tmp/runs") and not is_remote("./uml_runs")


def test_network_filesystem_mounts_count_as_shared(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/root / ext4 rw 0 0\n"
        "fs-1.efs.us-west-2.amazonaws.com:/ /mnt/efs nfs4 rw 0 0\n"
        "bucket /mnt/gcs fuse.gcsfuse rw 0 0\n"
        "/dev/sdb /mnt/efs/local ext4 rw 0 0\n"
    )
    hosts = nodes("10.0.0.1", "10.0.0.2")
    assert is_network_filesystem("/mnt/efs/runs", str(mounts))
    assert is_network_filesystem("/mnt/gcs/runs", str(mounts))
    # The longest mount prefix wins: a local disk mounted under the NFS tree is local.
    assert not is_network_filesystem("/mnt/efs/local/runs", str(mounts))
    check_storage_for_cluster("/mnt/efs/runs", hosts, str(mounts))
    with pytest.raises(ConfigError):
        check_storage_for_cluster("/mnt/efs/local/runs", hosts, str(mounts))
    with pytest.raises(ConfigError):
        check_storage_for_cluster("/home/me/runs", hosts, str(mounts))
