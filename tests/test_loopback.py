"""Local runs stay on loopback: no process of the local Ray instance, Train workers and their torch.distributed
rendezvous or scoring actors included, listens on any address but 127.0.0.1 / ::1 while ``train`` trains or
``score`` and ``nightly`` score."""

from __future__ import annotations

import ipaddress
import os
import threading
import time

import psutil
import pytest

from stfpm_ray import cli

TINY = ["--weights", "offline", "--image-size", "64", "--batch-size", "8", "--epochs", "3"]


def _loopback(ip: str) -> bool:
    """127.0.0.1, ::1, and 127.0.0.1 as an IPv6 socket writes it (::ffff:127.0.0.1)."""
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def _listeners() -> dict[tuple[str, int], str]:
    """Listening TCP sockets of this process and its descendants (the local Ray instance): address -> process."""
    ours = {os.getpid()} | {child.pid for child in psutil.Process().children(recursive=True)}
    found = {}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in ours:
            try:
                name = " ".join(psutil.Process(conn.pid).cmdline())[:60]
            except psutil.Error:  # ended since
                continue
            found[(conn.laddr.ip, conn.laddr.port)] = name
    return found


def _listened_while(argv: list[str]) -> tuple[int, dict[tuple[str, int], str]]:
    """Run the CLI in a thread and sample the listeners until it ends: (exit status, every listener seen)."""
    seen: dict[tuple[str, int], str] = {}
    result: dict = {}
    run = threading.Thread(target=lambda: result.update(status=cli.main(argv)))
    run.start()
    while run.is_alive():
        seen.update(_listeners())
        time.sleep(0.1)
    run.join()
    return result["status"], seen


@pytest.mark.parametrize("workers", [1, 2])
def test_a_local_train_listens_on_loopback_only(ray_session, synth_root, tmp_path, workers):
    argv = ["train", "--data", str(synth_root), "--categories", "grain", "--out", str(tmp_path / "ckpt"), *TINY]
    status, seen = _listened_while([*argv, "--workers-per-category", str(workers), "--cpus-per-worker", "1"])
    assert status == 0
    assert any("RayTrainWorker" in name for name in seen.values()), seen  # sampled while the workers listened
    assert {address: name for address, name in seen.items() if not _loopback(address[0])} == {}


@pytest.mark.parametrize("verb", ["score", "nightly"])
def test_local_scoring_listens_on_loopback_only(ray_session, trained, synth_root, tmp_path, verb):
    category = trained[1][0]
    argv = [verb, "--checkpoints", str(trained[0]), "--input", str(synth_root / category / "test")]
    status, seen = _listened_while([*argv, "--category", category, "--out", str(tmp_path / "scores")])
    assert status in (0, 4)  # 4: the 2-epoch model's operating point may not hold on these images
    assert any("Scorer" in name or "ray::" in name for name in seen.values()), seen
    assert {address: name for address, name in seen.items() if not _loopback(address[0])} == {}
