"""cluster.yaml: valid for Ray's cluster launcher, and shaped as documented (CPU head, GPU workers from zero)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
GPU_FAMILIES = re.compile(r"^(g\d|p\d|gr\d)")  # AWS instance families with NVIDIA GPUs


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def config(raw) -> dict:
    """The config as `ray up` checks it: merged with the provider's defaults, then schema-validated."""
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def _validate(raw: dict) -> None:
    validate_config(prepare_config(copy.deepcopy(raw)))


def test_validates_against_rays_schema_and_the_schema_is_strict(config, raw):
    assert config["provider"]["type"] == "aws"
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 0  # a typo the schema must reject
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken)
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = broken["max_workers"] + 1  # above the cap
    with pytest.raises(ValueError, match="max_workers"):
        _validate(broken)


def test_head_is_a_cpu_node_that_takes_no_model_work(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert not GPU_FAMILIES.match(head["node_config"]["InstanceType"])
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["CPU"] == 0
    assert head["max_workers"] == 0


def test_gpu_workers_autoscale_from_zero(config):
    workers = {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}
    assert workers, "no worker node type"
    for name, node_type in workers.items():
        assert GPU_FAMILIES.match(node_type["node_config"]["InstanceType"]), name
        assert node_type["resources"]["GPU"] >= 1, name
        assert node_type["min_workers"] == 0, name
        assert 1 <= node_type["max_workers"] <= config["max_workers"], name


def test_every_node_installs_this_package_from_the_synced_repository(config):
    mounted = [remote for remote, local in config["file_mounts"].items() if local in (".", "./")]
    assert len(mounted) == 1, "the repository must be synced to the nodes exactly once"
    for commands in (config["head_setup_commands"], config["worker_setup_commands"]):
        installs = [c for c in commands if re.search(rf"pip install .*{re.escape(mounted[0])}\b", c)]
        assert installs, "setup commands do not pip-install the synced repository"
    assert ".venv" in config["rsync_exclude"]  # a local virtualenv must not be copied to the cluster


def test_storage_and_access_are_configured_on_every_node(config):
    for name, node_type in config["available_node_types"].items():
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    setup = " ".join(config["head_setup_commands"])
    assert "mount -t nfs4" in " ".join(config["worker_setup_commands"])  # shared checkpoints and data
    assert "mount -t nfs4" in setup
    assert re.search(r"aws s3 sync s3://\S+ /mnt/shared/", setup)


def test_token_authentication_on_every_node(config):
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = [c for c in commands if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start)
