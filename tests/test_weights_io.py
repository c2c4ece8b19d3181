"""The weights folder: round trip and every kind of bad input, each with one clear error."""

import hashlib
import json
import shutil

import numpy as np
import pytest

from nqe.model import contract
from nqe.model.memory_map import layer_tiling, weight_stream, weights_from_stream
from nqe.model.random_spec import random_integer_network, random_spec
from nqe.model.spec import Residual
from nqe.model.weights_io import WeightsError, load_weights, write_weights


def _spec_with_mux():
    for seed in range(200):
        spec = random_spec(seed)
        if any(layer.residual is Residual.MUX for layer in spec.layers()):
            return spec, seed
    raise AssertionError("no random spec with a mux residual")


@pytest.fixture
def folder(tmp_path):
    spec, seed = _spec_with_mux()
    net = random_integer_network(spec, seed)
    write_weights(net, tmp_path / "w")
    return tmp_path / "w", net


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def _save_manifest(folder, manifest):
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_round_trip(folder):
    path, net = folder
    loaded = load_weights(path)
    assert loaded.shifts == net.shifts
    for name, layer in net.layers.items():
        assert (loaded.layers[name].codes == layer.codes).all()
        assert (loaded.layers[name].bias == layer.bias).all()
        if layer.select is not None:
            assert (loaded.layers[name].select == layer.select).all()


def test_weight_file_is_the_sram_packing(folder):
    path, net = folder
    spec = net.spec
    layer = next(layer for layer in spec.layers() if layer.has_weights)
    packed = (path / f"{layer.name}.weights.bin").read_bytes()
    stream = weight_stream(net.layers[layer.name].codes, layer, spec.hardware)
    assert packed == contract.pack_codes(stream, layer.weight_bits,
                                         spec.hardware.weight_word_bits)


def test_missing_manifest(tmp_path):
    (tmp_path / "w").mkdir()
    with pytest.raises(WeightsError, match="missing file manifest.json"):
        load_weights(tmp_path / "w")


def test_missing_file(folder):
    path, _ = folder
    (path / "stem.bias.bin").unlink()
    with pytest.raises(WeightsError, match=r"layer 'stem': missing file stem.bias.bin"):
        load_weights(path)


def test_checksum_mismatch(folder):
    path, _ = folder
    data = bytearray((path / "classifier.bias.bin").read_bytes())
    data[0] ^= 1
    (path / "classifier.bias.bin").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"layer 'classifier': checksum mismatch in "
                                           r"classifier.bias.bin"):
        load_weights(path)


def test_wrong_shape(folder):
    path, net = folder
    manifest = _manifest(path)
    name = next(iter(net.layers))
    manifest["layers"][name]["weight_shape"][0] += 1
    _save_manifest(path, manifest)
    with pytest.raises(WeightsError, match=rf"layer '{name}': field 'weight_shape' is .* the "
                                           rf"spec expects"):
        load_weights(path)


def _rewrite(path, manifest, layer, kind, data):
    entry = manifest["layers"][layer]["files"][kind]
    (path / entry["path"]).write_bytes(data)
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    entry["bytes"] = len(data)
    _save_manifest(path, manifest)


def test_illegal_code(folder):
    path, net = folder
    manifest = _manifest(path)
    layer = next(layer for layer in net.spec.layers() if layer.weight_bits in (2, 3))
    data = bytearray((path / f"{layer.name}.weights.bin").read_bytes())
    # Field 0b10 (2b) / 0b100 (3b) in the first code: illegal in both widths.
    data[0] = (data[0] & ~((1 << layer.weight_bits) - 1)) | (1 << (layer.weight_bits - 1))
    _rewrite(path, manifest, layer.name, "weights", bytes(data))
    with pytest.raises(WeightsError, match=rf"layer '{layer.name}'.*illegal "
                                           rf"{layer.weight_bits}-bit weight"):
        load_weights(path)


@pytest.mark.parametrize("seed", range(12))
def test_weight_stream_is_one_code_per_lane_and_inverts(seed):
    """The stream walks (group tile, channel tile, fan-in term) with code l of a word = lane l's
    weight, written out here as a plain loop nest; weights_from_stream inverts it."""
    spec = random_spec(seed)
    net = random_integer_network(spec, seed)
    for layer in spec.layers():
        if not layer.has_weights:
            continue
        t = layer_tiling(layer, spec.hardware)
        codes = net.layers[layer.name].codes
        og = layer.out_channels // layer.groups
        expected = []
        for gt in range(t.group_tiles):
            for ct in range(t.channel_tiles):
                for f in range(t.fan_in):
                    for lane in range(t.codes_per_word):
                        g = gt * t.tile_groups + lane // t.group_lanes
                        oc = ct * t.group_lanes + lane % t.group_lanes
                        inside = lane < t.lanes and oc < og
                        expected.append(int(codes[g * og + oc].reshape(-1)[f]) if inside
                                        else (-1 if layer.weight_bits == 1 else 0))
        stream = weight_stream(codes, layer, spec.hardware)
        where = f"spec seed {seed}, layer {layer.name!r}"
        assert stream.tolist() == expected, where
        assert np.array_equal(weights_from_stream(stream, layer, spec.hardware), codes), where


def test_nonzero_padding_code_is_rejected(tmp_path):
    """A padding lane (an output channel no tile has) holding a real code is an error naming
    the file, the layer and the position, never silently dropped."""
    for seed in range(200):
        spec = random_spec(seed)
        layer = next((layer for layer in spec.layers() if layer.has_weights
                      and layer.weight_bits > 1
                      and len(weight_stream(np.zeros(layer.weight_shape, int), layer,
                                            spec.hardware)) > layer.weight_count), None)
        if layer is not None:
            break
    net = random_integer_network(spec, seed)
    write_weights(net, tmp_path / "w")
    stream = weight_stream(net.layers[layer.name].codes, layer, spec.hardware)
    position = int(np.flatnonzero(
        weight_stream(np.ones(layer.weight_shape, int), layer, spec.hardware) == 0)[0])
    stream[position] = 1
    manifest = _manifest(tmp_path / "w")
    data = contract.pack_codes(stream, layer.weight_bits, spec.hardware.weight_word_bits)
    _rewrite(tmp_path / "w", manifest, layer.name, "weights", data)
    with pytest.raises(WeightsError, match=rf"layer '{layer.name}' \({layer.name}.weights.bin\)"
                                           rf".*position {position} is padding"):
        load_weights(tmp_path / "w")


def test_wrong_packed_length(folder):
    path, net = folder
    manifest = _manifest(path)
    layer = "stem"
    data = (path / f"{layer}.weights.bin").read_bytes() + b"\0" * 8
    _rewrite(path, manifest, layer, "weights", data)
    with pytest.raises(WeightsError, match="layer 'stem'.*packed weights hold"):
        load_weights(path)


def test_bias_out_of_range(folder):
    path, net = folder
    manifest = _manifest(path)
    layer = net.spec.layer("stem")
    bias = net.layers["stem"].bias.copy()
    _, hi = layer.bias_bounds(net.shift_of(layer))
    bias[1] = hi + 1
    _rewrite(path, manifest, "stem", "bias", bias.astype("<i4").tobytes())
    with pytest.raises(WeightsError, match=r"layer 'stem': bias .* of channel 1 is outside"):
        load_weights(path)


def test_shift_out_of_range(folder):
    path, _ = folder
    manifest = _manifest(path)
    manifest["shifts"]["stem"] = 99
    _save_manifest(path, manifest)
    with pytest.raises(WeightsError, match=r"field 'shifts.stem' is 99"):
        load_weights(path)


def test_spec_mismatch(folder):
    path, _ = folder
    with pytest.raises(WeightsError, match="differs from the requested spec 'nqe-1mb'"):
        load_weights(path, spec="nqe-1mb")


def test_budget_overrun_in_embedded_spec_is_reported_not_loaded(folder):
    path, net = folder
    manifest = _manifest(path)
    manifest["spec"]["blocks"][0]["groups"] = 1000
    _save_manifest(path, manifest)
    with pytest.raises(WeightsError, match="manifest.json field 'spec'"):
        load_weights(path)


def test_shipped_weights_load(shipped_net):
    assert shipped_net.spec.name == "nqe-1mb"
    assert set(shipped_net.shifts) == set(shipped_net.spec.shift_groups())


def test_copy_of_shipped_weights_detects_tampering(tmp_path, shipped_net):
    from conftest import SHIPPED_WEIGHTS
    copy = tmp_path / "copy"
    shutil.copytree(SHIPPED_WEIGHTS, copy)
    target = copy / "b3.gw.weights.bin"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="layer 'b3.gw': checksum mismatch"):
        load_weights(copy)
    assert np.array_equal(load_weights(SHIPPED_WEIGHTS).layers["b3.gw"].codes,
                          shipped_net.layers["b3.gw"].codes)
