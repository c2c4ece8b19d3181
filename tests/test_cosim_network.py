"""The whole accelerator on Verilator with real CIFAR-10 test images: a small hand-made 32x32
spec (stem and one block at stride 2, a residual-add block, a 10-class head; 3b/2b/1b weights)
with random integer weights, co-simulated through the host protocol
(``nqe.cosim.network.cosimulate``); every logit and class index bit-exact against the integer
reference, and the report's fields present and consistent.

About 40 s from a clean build (``sim_build/network/cosim-cifar-32``), a few seconds plus the
images when current. ``NQE_COSIM_DEBUG=1`` builds with waveforms and, on a mismatch, names the
first mismatching layer/channel/pixel.
"""

import os

import numpy as np
import pytest

from nqe.model.contract import Residual
from nqe.model.random_spec import random_integer_network
from nqe.model.spec import BlockSpec, Hardware, HeadSpec, NetworkSpec, StemSpec
from nqe.model.weights_io import write_weights

SEED = 20261122
IMAGES = 4
REPORT_FIELDS = ("images", "mismatches", "accuracy", "cycles_per_image", "ideal_cycles_per_image",
                 "mac_utilization", "sim_cycles_per_s", "wall_seconds_per_image",
                 "build_seconds", "layer_cycles", "mac_busy_cycles_per_image")


def cifar_spec():
    """32x32x3 in, CIFAR-sized; small enough for a quick build and about 0.1 M cycles an image."""
    return NetworkSpec(
        name="cosim-cifar-32", input_height=32, input_width=32, input_channels=3,
        stem=StemSpec(out_channels=8, kernel=3, stride=2, weight_bits=3, act_bits=2),
        blocks=(BlockSpec("b1", expand=16, out_channels=8, groups=4, stride=2,
                          weight_bits=(2, 3, 1), act_bits=(2, 2, 2)),
                BlockSpec("b2", expand=16, out_channels=8, groups=4, residual=Residual.ADD,
                          weight_bits=(1, 2, 2), act_bits=(2, 2, 2))),
        head=HeadSpec(num_classes=10, weight_bits=2),
        hardware=Hardware(weight_word_bits=24, lanes=8))


def test_cifar_images_match_reference_on_verilator(cifar_test, tmp_path):
    from nqe.cosim.network import cosimulate

    spec = cifar_spec()
    net = random_integer_network(spec, SEED)
    weights = write_weights(net, tmp_path / "weights")
    images, labels = cifar_test.test_x[:IMAGES], cifar_test.test_y[:IMAGES]
    report = cosimulate(weights, images, labels, stalls=True, seed=SEED, check_layers=True,
                        debug=os.environ.get("NQE_COSIM_DEBUG") == "1")
    print({key: report[key] for key in REPORT_FIELDS})

    for field in REPORT_FIELDS:
        assert field in report, f"report lacks {field!r}"
    assert report["images"] == IMAGES
    assert report["mismatches"] == 0, f"seed {SEED}: {report['mismatch_details']}"
    assert report["accuracy"] == np.mean(np.asarray(report["class_indices"]) == labels)
    ideal = report["ideal_cycles_per_image"]
    assert ideal == pytest.approx(sum(layer.macs / (24 // layer.weight_bits)
                                      for layer in spec.layers() if layer.has_weights))
    utilization = report["mac_utilization"]
    assert utilization["overall"] == pytest.approx(ideal / report["cycles_per_image"])
    assert set(utilization["layers"]) == {layer.name for layer in spec.layers()
                                          if layer.has_weights}
    assert all(0 < value <= 1 for value in utilization["layers"].values()), utilization
    assert report["sim_cycles_per_s"] > 0 and report["wall_seconds_per_image"] > 0


def test_speed_run_uses_the_fast_build(cifar_test, tmp_path):
    """A run without check_layers/debug builds the fast variant (no ``--public-flat-rw``, only
    the ports public; its own folder ``cosim-cifar-32_fast``) and is still bit-exact on real
    images. About 30 s from a clean build, a few seconds when current."""
    from nqe.cosim.network import build_folder, cosimulate

    weights = write_weights(random_integer_network(cifar_spec(), SEED), tmp_path / "weights")
    images, labels = cifar_test.test_x[:3], cifar_test.test_y[:3]
    report = cosimulate(weights, images, labels, seed=SEED)
    print({key: report[key] for key in (*REPORT_FIELDS, "build_variant")})

    assert report["build_variant"] == "fast"
    assert report["images"] == 3
    assert report["mismatches"] == 0, f"seed {SEED}: {report['mismatch_details']}"
    assert report["sim_cycles_per_s"] > 0
    folder = build_folder(cifar_spec().name, variant="fast")
    assert (folder / "ports.vlt").is_file() and str(folder) in report["results_file"]
    with pytest.raises(ValueError, match="visible"):
        cosimulate(weights, images, variant="fast", check_layers=True)


@pytest.mark.slow
def test_debug_mode_names_the_first_mismatching_layer(tmp_path):
    """The checker checked: the reference runs on weights that differ from the loaded ones in one
    middle layer only; the report must flag the images and debug mode must name that layer (read
    back from the simulator's banks), not the final map only. Builds with waveforms (~1 min)."""
    import dataclasses

    from nqe.cosim.network import cosimulate
    from nqe.model.integer_reference import run_reference
    from nqe.model.random_spec import random_spec

    seed = 35                                   # the smallest spec of test_cosim_random_specs
    spec = random_spec(seed)
    net = random_integer_network(spec, seed)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(2, spec.input_height, spec.input_width,
                                        spec.input_channels), dtype=np.uint8)
    logits, acts = run_reference(net, images, return_activations=True)
    # A middle layer whose output, and the logits, change when each bias moves to the far end of
    # its range: the layer debug mode must name.
    for layer in [layer for layer in spec.layers() if layer.has_weights][1:]:
        params = net.layers[layer.name]
        low, high = layer.bias_bounds(net.shift_of(layer))
        far = np.where(params.bias > (low + high) // 2, low, high).astype(params.bias.dtype)
        changed = dataclasses.replace(params, bias=far)
        wrong = dataclasses.replace(net, layers={**net.layers, layer.name: changed})
        wrong_logits, wrong_acts = run_reference(wrong, images, return_activations=True)
        if (not np.array_equal(wrong_acts[layer.name], acts[layer.name])
                and not np.array_equal(wrong_logits, logits)):
            break
    else:
        pytest.fail(f"seed {seed}: no layer of {spec.name} changes the logits")
    loaded = write_weights(net, tmp_path / "loaded")
    model = write_weights(wrong, tmp_path / "model")

    report = cosimulate(loaded, images, debug=True, seed=seed, model_weights_dir=model)
    assert report["mismatches"] >= 1, f"seed {seed}: the checker missed a wrong {layer.name}"
    named = report["mismatch_details"][0]["first_layer_mismatch"]
    assert named["layer"] == layer.name, f"seed {seed}: named {named}, changed {layer.name}"
    assert "channel" in named, named
    assert report["waves"] and os.path.getsize(report["waves"]) > 0, report["waves"]


def test_cosim_command_json_report(cifar_test, tmp_path):
    """`nqe cosim --json` on real test images spread over the classes (same build as above)."""
    import json
    import subprocess
    import sys

    weights = write_weights(random_integer_network(cifar_spec(), SEED + 1), tmp_path / "w")
    result = subprocess.run([sys.executable, "-m", "nqe.cli", "cosim", "--weights", str(weights),
                             "--images", "3", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    for field in REPORT_FIELDS:
        assert field in report, f"report lacks {field!r}"
    assert report["images"] == 3 and report["mismatches"] == 0
    assert report["test_image_indices"] == [0, 5000, 9999]


SHIPPED_IMAGES = 32


@pytest.mark.slow
def test_shipped_weights_on_verilator(cifar_test):
    """The product's promise on the product's network: weights/nqe-1mb (the README's default
    weights) on its generated RTL, real test images spread over the test set, every logit and
    class bit-exact, the cycle count the scheduler predicts. From a clean clone this generates and
    builds the full design (15 s + 95 s measured on 2 cores, reused in sim_build/ afterwards),
    then about 10 s per image; `nox -s cosim` runs 100 images on the same build."""
    from pathlib import Path

    from nqe.cosim.network import cosimulate
    from nqe.model.memory_map import build_memory_map
    from nqe.model.weights_io import load_weights
    from nqe.rtl.engine import Engine

    weights = Path(__file__).resolve().parent.parent / "weights" / "nqe-1mb"
    spec = load_weights(weights).spec
    picks = np.linspace(0, len(cifar_test.test_x) - 1, SHIPPED_IMAGES).astype(int)
    report = cosimulate(weights, cifar_test.test_x[picks], cifar_test.test_y[picks], seed=SEED)
    print({key: report[key] for key in REPORT_FIELDS if key != "layer_cycles"})

    assert report["images"] == SHIPPED_IMAGES
    assert report["mismatches"] == 0, report["mismatch_details"]
    assert report["ideal_cycles_per_image"] == pytest.approx(
        sum(layer.macs / (spec.hardware.weight_word_bits // layer.weight_bits)
            for layer in spec.layers() if layer.has_weights))
    rows = build_memory_map(spec).descriptors(spec)
    expected_layers = {layer.name: Engine.layer_cycles(row)
                       for layer, row in zip(spec.layers(), rows)}
    assert report["layer_cycles"] == expected_layers
    assert report["cycles_per_image"] == sum(expected_layers.values())
    assert 0 < report["mac_utilization"]["overall"] <= 1
