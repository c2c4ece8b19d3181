"""SRAM banks: sizes from the memory map, init images byte for byte the exporter's packing, and
the synchronous read/write behaviour in simulation."""

import gc
import json

import numpy as np
import pytest
from amaranth.hdl import Fragment
from amaranth.sim import Simulator

from nqe.model import contract
from nqe.model.memory_map import build_memory_map, weight_stream_length, weights_from_stream
from nqe.model.random_spec import random_integer_network, random_spec
from nqe.model.spec import load_spec
from nqe.model.weights_io import WeightsError, write_weights
from nqe.rtl.sram import (Bank, bank_geometries, bias_image, build_banks, bytes_from_words,
                          weight_image, weight_image_from_folder, words_from_bytes)

SEED = 20261124
# Random specs: for each weight word width random_spec draws, the first two seeds drawing it.
SPEC_SEEDS = [seed for word_bits in (48, 16, 24, 32)
              for seed in [s for s in range(100)
                           if random_spec(s).hardware.weight_word_bits == word_bits][:2]]


def _exported(tmp_path, spec, seed):
    net = random_integer_network(spec, seed)
    folder = write_weights(net, tmp_path / f"w{seed}")
    return folder, net


def _layer_files(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    return {name: (folder / entry["files"]["weights"]["path"]).read_bytes()
            for name, entry in manifest["layers"].items()}


@pytest.mark.parametrize("spec_seed", SPEC_SEEDS)
def test_weight_image_is_the_exported_bytes(tmp_path, spec_seed):
    spec = random_spec(spec_seed)
    folder, net = _exported(tmp_path, spec, SEED + spec_seed)
    image = weight_image_from_folder(folder)
    memory_map = build_memory_map(spec)
    word_bits = spec.hardware.weight_word_bits
    assert len(image) == memory_map.weight_words, f"spec seed {spec_seed}"
    assert image == weight_image(net), f"spec seed {spec_seed}: folder and network images differ"
    for name, data in _layer_files(folder).items():
        placement = memory_map.placement(name)
        words = image[placement.weight_base:placement.weight_base + placement.weight_words]
        assert bytes_from_words(words, word_bits) == data, \
            f"spec seed {spec_seed}, layer {name!r}: SRAM words are not the file's bytes"
        layer = spec.layer(name)
        codes = contract.unpack_codes(bytes_from_words(words, word_bits), layer.weight_bits,
                                      word_bits, weight_stream_length(layer, spec.hardware))
        assert np.array_equal(weights_from_stream(codes, layer, spec.hardware),
                              net.layers[name].codes), f"spec seed {spec_seed}, layer {name!r}"


def test_weight_image_of_the_headline_spec(tmp_path):
    spec = load_spec("nqe-1mb")
    folder, net = _exported(tmp_path, spec, SEED)
    image = weight_image_from_folder(folder, spec)
    assert image == weight_image(net)
    assert len(image) == build_memory_map(spec).weight_words
    assert all(0 <= word < 1 << 48 for word in image)


def test_tampered_folder_is_refused(tmp_path):
    spec = random_spec(SPEC_SEEDS[0])
    folder, _ = _exported(tmp_path, spec, SEED)
    path = next(folder.glob("*.weights.bin"))
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="checksum"):
        weight_image_from_folder(folder)


def test_words_and_bytes_round_trip():
    rng = np.random.default_rng(SEED)
    for word_bits in (3, 16, 24, 48, 50, 72):
        words = [int(w) for w in rng.integers(0, 1 << min(word_bits, 62), size=20)]
        data = bytes_from_words(words, word_bits)
        assert len(data) == 20 * contract.word_bytes(word_bits)
        assert words_from_bytes(data, word_bits) == words, f"seed {SEED}, {word_bits} bits"
    with pytest.raises(ValueError, match="whole number"):
        words_from_bytes(b"\x00" * 7, 48)


def test_bias_image_is_twos_complement_in_the_bias_word():
    spec = random_spec(SPEC_SEEDS[1])
    net = random_integer_network(spec, SEED)
    memory_map = build_memory_map(spec)
    bits = memory_map.bias_word_bits
    image = bias_image(net)
    assert len(image) == memory_map.bias_words
    for layer in spec.layers():
        if not layer.has_weights:
            continue
        base = memory_map.placement(layer.name).bias_base
        words = np.array(image[base:base + layer.out_channels], dtype=np.int64)
        decoded = np.where(words >= 1 << (bits - 1), words - (1 << bits), words)
        assert np.array_equal(decoded, net.layers[layer.name].bias), f"layer {layer.name!r}"


def test_geometries_come_from_the_memory_map():
    spec = load_spec("nqe-1mb")
    memory_map = build_memory_map(spec)
    sizes = bank_geometries(spec)
    word_bits = spec.hardware.weight_word_bits
    assert (sizes["weights"].width, sizes["weights"].depth) == (word_bits,
                                                                memory_map.weight_words)
    assert (sizes["biases"].width, sizes["biases"].depth) == (memory_map.bias_word_bits,
                                                              memory_map.bias_words)
    for name, bits in (("act_a", memory_map.bank_bits[0]), ("act_b", memory_map.bank_bits[1]),
                       ("residual", memory_map.residual_bits)):
        assert sizes[name].width == word_bits
        assert sizes[name].bits >= bits > sizes[name].bits - word_bits, name
    assert bank_geometries(spec, act_word_bits=16)["act_a"].depth == \
        -(-memory_map.bank_bits[0] // 16)


def test_bank_reads_its_image_one_cycle_later_and_writes():
    """Every address of a real weight image read back through the synchronous port (data one
    cycle after the address), a hold while ``en`` is low, then writes, with a read of the word
    being written returning the old word."""
    spec = random_spec(SPEC_SEEDS[2])
    net = random_integer_network(spec, SEED)
    size = bank_geometries(spec)["weights"]
    image = weight_image(net)
    bank = Bank(size.width, size.depth, image)
    rng = np.random.default_rng(SEED)
    writes = {int(a): int(rng.integers(0, 1 << bank.width)) for a in
              rng.choice(bank.depth, size=min(8, bank.depth), replace=False)}
    seen = []

    async def testbench(ctx):
        for address in range(bank.depth):
            ctx.set(bank.read.addr, address)
            await ctx.tick()
            seen.append(ctx.get(bank.read.data))
        ctx.set(bank.read.en, 0)
        ctx.set(bank.read.addr, 0)
        await ctx.tick()
        assert ctx.get(bank.read.data) == image[-1], "read data must hold while en is low"
        ctx.set(bank.read.en, 1)
        for address, word in writes.items():
            ctx.set(bank.write.addr, address)
            ctx.set(bank.write.data, word)
            ctx.set(bank.write.en, 1)
            ctx.set(bank.read.addr, address)
            await ctx.tick()
            assert ctx.get(bank.read.data) == image[address], \
                f"seed {SEED}: read-during-write of {address} must return the old word"
        ctx.set(bank.write.en, 0)
        for address, word in writes.items():
            ctx.set(bank.read.addr, address)
            await ctx.tick()
            assert ctx.get(bank.read.data) == word, f"seed {SEED}: write to {address} lost"

    sim = Simulator(bank)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    assert seen == list(image) + [0] * (bank.depth - len(image))


def test_build_banks_sizes_and_fills_every_bank():
    spec = random_spec(SPEC_SEEDS[3])
    net = random_integer_network(spec, SEED)
    banks = build_banks(spec, net)
    sizes = bank_geometries(spec)
    assert set(banks) == set(sizes)
    for name, bank in banks.items():
        assert (bank.width, bank.depth) == (sizes[name].width, sizes[name].depth), name
        Fragment.get(bank, None)                # elaborates, memory and ports included
    assert list(banks["weights"].init) == weight_image(net)
    assert list(banks["biases"].init) == bias_image(net)
    assert banks["act_a"].init == ()


def test_banks_refuse_a_network_of_another_spec():
    net = random_integer_network(random_spec(SPEC_SEEDS[0]), SEED)
    with pytest.raises(ValueError, match="spec"):
        build_banks(random_spec(SPEC_SEEDS[1]), net)


@pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")
@pytest.mark.parametrize("kwargs, message", [
    (dict(width=0, depth=4), "width"),
    (dict(width=8, depth=0), "depth"),
    (dict(width=8, depth=2, init=[1, 2, 3]), "depth 2"),
    (dict(width=4, depth=2, init=[16]), "does not fit"),
])
def test_bad_bank_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message) as raised:
        Bank(**kwargs)
    del raised           # the traceback holds the half-built object: collect it under the filter
    gc.collect()
