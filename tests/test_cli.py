"""The command line's shared vocabulary, config files and output policy, checked through ``cli.main`` without Ray:
the verbs that would start work are stopped at --print-config, at a refusal, or by a stand-in."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stfpm_ray import cli
from stfpm_ray.core.fit import TrainConfig
from stfpm_ray.data.synth import generate_dataset
from stfpm_ray.errors import OutputExistsError
from stfpm_ray.workflows.benchmark import DEMO_TRAINING, run_benchmark

CONFIG_VERBS = ("train", "score", "nightly", "benchmark")
REQUIRED = {
    "train": ["--data", "data", "--out", "ckpt"],
    "score": ["--checkpoints", "ckpt", "--input", "in", "--out", "scores"],
    "nightly": ["--checkpoints", "ckpt", "--input", "in", "--out", "scores"],
    "benchmark": ["--out", "run"],
}


def _printed(capsys, argv: list[str]) -> dict:
    assert cli.main([*argv, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("verb", cli.VERBS)
def test_every_help_shows_defaults_and_an_example(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([verb, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "(default: " in text and "(default %" not in text
    assert f"examples:\n  stfpm-ray {verb} " in text
    # every verb that writes a new output names it --out; calibrate adds to the checkpoint it is given, table
    # mends the table it is given
    assert ("--out" in text) != (verb in ("calibrate", "table"))


def test_one_vocabulary_for_batches_and_outputs(capsys):
    score = _printed(capsys, ["score", *REQUIRED["score"], "--score-batch-size", "7"])
    assert score["score-batch-size"] == 7 and "batch-size" not in score
    bench = _printed(capsys, ["benchmark", "--out", "run", "--batch-size", "4", "--score-batch-size", "16"])
    assert (bench["batch-size"], bench["score-batch-size"]) == (4, 16)
    train = _printed(capsys, ["train", *REQUIRED["train"], "--batch-size", "8"])
    assert train["batch-size"] == 8 and "score-batch-size" not in train


@pytest.mark.parametrize("verb", ["score", "nightly"])
def test_the_old_scoring_batch_flag_still_works_for_one_release(verb, capsys):
    assert cli.main([verb, *REQUIRED[verb], "--batch-size", "5", "--print-config"]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["score-batch-size"] == 5
    assert "--batch-size is deprecated" in err and "--score-batch-size" in err


def test_nightly_shows_no_table_modes_but_takes_incremental_out_of_habit(capsys):
    """nightly is always incremental: neither mode is in its help or its config; a typed --incremental runs."""
    with pytest.raises(SystemExit):
        cli.main(["nightly", "--help"])
    assert "--incremental" not in capsys.readouterr().out
    config = _printed(capsys, ["nightly", *REQUIRED["nightly"], "--incremental"])
    assert "incremental" not in config and "overwrite" not in config


def test_the_recipe_follows_the_student_unless_given(capsys):
    keys = ("student", "lr", "epochs", "batch-size")
    values = _printed(capsys, ["train", *REQUIRED["train"]])
    assert tuple(values[k] for k in keys) == ("reverse", 0.005, 200, 16)
    mirror = _printed(capsys, ["train", *REQUIRED["train"], "--student", "mirror"])
    assert tuple(mirror[k] for k in keys) == ("mirror", 0.4, 50, 32)
    given = _printed(capsys, ["train", *REQUIRED["train"], "--student", "mirror", "--lr", "0.1", "--epochs", "7"])
    assert (given["lr"], given["epochs"], given["batch-size"]) == (0.1, 7, 32)


def test_config_gives_defaults_that_flags_override(tmp_path, capsys):
    config = _write(
        tmp_path / "train.yaml", "data: /data\nout: /ckpt\nimage_size: 64\nepochs: 3\nmax-failures: 5\nresume: true\n"
    )
    values = _printed(capsys, ["train", "--config", str(config), "--epochs", "7"])
    assert (values["data"], values["out"], values["image-size"], values["max-failures"]) == ("/data", "/ckpt", 64, 5)
    assert values["epochs"] == 7 and values["resume"] is True
    assert values["batch-size"] == TrainConfig().batch_size  # unset training flags print their resolved value


def test_config_lists_and_pairs(tmp_path, capsys):
    config = _write(
        tmp_path / "score.yaml", "checkpoints: ckpt\ninput: [a, b]\nout: scores\nactors: '1,3'\nincremental: true\n"
    )
    values = _printed(capsys, ["score", "--config", str(config)])
    assert values["input"] == ["a", "b"] and values["actors"] == "1,3" and values["incremental"] is True
    assert _printed(capsys, ["score", "--config", str(config), "--input", "c"])["input"] == ["c"]


@pytest.mark.parametrize("verb", CONFIG_VERBS)
def test_print_config_round_trips(verb, tmp_path, capsys):
    argv = [verb, *REQUIRED[verb], *(["--lr", "0.1"] if verb == "train" else ["--map-size", "64"])]
    first = cli.main([*argv, "--print-config"]), capsys.readouterr().out
    saved = _write(tmp_path / f"{verb}.yaml", first[1])
    second = cli.main([verb, "--config", str(saved), "--print-config"]), capsys.readouterr().out
    assert first == second and first[0] == 0


def test_benchmark_prints_the_demo_preset_only_without_data(capsys):
    demo = _printed(capsys, ["benchmark", "--out", "run"])
    assert demo["epochs"] == DEMO_TRAINING["epochs"] and demo["data"] is None
    real = _printed(capsys, ["benchmark", "--out", "run", "--data", "mvtec"])
    assert real["epochs"] == TrainConfig().epochs


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epochs: 3\nbatch: 4\n", "unknown key 'batch'"),
        ("config: other.yaml\n", "unknown key 'config'"),
        ("epochs: 3\nimage_size: 64\nimage-size: 32\n", "set the same flag"),
        ("- epochs\n", "expected a mapping"),
        ("epochs: [3\n", "not valid YAML (line 2"),
        ("resume: yes please\n", "resume: expected true or false"),
        ("epochs: [3, 4]\n", "epochs: expected a single value"),
    ],
)
def test_config_mistakes_are_one_line_naming_the_file(text, message, tmp_path, capsys):
    config = _write(tmp_path / "bad.yaml", text)
    assert cli.main(["train", *REQUIRED["train"], "--config", str(config)]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"stfpm-ray train: error: config file {config}: ") and message in line


def test_a_missing_config_file_is_a_user_error(tmp_path, capsys):
    assert cli.main(["score", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: No such file" in _error_line(capsys)


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--data", "d", "--out", "o", "--epochs", "ten"],  # a bad value
        ["train", "--data", "d", "--out", "o", "--conf", "x.yaml"],  # verb flags are never abbreviated
        ["train", "--data", "d", "--out", "o", "--resume", "--overwrite"],
        ["evaluate", "--scores", "s", "--out", "r", "--config", "x.yaml"],  # evaluate takes no config
        ["synth", "data"],  # the positional output is gone: --out is required
        ["synth", "--out", "data", "--categories", "3"],  # ... and so is the count called --categories
    ],
)
def test_flag_mistakes_exit_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("verb", "text", "message"),
    [
        ("train", "epochs: ten\n", "epochs: 'ten' is not a valid int"),
        ("score", "precision: fp8\n", "precision: 'fp8' is not one of auto, fp32, bf16"),
        ("score", "actors: '3,1'\n", "actors: '3,1': "),
    ],
)
def test_a_bad_value_in_a_config_file_is_refused_naming_the_file(verb, text, message, tmp_path, capsys):
    config = _write(tmp_path / "bad.yaml", text)
    assert cli.main([verb, *REQUIRED[verb], "--config", str(config)]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"stfpm-ray {verb}: error: config file {config}: ") and message in line


def test_evaluate_refuses_a_folder_that_holds_a_report(tmp_path, capsys):
    report = tmp_path / "report"
    report.mkdir()
    (report / "metrics.json").write_text("{}")
    argv = ["evaluate", "--scores", str(tmp_path / "no-table"), "--out", str(report)]
    assert cli.main(argv) == 2
    line = _error_line(capsys)
    assert "already holds a report" in line and "--overwrite" in line
    assert (report / "metrics.json").read_text() == "{}"
    # with --overwrite it goes on, and stops at the missing table instead
    assert cli.main([*argv, "--overwrite"]) == 2
    assert "scores table" in _error_line(capsys)


def test_synth_writes_to_out_refuses_then_overwrites(tmp_path, capsys):
    out = tmp_path / "data"
    argv = ["synth", "--out", str(out), "--num-categories", "2", "--size", "32", "--train", "2", "--test", "2"]
    assert cli.main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 2 and "wrote 2 categories" in capsys.readouterr().out
    marker = out / names[0] / "stale.txt"
    marker.write_text("old run")
    assert cli.main(argv) == 2
    assert "already exist" in _error_line(capsys)
    assert cli.main([*argv, "--overwrite"]) == 0
    assert not marker.exists() and sorted(p.name for p in out.iterdir()) == names


def test_train_resume_into_an_empty_folder_says_it_starts_fresh(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    generate_dataset(data, categories=1, size=32, n_train=2, n_test=2, seed=0)
    calls = []
    monkeypatch.setattr("stfpm_ray.cli.train.train_categories", lambda *a, **kw: calls.append(kw) or [])
    assert cli.main(["train", "--data", str(data), "--out", str(tmp_path / "ckpt"), "--resume"]) == 0
    assert f"nothing to resume in {tmp_path / 'ckpt'}: starting fresh" in capsys.readouterr().out
    assert calls == [{"resume": True, "overwrite": False}]


def test_benchmark_passes_resume_through(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr("stfpm_ray.cli.benchmark.run_benchmark", lambda *a, **kw: calls.append(kw) or {"failed": []})
    out = tmp_path / "run"
    out.mkdir()
    (out / "benchmark.json").write_text("{}")
    assert cli.main(["benchmark", "--out", str(out), "--resume"]) == 0
    assert calls == [{"resume": True}] and "nothing to resume" not in capsys.readouterr().out


def test_benchmark_refusal_names_resume_and_overwrite(tmp_path):
    (tmp_path / "something").write_text("x")
    with pytest.raises(OutputExistsError, match="--resume to continue its benchmark, --overwrite to replace it"):
        run_benchmark(None, tmp_path, TrainConfig())
