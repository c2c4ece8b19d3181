"""Verilog generation: files, JSON map, and a lint-clean top (verilator --lint-only -Wall)."""

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


def _check_output(out, report, module="nqe_top"):
    assert report["top"] == f"{module}.v" and (out / report["top"]).is_file()
    assert json.loads((out / f"{module}.json").read_text())["top"] == report["top"]
    assert report["lint"]["ok"] is True
    names = {port["name"] for port in report["ports"]}
    assert any("valid" in n for n in names) and any("ready" in n for n in names)
    assert report["counters"][:2] == ["total_cycles", "mac_busy_cycles"]


def test_verilog_for_a_random_spec_is_lint_clean(tmp_path):
    seed = 4
    print(f"random spec seed {seed}")
    spec = random_spec(seed)
    write_weights(random_integer_network(spec, seed), tmp_path / "w")
    result = nqe("verilog", "--weights", str(tmp_path / "w"), "-o", str(tmp_path / "v"),
                 "--memory-init", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    _check_output(tmp_path / "v", report)
    inits = {bank["name"]: bank.get("init") for bank in report["banks"]}
    assert inits["weights"] == "weights.hex" and inits["biases"] == "biases.hex"
    words = (tmp_path / "v" / "weights.hex").read_text().split()
    depth = next(b["depth"] for b in report["banks"] if b["name"] == "weights")
    assert len(words) <= depth


@pytest.mark.slow
def test_verilog_for_nqe_1mb_is_lint_clean(tmp_path):
    write_weights(random_integer_network(load_spec("nqe-1mb"), 1), tmp_path / "w")
    result = nqe("verilog", "--weights", str(tmp_path / "w"), "-o", str(tmp_path / "v"),
                 "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    _check_output(tmp_path / "v", report)
    assert report["generation_seconds"] < 120


def test_verilog_bad_weights_is_a_clear_error(tmp_path):
    result = nqe("verilog", "--weights", str(tmp_path / "none"), "-o", str(tmp_path / "v"))
    assert result.returncode == 2 and "weights folder not found" in result.stderr
