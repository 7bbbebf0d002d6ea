"""Training data on object storage: ``train --data s3://...`` lists, splits and reads through the storage layer.

A local S3 server (moto, on 127.0.0.1) stands in for the bucket; the CLI runs in its own process with the
endpoint and credentials in its environment, as an operator's job would, and its Ray workers read the
images from the bucket.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from stfpm_ray.core.checkpoint import validate_checkpoint
from stfpm_ray.data.mvtec import discover_categories, train_images

pytestmark = pytest.mark.slow

BUCKET = "stfpm-test"


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on loopback and the environment variables that point pyarrow at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    yield env
    server.stop()


def _bucket(env: dict[str, str]) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        region=env["AWS_DEFAULT_REGION"],
        endpoint_override=env["AWS_ENDPOINT_URL"],
        allow_bucket_creation=True,
    )


def _upload(source: Path, filesystem: pafs.FileSystem, prefix: str) -> int:
    files = [p for p in sorted(source.rglob("*")) if p.is_file()]
    for path in files:
        with filesystem.open_output_stream(f"{prefix}/{path.relative_to(source).as_posix()}") as handle:
            handle.write(path.read_bytes())
    return len(files)


def test_train_reads_an_mvtec_root_on_s3(s3_env, synth_root, tmp_path, monkeypatch):
    category = discover_categories(synth_root)[0]
    bucket = _bucket(s3_env)
    bucket.create_dir(BUCKET)
    _upload(synth_root / category, bucket, f"{BUCKET}/data/{category}")
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    # the driver's view: categories and training images listed from the bucket, named by their URIs
    root = f"s3://{BUCKET}/data"
    assert discover_categories(root) == [category]
    remote = train_images(root, category)
    assert [Path(p).name for p in remote] == [Path(p).name for p in train_images(synth_root, category)]
    assert all(p.startswith(f"{root}/{category}/train/good/") for p in remote)

    out = tmp_path / "ckpt"
    argv = [
        "train",
        "--data",
        root,
        "--categories",
        "all",
        "--out",
        str(out),
        "--epochs",
        "1",
        "--image-size",
        "64",
        "--batch-size",
        "4",
    ]
    env = {**os.environ, **s3_env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "stfpm_ray.cli", *argv], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    meta = validate_checkpoint(out / category)
    assert meta.training["train_images"] + meta.training["val_images"] == len(remote)
    assert meta.training["skipped_images"] == []
    assert json.loads((out / "_run.json").read_text())["identity"]["root"] == root


def test_a_store_that_does_not_answer_is_one_line_and_exit_5(trained, synth_root, tmp_path):
    """An endpoint nothing listens on (a wrong AWS_ENDPOINT_URL, a store down): for the output and for the
    input, one line naming the location and what to check, exit status 5, no traceback, nothing written."""
    import socket

    with socket.socket() as probe:  # a loopback port that was free a moment ago: nothing answers there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    images = synth_root / trained[1][0] / "test"
    score = [sys.executable, "-m", "stfpm_ray.cli", "score", "--checkpoints", str(trained[0])]
    for where, argv in (
        ("s3://nowhere/scores", [*score, "--input", str(images), "--out", "s3://nowhere/scores"]),
        ("s3://nowhere/archive", [*score, "--input", "s3://nowhere/archive", "--out", str(tmp_path / "out")]),
    ):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 5 and len(lines) == 1, done.stderr
        assert lines[0].startswith(f"stfpm-ray score: error: cannot reach {where}") and "credentials" in lines[0]
    assert not (tmp_path / "out").exists()
