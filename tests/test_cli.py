"""The `nqe` command line: help, JSON reports, exit codes and error messages."""

import json
import subprocess
import sys

import pytest

from nqe.model.random_spec import random_integer_network, random_spec
from nqe.model.spec import load_spec
from nqe.model.weights_io import write_weights


def nqe(*args):
    return subprocess.run([sys.executable, "-m", "nqe.cli", *args], capture_output=True,
                          text=True)


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """Random legal weights for the real nqe-1mb spec: for CLI behaviour, not accuracy."""
    folder = tmp_path_factory.mktemp("w") / "random-nqe-1mb"
    write_weights(random_integer_network(load_spec("nqe-1mb"), seed=11), folder)
    return folder


@pytest.mark.parametrize("command", ["budget", "train", "teacher", "export", "eval", "bench",
                                     "bench-train"])
def test_help(command):
    result = nqe(command, "--help")
    assert result.returncode == 0 and "usage: nqe" in result.stdout


def test_eval_json_with_model_comparison(random_weights, cifar_test):
    result = nqe("eval", "--weights", str(random_weights), "--images", "64", "--json",
                 "--compare-model", "--no-progress")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 64
    assert 0.0 <= report["accuracy"] <= 1.0
    assert report["model_logit_mismatches"] == 0
    assert report["model_prediction_mismatches"] == 0
    assert len(report["per_class_accuracy"]) >= 1


def test_bench_json(random_weights, cifar_test):
    result = nqe("bench", "--weights", str(random_weights), "--images", "100", "--json",
                 "--batch-size", "50", "--no-progress")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("integer_reference_images_per_s", "pytorch_images_per_s",
                "reference_over_pytorch"):
        assert report[key] > 0
    assert report["logit_mismatches"] == 0 and report["images"] == 100


def test_bench_train_json_times_every_variant_in_its_own_process(tmp_path):
    spec = tmp_path / "small.json"
    spec.write_text(json.dumps(random_spec(3).to_dict()))         # a residual add, a bottleneck
    result = nqe("bench-train", "--spec", str(spec), "--steps", "2", "--warmup", "0",
                 "--rounds", "1", "--batch-size", "4", "--threads", "1", "--json",
                 "--no-progress")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["seconds_per_step"]) == {"unfused, default allocator", "fused activation",
                                               "freed memory kept", "both (what nqe train runs)"}
    for name, seconds in report["all_seconds"].items():
        assert len(seconds) == 2 and all(s > 0 for s in seconds), name
    assert report["speedup_over_baseline"]["unfused, default allocator"] == 1.0
    assert report["torch_threads"] == 1 and report["phase"] == "batchnorm"
    assert report["allocator_setting_taken"] == sys.platform.startswith("linux")


def test_bench_train_refuses_a_spec_without_a_classifier(tmp_path):
    spec = tmp_path / "codes-only.json"
    spec.write_text(json.dumps(random_spec(3).to_dict() | {"head": None}))
    result = nqe("bench-train", "--spec", str(spec), "--no-progress")
    assert result.returncode == 2
    assert "no classifier head" in result.stderr and "Traceback" not in result.stderr
    result = nqe("bench-train", "--steps", "0")
    assert result.returncode == 2 and "--steps: must be at least 1, got 0" in result.stderr


def test_eval_missing_weights_is_a_clear_error(tmp_path):
    result = nqe("eval", "--weights", str(tmp_path / "nothing"))
    assert result.returncode == 2
    assert f"{tmp_path / 'nothing'}: weights folder not found" in result.stderr


def test_eval_missing_data_names_where_it_looked(random_weights, tmp_path):
    result = nqe("eval", "--weights", str(random_weights), "--data", str(tmp_path / "no-data"))
    assert result.returncode == 2
    assert "CIFAR-10 not found" in result.stderr and str(tmp_path / "no-data") in result.stderr


def test_export_refuses_to_skip_its_check(tmp_path):
    """`--check 0` once divided by zero; an export is always checked against the model."""
    result = nqe("export", "--checkpoint", str(tmp_path / "best.pt"), "--check", "0")
    assert result.returncode == 2 and "--check: must be at least 1, got 0" in result.stderr


def test_train_refuses_a_negative_dampening(tmp_path):
    """A negative --dampen would reward weights for sitting on the rounding thresholds."""
    result = nqe("train", "--out", str(tmp_path / "run"), "--dampen", "-1")
    assert result.returncode == 2 and "--dampen: must be at least 0, got -1" in result.stderr
    assert not (tmp_path / "run").exists()


def test_train_resume_from_a_missing_snapshot_is_a_clear_error(tmp_path):
    result = nqe("train", "--out", str(tmp_path / "run"), "--resume-from",
                 str(tmp_path / "snapshot.pt"), "--no-progress")
    assert result.returncode == 2
    assert f"--resume-from {tmp_path / 'snapshot.pt'}: no such snapshot file" in result.stderr
    both = nqe("train", "--resume", "--resume-from", str(tmp_path / "snapshot.pt"))
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
