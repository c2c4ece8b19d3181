"""The network spec: validation errors, derived layers, memory map and budget."""

import json
import subprocess
import sys

import pytest

from nqe.model.budget import compute_budget
from nqe.model.memory_map import build_memory_map
from nqe.model.spec import LayerKind, Residual, SpecError, load_spec, spec_from_dict

BUDGET = 1 << 20


def _base():
    return json.loads(load_spec("nqe-1mb").to_json())


def test_default_spec_fits_one_megabit():
    spec = load_spec("nqe-1mb")
    budget = compute_budget(spec)
    assert budget.limit_bits == BUDGET
    assert budget.total_bits <= BUDGET
    kinds = budget.by_kind()
    assert set(kinds) == {"weights", "biases", "shifts", "activations", "scheduler"}
    assert all(bits > 0 for bits in kinds.values())
    assert sum(kinds.values()) == budget.total_bits


def test_round_trip_through_json():
    spec = load_spec("nqe-1mb")
    again = spec_from_dict(json.loads(spec.to_json()))
    assert again == spec
    assert again.layers() == spec.layers()


def test_flattened_layers_of_default_spec():
    spec = load_spec("nqe-1mb")
    layers = spec.layers()
    assert [layer.index for layer in layers] == list(range(len(layers)))
    assert layers[0].kind is LayerKind.STEM and layers[0].in_bits == 8
    assert layers[-1].kind is LayerKind.CLASSIFIER and layers[-2].kind is LayerKind.POOL
    for prev, layer in zip(layers, layers[1:]):
        if layer.kind is not LayerKind.CLASSIFIER:
            assert layer.in_channels == prev.out_channels
            assert layer.in_bits == prev.out_bits
            assert (layer.in_height, layer.in_width) == (prev.out_height, prev.out_width)
    gw = spec.layer("b2.gw")
    assert (gw.stride, gw.groups, gw.out_height) == (2, 24, 16)
    assert spec.layer("b1.pw2").residual is Residual.ADD
    assert spec.layer("b1.pw2").residual_source == "b1.pw1"


def test_memory_map_is_contiguous_and_consistent():
    spec = load_spec("nqe-1mb")
    mm = build_memory_map(spec)
    base = 0
    for layer, placement in zip(spec.layers(), mm.placements):
        assert placement.weight_base == base
        base += placement.weight_words
        assert placement.in_bank != placement.out_bank
    assert base == mm.weight_words
    rows = mm.descriptors(spec)
    assert len(rows) == len(spec.layers())
    for field, width in mm.descriptor_widths.items():
        assert max(row[field] for row in rows) < 1 << width


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["blocks"][0].update(groups=5),
     r"layer 'b1.gw': field 'groups': 64 channels are not divisible by 5 groups"),
    (lambda d: d["blocks"][1].update(weight_bits=[2, 4, 2]),
     r"layer 'b2.gw': field 'weight_bits': weight width 4 is not supported"),
    (lambda d: d["stem"].update(act_bits=5),
     r"stem: field 'act_bits': activation width 5 is not supported"),
    (lambda d: d["blocks"][0].update(residual="sum"),
     r"block 0: field 'residual': 'sum' is not a residual mode"),
    (lambda d: d["blocks"][1].update(residual="add"),
     r"block 1 \('b2'\): field 'residual': 'add' needs stride 1"),
    (lambda d: d["blocks"][0].update(colour="red"),
     r"block 0: unknown field\(s\) colour"),
    (lambda d: d["blocks"][0].update(pw_groups=[3, 1]),
     r"layer 'b1.pw1': field 'pw_groups'"),
    (lambda d: d["blocks"][2].update(name="b1"), r"'b1' is used twice"),
    (lambda d: d["head"].update(weight_bits=0), r"head: field 'weight_bits'"),
    (lambda d: d["hardware"].update(lanes=12),
     r"hardware: field 'lanes' must be weight_word_bits // 3 = 16"),
    (lambda d: d["stem"].update(out_channels=-3), r"stem: field 'out_channels' must be a "
                                                  r"positive integer"),
])
def test_invalid_spec_errors_name_the_field(tmp_path, edit, message):
    data = _base()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SpecError, match=message) as info:
        load_spec(path)
    assert str(path) in str(info.value)


def test_unknown_spec_name():
    with pytest.raises(SpecError, match="no spec named 'nope'.*builtin: nqe-1mb"):
        load_spec("nope")


def _nqe(*args):
    return subprocess.run([sys.executable, "-m", "nqe.cli", *args], capture_output=True,
                          text=True)


def test_budget_command_reports_and_fits():
    result = _nqe("budget", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["fits"] and report["total_bits"] == compute_budget(load_spec("nqe-1mb")).total_bits
    text = _nqe("budget")
    assert text.returncode == 0 and "bank R" in text.stdout and "fits" in text.stdout


def test_budget_command_fails_over_budget(tmp_path):
    data = _base()
    data["blocks"][-1].update(expand=1024, groups=256)
    path = tmp_path / "big.json"
    path.write_text(json.dumps(data))
    result = _nqe("budget", "--spec", str(path))
    assert result.returncode == 1
    assert "over its budget of 1,048,576 bits" in result.stderr
    assert json.loads(_nqe("budget", "--spec", str(path), "--json").stdout)["fits"] is False


def test_budget_command_bad_spec_exit_code(tmp_path):
    data = _base()
    data["blocks"][0]["groups"] = 7
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    result = _nqe("budget", "--spec", str(path))
    assert result.returncode == 2
    assert "not divisible by 7 groups" in result.stderr
