"""The jobs on a real multi-node Ray cluster: ``ray job submit`` to a head node, work on worker nodes that
each have their own network namespace and address (see ``cluster_harness``), and worker nodes lost mid-job.

The head advertises no CPUs, so every training worker, decoding task and scoring actor must run on a worker
node (as on the cloud cluster of ``cluster.yaml``, whose head only coordinates); the tests also check
placement by looking for the actor processes inside the worker node's namespace. All nodes see this
machine's filesystem, which stands in for the shared storage (EFS/NFS) of a real cluster: the data, the
checkpoints, the Ray Train storage path and the outputs are plain folders under the test's tmp folder.

Losing a node: the worker's ``ray start --block`` process group is killed with SIGKILL (raylet, agents and
Ray workers die at once, as when a spot instance is reclaimed), then a fresh node joins from a new namespace,
as the autoscaler would replace it; the job must finish as if nothing had happened.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from cluster_harness import ClusterError, JobResult, LocalCluster, WorkerNode, require_network_namespaces
from conftest import need, read_scores
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

from stfpm_ray.core.checkpoint import read_meta
from stfpm_ray.data.mvtec import discover_categories
from stfpm_ray.data.synth import generate_dataset
from stfpm_ray.store.scores import ScoresTable

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

JOB_TIMEOUT_S = 240
# Scoring archive size: enough batches that a node can be killed after the first and long before the last.
ARCHIVE_IMAGES = 480
SCORE_BATCH = 8
# Training long enough (about a second per epoch) that the node dies several epochs before the end.
TRAIN_EPOCHS = 10
TRAIN_IMAGE_SIZE = 128


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node (0 CPUs) and one worker node (2 CPUs) in its own network namespace; stopped at the end."""
    root = tmp_path_factory.mktemp("cluster")
    try:
        require_network_namespaces()
    except ClusterError as exc:
        need(False, str(exc))
    try:
        with LocalCluster(root, head_cpus=0, worker_cpus=2) as running:
            yield running
    except ClusterError as exc:
        pytest.fail(f"multi-node Ray cluster: {exc}", pytrace=False)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """The 'shared storage' every node reads and writes: data, checkpoints, Ray Train state, outputs."""
    root = tmp_path_factory.mktemp("shared")
    generate_dataset(root / "data", categories=2, size=64, n_train=24, n_test=8, seed=0)
    return root


def _wait_for(condition, timeout: float, what: str, cluster: LocalCluster, log_name: str):
    deadline = time.monotonic() + timeout
    while (value := condition()) in (None, False, []):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; job output so far:\n{cluster.job_log(log_name)[-3000:]}")
        time.sleep(0.1)
    return value


def _replace_node(cluster: LocalCluster, node: WorkerNode) -> WorkerNode:
    """Kill ``node`` like a lost machine, wait until the head declares it dead, then let a fresh node join."""
    cluster.kill_worker(node)
    cluster.wait_node_dead(node)
    return cluster.add_worker()


@pytest.fixture(scope="module")
def benchmark(cluster, shared) -> tuple[JobResult, Path]:
    """The benchmark job, run once: its checkpoints also serve the scoring test."""
    out = shared / "benchmark"
    result = cluster.submit(
        # -v: the workers' own log lines (prefixed with their node's address) show where training ran
        [
            "jobs/benchmark.py",
            "-v",
            "--data",
            str(shared / "data"),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--image-size",
            "64",
            "--batch-size",
            "8",
            "--storage-path",
            str(shared / "ray-benchmark"),
        ],
        JOB_TIMEOUT_S,
        "benchmark.log",
    )
    return result, out


def test_benchmark_job_runs_on_the_worker_node(cluster, shared, benchmark):
    result, out = benchmark
    categories = discover_categories(shared / "data")
    assert result.returncode == 0, result.output[-4000:]
    worker_ip = re.escape(cluster.workers[-1].ip)
    assert re.search(rf"\(RayTrainWorker pid=\d+, ip={worker_ip}\)", result.output), "training ran elsewhere"
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert set(metrics["categories"]) == set(categories)
    for name in categories:
        entry = metrics["categories"][name]
        assert entry["n_images"] == len(list((shared / "data" / name / "test").rglob("*.png")))
        assert 0.0 <= entry["image_auroc"] <= 1.0
        assert read_meta(out / "checkpoints" / name).training["epochs"] == 2
    scores = read_scores(out / "scores")
    assert len(scores) == scores.path.nunique() == sum(metrics["categories"][n]["n_images"] for n in categories)


@pytest.fixture(scope="module")
def scoring_setup(shared, benchmark) -> tuple[Path, Path, str]:
    """The benchmark's checkpoints and a flat archive of ARCHIVE_IMAGES distinct files: hard links to the
    category's good images, a night of a line that works (a night of mostly defective images would rightly end
    with exit status 4, the operating point not holding)."""
    checkpoints = benchmark[1] / "checkpoints"
    category = discover_categories(shared / "data")[0]
    if not (checkpoints / category).is_dir():
        pytest.fail(f"the benchmark job left no checkpoint for {category} in {checkpoints} to score with")
    sources = sorted((shared / "data" / category / "train" / "good").glob("*.png"))
    archive = shared / "archive"
    archive.mkdir()
    for i in range(ARCHIVE_IMAGES):
        os.link(sources[i % len(sources)], archive / f"img_{i:05d}.png")
    return checkpoints, archive, category


def _worker_record(out: Path) -> dict | None:
    """The progress record of a scoring actor that has finished a batch (written by the actor itself)."""
    for path in out.glob("_stfpm/runs/*/*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):  # being replaced right now
            continue
        if record["batches"] >= 1:
            return record
    return None


def test_scoring_finishes_exactly_once_after_losing_a_node(cluster, scoring_setup, shared):
    checkpoints, archive, category = scoring_setup
    out = shared / "scores-fault"
    job = cluster.submit_async(
        [
            "jobs/score.py",
            "--checkpoints",
            str(checkpoints),
            "--input",
            str(archive),
            "--out",
            str(out),
            "--category",
            category,
            "--score-batch-size",
            str(SCORE_BATCH),
        ],
        "score-fault.log",
    )
    node = cluster.workers[-1]
    record = _wait_for(lambda: _worker_record(out), JOB_TIMEOUT_S, "the first scored batch", cluster, "score-fault.log")
    assert record["pid"] in node.pids(), "the scoring actor does not run on the worker node"
    replacement = _replace_node(cluster, node)
    result = cluster.wait_job(job, JOB_TIMEOUT_S, "score-fault.log")
    assert result.returncode == 0, result.output[-4000:]

    scores = read_scores(out)
    expected = {str(p) for p in archive.iterdir()}
    assert len(scores) == len(expected) and set(scores.path) == expected  # every image exactly once
    assert (scores.status == "ok").all()
    manifest = ScoresTable(str(out)).history()[0]["manifest"]
    killed = next(w for w in manifest["workers"] if w["pid"] == record["pid"])
    assert 0 < killed["rows"] < len(expected), "the node was not lost in the middle of scoring"
    restarted = [w for w in manifest["workers"] if w["pid"] != record["pid"]]
    assert sum(w["rows"] for w in restarted) >= len(expected) - killed["rows"], (
        f"the rest was not scored by actors restarted on {replacement.name}: {manifest['workers']}"
    )

    # The nightly job over the same archive and output: only what arrived since is scored and reported.
    new = [archive / f"night2_{i}.png" for i in range(3)]
    for i, path in enumerate(new):
        os.link(archive / f"img_{i:05d}.png", path)
    result = cluster.submit(
        [
            "jobs/nightly.py",
            "--checkpoints",
            str(checkpoints),
            "--input",
            str(archive),
            "--out",
            str(out),
            "--category",
            category,
        ],
        JOB_TIMEOUT_S,
        "nightly.log",
    )
    assert result.returncode == 0, result.output[-4000:]
    reports = list((out / "_reports").glob("nightly-*.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    assert (report["scored"], report["categories"][category]["skipped"]) == (len(new), len(expected))
    assert len(read_scores(out)) == len(expected) + len(new)


def test_training_resumes_from_its_checkpoint_after_losing_a_node(cluster, shared):
    category = discover_categories(shared / "data")[0]
    storage, out = shared / "ray-train-fault", shared / "ckpt-fault"
    job = cluster.submit_async(
        [
            "jobs/train.py",
            "-v",
            "--data",
            str(shared / "data"),
            "--categories",
            category,
            "--out",
            str(out),
            "--epochs",
            str(TRAIN_EPOCHS),
            "--image-size",
            str(TRAIN_IMAGE_SIZE),
            "--batch-size",
            "4",
            "--storage-path",
            str(storage),
        ],
        "train-fault.log",
    )
    node = cluster.workers[-1]
    # Ray Train writes this snapshot when it registers a reported checkpoint (the driver's epoch lines can lag
    # by seconds on a loaded machine): from then on, the first epoch must survive the node.
    _wait_for(
        lambda: list(storage.glob(f"*-train-{category}/{CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}")),
        JOB_TIMEOUT_S,
        "the first registered epoch checkpoint",
        cluster,
        "train-fault.log",
    )
    assert any("RayTrainWorker" in title for title in node.process_titles()), "training does not run on the worker node"
    replacement = _replace_node(cluster, node)
    result = cluster.wait_job(job, JOB_TIMEOUT_S, "train-fault.log")
    assert result.returncode == 0, result.output[-4000:]

    assert re.search(rf"\(RayTrainWorker pid=\d+, ip={re.escape(replacement.ip)}\)", result.output), (
        "not resumed on the new node"
    )
    resumed = [int(m) for m in re.findall(rf"\[{category}\] [^\n]*resum[^\n]* epoch (\d+)", result.output)]
    assert resumed, f"training restarted instead of resuming:\n{result.output[-4000:]}"
    assert 1 <= resumed[0] < TRAIN_EPOCHS, f"the node was lost after training had ended (epoch {resumed[0]})"
    epochs = [int(m) for m in re.findall(rf"\[{category}\] epoch (\d+)/{TRAIN_EPOCHS} ", result.output)]
    assert epochs == list(range(1, TRAIN_EPOCHS + 1)), f"epochs ran again after the node was lost: {epochs}"
    meta = read_meta(out / category)
    assert meta.training["epochs"] == TRAIN_EPOCHS
