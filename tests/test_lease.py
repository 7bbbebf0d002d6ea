"""The writer's lease (stfpm_ray.store.lease): takeovers of dead holders, and what they leave behind."""

from __future__ import annotations

import json
import time

import pytest


def test_takeovers_keep_only_the_most_recent_set_aside_leases(tmp_path):
    from stfpm_ray.store import lease as lease_module
    from stfpm_ray.store.fs import resolve

    folder = (tmp_path / lease_module.LEASE_FILE).parent
    folder.mkdir(parents=True)
    old = [folder / f"lease-stale-2026010{i}T000000-0000000{i}.json" for i in range(1, 10)]
    older = [folder / f"lease-stale-2025010{i}T000000-0000000{i}.json" for i in range(1, 4)]
    for path in old + older:
        path.write_text("{}")
    dead = {"run_id": "run-a", "user": "u", "host": "elsewhere", "pid": 1, "started_at": "t", "heartbeat": 0.0}
    (tmp_path / lease_module.LEASE_FILE).write_text(json.dumps(dead))
    lease = lease_module.Lease(resolve(str(tmp_path)), "run-b").acquire()
    lease.release()
    kept = sorted(p.name for p in folder.glob("lease-stale-*.json"))
    assert len(kept) == lease_module.KEEP_SET_ASIDE and not any(p.exists() for p in older)
    assert kept[:-1] == sorted(p.name for p in old) and json.loads((folder / kept[-1]).read_text())["run_id"] == "run-a"


def test_a_stale_lease_from_another_host_is_taken_over(tmp_path):
    from stfpm_ray.store import lease as lease_module
    from stfpm_ray.store.fs import resolve

    table = resolve(str(tmp_path))
    holder = lease_module.Lease(table, "run-a").acquire()
    with pytest.raises(FileExistsError, match="run-a"):
        lease_module.Lease(table, "run-b").acquire()
    holder._stop.set()  # the holder's host died: no more heartbeats
    path = tmp_path / lease_module.LEASE_FILE
    old = json.loads(path.read_text())
    path.write_text(json.dumps({**old, "host": "elsewhere", "heartbeat": time.time() - lease_module.STALE_AFTER_S - 1}))
    second = lease_module.Lease(table, "run-b").acquire()
    assert second.took_over is not None and second.took_over.run_id == "run-a"
    with pytest.raises(lease_module.LeaseLostError):
        holder.check()  # the paused first run finds out before it commits
    second.check()
    second.release()
    assert not path.exists()
