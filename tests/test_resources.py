"""Sizing runs to the cluster (stfpm_ray.ray.resources): a scoring actor pool that leaves room for
decoding, the --actors flag, training workers shared among the categories that train at once, and GPUs used
wherever the cluster has them (``auto``)."""

from __future__ import annotations

import argparse

import pytest

from stfpm_ray import cli
from stfpm_ray.cli.options import add_scoring_options, add_training_options, scoring_options, train_resources
from stfpm_ray.ray.resources import TrainResources, actor_pool_size, category_concurrency, gpus_each, parse_actors


def test_actors_flag_takes_a_count_or_a_range():
    assert parse_actors("3") == (3, 3)
    assert parse_actors("2,4") == (2, 4)
    for text in ("0", "3,1", "x", "1,2,3"):
        with pytest.raises(ValueError, match="N or MIN,MAX"):
            parse_actors(text)
    with pytest.raises(SystemExit):  # argparse reports the bad value and exits with status 2
        cli.main(["score", "--checkpoints", "c", "--input", "i", "--out", "o", "--actors", "3,1"])


def test_a_pool_that_would_take_every_cpu_is_refused_instead_of_hanging_the_dataset():
    for actors, gpus, resources in [(2, 0.0, {"CPU": 2.0}), (None, 0.0, {"CPU": 1.0}), (None, 1.0, {"CPU": 8.0})]:
        with pytest.raises(ValueError, match="would hang"):
            actor_pool_size(actors, gpus, 1.0, resources)
    assert actor_pool_size(None, 0.0, 1.0, {"CPU": 2.0}) == (1, 1)
    assert actor_pool_size(None, 0.0, 1.0, {"CPU": 16.0}) == (1, 15)
    assert actor_pool_size(None, 1.0, 1.0, {"CPU": 16.0, "GPU": 4.0}) == (1, 4)
    assert actor_pool_size((2, 3), 0.0, 1.0, {"CPU": 8.0}) == (2, 3)


def test_training_workers_reserve_their_threads_and_a_category_that_never_fits_is_refused():
    # a CPU worker reserves the threads its recipe trains with: four categories with 2 threads on 16 CPUs
    # train at once, on 2 CPUs one at a time; 4 threads on a 2-CPU node reserve what there is
    four = TrainResources().sized_for({"CPU": 16.0}, categories=4, threads=2)
    assert four.cpus_per_worker == 2.0 and category_concurrency({"CPU": 16.0}, four) == 8
    small = TrainResources().sized_for({"CPU": 2.0}, categories=4, threads=2)
    assert small.cpus_per_worker == 2.0 and category_concurrency({"CPU": 2.0}, small) == 1
    assert TrainResources().sized_for({"CPU": 2.0}, categories=1, threads=4).cpus_per_worker == 2.0
    assert TrainResources().sized_for({"CPU": 16.0}, categories=1, threads=16).cpus_per_worker == 16.0
    # GPUs bound how many train at once: 2 GPUs, one per worker, 2 workers per category
    gpus = TrainResources(workers_per_category=2, gpus_per_worker=1.0).sized_for({"CPU": 16.0, "GPU": 2.0}, 8, 2)
    assert gpus.cpus_per_worker == 8.0 and category_concurrency({"CPU": 16.0, "GPU": 2.0}, gpus) == 1
    assert TrainResources(cpus_per_worker=3.0).sized_for({"CPU": 16.0}, 1, 2).cpus_per_worker == 3.0
    with pytest.raises(ValueError, match="one category needs"):
        category_concurrency({"CPU": 2.0}, TrainResources(workers_per_category=3, cpus_per_worker=1.0))


def test_gpus_are_used_by_default_wherever_the_cluster_has_them(capsys):
    gpu_node, cpu_node = {"CPU": 16.0, "GPU": 1.0, "memory": 1e11}, {"CPU": 16.0, "memory": 1e11}
    assert gpus_each(None, gpu_node) == 1.0 and gpus_each(None, cpu_node) == 0.0
    assert gpus_each(None, {"CPU": 4.0, "GPU": 0.0}) == 0.0
    assert gpus_each(0.0, gpu_node) == 0.0 and gpus_each(0.25, gpu_node) == 0.25  # explicit numbers win
    # the flags default to auto (None); explicit numbers still parse
    parser = argparse.ArgumentParser()
    add_training_options(parser)
    add_scoring_options(parser)
    default = parser.parse_args([])
    assert train_resources(default).gpus_per_worker is None and scoring_options(default).gpus_per_actor is None
    typed = parser.parse_args(["--gpus-per-worker", "0.5", "--gpus-per-actor", "0"])
    assert train_resources(typed).gpus_per_worker == 0.5 and scoring_options(typed).gpus_per_actor == 0.0
    assert scoring_options(parser.parse_args(["--gpus-per-actor", "auto"])).gpus_per_actor is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--gpus-per-worker", "many"])
    assert cli.main(["train", "--data", "d", "--out", "o", "--print-config"]) == 0
    assert "gpus-per-worker: auto" in capsys.readouterr().out  # a config file can say auto too
    # training: auto becomes a GPU per worker on a GPU cluster, and the GPUs bound the categories at once
    on_gpus = TrainResources().sized_for({"CPU": 16.0, "GPU": 2.0}, categories=8, threads=2)
    assert on_gpus.gpus == 1.0 and on_gpus.cpus_per_worker == 8.0
    assert category_concurrency({"CPU": 16.0, "GPU": 2.0}, on_gpus) == 2
    on_cpus = TrainResources().sized_for({"CPU": 16.0}, categories=8, threads=2)
    assert on_cpus.gpus == 0.0 and on_cpus.cpus_per_worker == 2.0
    assert TrainResources(gpus_per_worker=0.0).sized_for({"CPU": 16.0, "GPU": 2.0}, 1, 2).gpus == 0.0


def test_fractional_gpus_are_refused_when_a_category_trains_data_parallel():
    """Two NCCL ranks of one category on one GPU fail after the workers start; refused before anything runs."""
    for gpus in (0.5, 0.25, 1.5):
        with pytest.raises(ValueError, match="two data-parallel ranks on one GPU"):
            TrainResources(workers_per_category=2, gpus_per_worker=gpus)
    assert TrainResources(workers_per_category=1, gpus_per_worker=0.25).gpus == 0.25  # categories may share one
    assert TrainResources(workers_per_category=2, gpus_per_worker=1.0).gpus == 1.0
    assert TrainResources(workers_per_category=4).gpus_per_worker is None  # auto: whole GPUs
    parser = argparse.ArgumentParser()
    add_training_options(parser)
    with pytest.raises(ValueError, match="NCCL"):
        train_resources(parser.parse_args(["--workers-per-category", "2", "--gpus-per-worker", "0.5"]))
