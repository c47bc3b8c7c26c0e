"""cluster/: launcher YAMLs validate against the schema shipped inside the installed Ray, and the
KubeRay manifests carry what the operator and streamssl need. No cloud account is touched."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

from streamssl.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
LAUNCHER_YAMLS = ["aws.yaml", "gcp.yaml"]


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert path.is_file(), f"Ray no longer ships {path}"
    return json.loads(path.read_text())


def _pins() -> dict[str, str]:
    """torch / torchvision pins from pyproject.toml (regex: tomllib is 3.11+, we support 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    pins = dict(re.findall(r'"(torch|torchvision)==([^"\s]+)"', text))
    assert set(pins) == {"torch", "torchvision"}, pins
    return pins


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


# --------------------------------------------------------------------------- cluster launcher


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_validates_against_rays_schema(name, ray_schema):
    cfg = _load(name)
    jsonschema.validate(cfg, ray_schema)
    # The cross-field rules Ray's own validate_config adds on top of the schema.
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cfg["max_workers"]
    assert "cluster_synced_files" in cfg


def test_schema_check_is_not_vacuous(ray_schema):
    cfg = _load("aws.yaml")
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_worker"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema)
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_worker"]["gpus"] = 4  # unknown key in a node type
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema)


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_has_cpu_head_and_autoscaling_gpu_workers(name):
    cfg = _load(name)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker type"
    for t in gpu_types.values():
        assert 0 <= t["min_workers"] < t["max_workers"] <= cfg["max_workers"]
        assert t["resources"]["CPU"] >= 2 * t["resources"]["GPU"]  # CPU left for Ray Data


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_matches_pins_and_keeps_dashboard_private(name):
    cfg = _load(name)
    docker = cfg["docker"]
    for image in (docker["image"], docker["head_image"]):
        assert image.startswith(f"rayproject/ray:{ray.__version__}-"), image  # same Ray everywhere
    pins = _pins()
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = " ".join(cfg[key])
        assert f"torch=={pins['torch']}" in cmds and f"torchvision=={pins['torchvision']}" in cmds
        assert "~/streamssl" in cmds
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert "--num-cpus=0" in head_start
    assert "~/streamssl" in cfg["file_mounts"]
    assert {".venv", "data", "runs", ".git"} <= set(cfg["rsync_exclude"])


# --------------------------------------------------------------------------- KubeRay


def _gpu_limit(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _check_ray_cluster_spec(spec: dict) -> dict:
    """Shared checks for RayCluster.spec and RayJob.spec.rayClusterSpec; returns the GPU group."""
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["rayStartParams"].get("num-cpus") == "0"  # values must be strings for KubeRay
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # never a public LoadBalancer
    head_containers = head["template"]["spec"]["containers"]
    assert head_containers and all(c.get("image") for c in head_containers)
    assert any(p["containerPort"] == 8265 for p in head_containers[0]["ports"])
    assert _gpu_limit(head_containers[0]) == 0
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any(_gpu_limit(c) >= 1 for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "no GPU worker group"
    for g in gpu_groups:
        assert isinstance(g["rayStartParams"], dict)
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert g["minReplicas"] < g["maxReplicas"]
        c = g["template"]["spec"]["containers"][0]
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        assert "/dev/shm" in mounts  # NCCL / object store need a real shared-memory mount
    return gpu_groups[0]


def test_kuberay_raycluster_manifest():
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay" / "raycluster.yaml").read_text()))
    assert len(docs) == 1
    rc = docs[0]
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    assert rc["metadata"]["name"]
    _check_ray_cluster_spec(rc["spec"])


def test_kuberay_rayjob_runs_the_streamssl_cli_with_a_valid_config():
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay" / "rayjob.yaml").read_text()))
    assert len(docs) == 1
    job = docs[0]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["PYTHONUNBUFFERED"] == "1"
    gpu_group = _check_ray_cluster_spec(spec["rayClusterSpec"])

    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "streamssl.cli", "train"]
    config_in_image, overrides = argv[4], argv[5:]
    local_config = ROOT / "configs" / Path(config_in_image).name
    assert local_config.is_file(), f"{config_in_image} is not one of the repository's configs"
    cfg = load_config(local_config, overrides)  # the overrides must still be valid config keys
    assert cfg.scaling.use_gpu is True
    assert cfg.data.dataset_dir.startswith(("s3://", "gs://"))
    assert cfg.run_dir is not None and cfg.run_dir.startswith(("s3://", "gs://"))
    gpus_per_pod = _gpu_limit(gpu_group["template"]["spec"]["containers"][0])
    assert cfg.scaling.num_workers <= gpu_group["maxReplicas"] * gpus_per_pod
    assert cfg.scaling.num_workers % gpus_per_pod == 0  # whole pods: workers per node = GPUs per node
