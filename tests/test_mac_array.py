"""MACArray: every weight width with random and extreme codes and activations, against exact
integer dot products of the codes that the contract decodes from the packed words."""

import gc

import numpy as np
import pytest
from amaranth import Signal
from amaranth.back import rtlil
from amaranth.lib import data
from amaranth.sim import Simulator

from nqe.model import contract
from nqe.model.spec import load_spec
from nqe.rtl.mac_array import MACArray

SEED = 20261122
WORD_BITS = 48


def _word(codes, bits, word_bits):
    """One packed weight word, exactly as the weight SRAM holds it (the contract's packer)."""
    return int.from_bytes(contract.pack_codes(np.asarray(codes), bits, word_bits), "little")


def _dot_product_words(dut, codes, acts, bits, in_bits):
    """The words presented for one dot product: codes split into SRAM words, each word once per
    activation digit, with ``first`` on the first and ``last`` on the final presentation."""
    per_word = contract.codes_per_word(bits, dut.weight_word_bits)
    digit_mask = (1 << dut.lane_act_bits) - 1
    items = []
    for start in range(0, len(codes), per_word):
        word = _word(codes[start:start + per_word], bits, dut.weight_word_bits)
        chunk = [int(a) for a in acts[start:start + per_word]]
        for digit in range(dut.cycles_per_word(in_bits)):
            lanes = [(a >> (digit * dut.lane_act_bits)) & digit_mask for a in chunk]
            lanes += [0] * (dut.weight_word_bits - len(lanes))
            items.append({"weights": word, "activations": lanes, "digit": digit,
                          "first": 0, "last": 0})
    items[0]["first"] = 1
    items[-1]["last"] = 1
    return items


def _run(dut, bits, stimulus, gaps=None):
    """Drive ``stimulus`` (a list of input payloads), optionally with idle cycles between them,
    and return every result transfer."""
    results = []

    async def testbench(ctx):
        ctx.set(dut.weight_bits, bits)
        for index, item in enumerate(stimulus):
            for _ in range(gaps[index] if gaps else 0):
                ctx.set(dut.input.valid, 0)
                await ctx.tick()
                if ctx.get(dut.result.valid):
                    results.append(ctx.get(dut.result.payload))
            ctx.set(dut.input.payload, item)
            ctx.set(dut.input.valid, 1)
            await ctx.tick()
            if ctx.get(dut.result.valid):
                results.append(ctx.get(dut.result.payload))
        ctx.set(dut.input.valid, 0)
        for _ in range(4):
            await ctx.tick()
            if ctx.get(dut.result.valid):
                results.append(ctx.get(dut.result.payload))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return results


def _check(dut, bits, in_bits, cases, seed, gaps=None):
    """``cases``: list of (codes, acts). Runs them back to back; compares each result with the
    exact sum of products."""
    stimulus = []
    for codes, acts in cases:
        stimulus += _dot_product_words(dut, codes, acts, bits, in_bits)
    results = _run(dut, bits, stimulus, gaps)
    expected = [int((np.asarray(c, np.int64) * np.asarray(a, np.int64)).sum()) for c, a in cases]
    assert results == expected, (f"seed {seed}, {bits}-bit weights x {in_bits}-bit activations: "
                                 f"got {results}, expected {expected}")


def _acc_bits(fan_in, bits, in_bits):
    bound = contract.accumulator_bound(fan_in, bits, in_bits)
    return contract.signed_bits(-bound, bound)


@pytest.mark.parametrize("bits", contract.WEIGHT_BITS)
@pytest.mark.parametrize("in_bits", [1, 2, 3, 8])
def test_random_dot_products(bits, in_bits):
    seed = SEED + 10 * bits + in_bits
    rng = np.random.default_rng(seed)
    dut = MACArray(WORD_BITS, act_bits_max=8, acc_bits=_acc_bits(300, bits, 8))
    cases = []
    for _ in range(8 if in_bits == 8 else 12):
        # Fan-ins that are not multiples of the codes per word leave a part-filled last word.
        fan_in = int(rng.integers(1, 3 * dut.products_per_cycle(bits) + 1))
        codes = rng.choice(contract.legal_codes(bits), size=fan_in)
        acts = rng.integers(0, 1 << in_bits, size=fan_in)
        cases.append((codes, acts))
    _check(dut, bits, in_bits, cases, seed)


@pytest.mark.parametrize("bits", contract.WEIGHT_BITS)
@pytest.mark.parametrize("in_bits", [3, 8])
def test_extremes_reach_the_derived_accumulator_width(bits, in_bits):
    """All max codes x max activations and all min codes x max activations over a fan-in of
    three full words: the sums are exactly +-accumulator_bound, in an accumulator of exactly the
    width the contract derives from that bound (no spare bit to hide an overflow)."""
    fan_in = 3 * contract.codes_per_word(bits, WORD_BITS)
    dut = MACArray(WORD_BITS, act_bits_max=8, acc_bits=_acc_bits(fan_in, bits, in_bits))
    top = (1 << in_bits) - 1
    legal = contract.legal_codes(bits)
    full = np.full(fan_in, top)
    cases = [
        (np.full(fan_in, max(legal)), full),
        (np.full(fan_in, min(legal)), full),
        (np.full(fan_in, max(legal)), np.zeros(fan_in, int)),
        (np.where(np.arange(fan_in) % 2, max(legal), min(legal)), full),
        (np.full(fan_in, min(legal)), full),
    ]
    bound = contract.accumulator_bound(fan_in, bits, in_bits)
    assert abs(int((cases[1][0] * full).sum())) == bound
    _check(dut, bits, in_bits, cases, seed="none (fixed extremes)")


@pytest.mark.parametrize("bits", contract.WEIGHT_BITS)
def test_straddling_word_and_idle_cycles(bits):
    """A word holding the tail of one output channel and the head of the next is presented once
    per channel, with zero activations on the other channel's lanes; idle cycles in between do
    not disturb the accumulator."""
    seed = SEED + 100 + bits
    rng = np.random.default_rng(seed)
    dut = MACArray(WORD_BITS, act_bits_max=3, acc_bits=_acc_bits(200, bits, 3))
    per_word = dut.products_per_cycle(bits)
    fan_in = per_word + per_word // 2          # channel 1 ends mid-word 2, channel 2 starts there
    codes = rng.choice(contract.legal_codes(bits), size=2 * fan_in)
    acts = rng.integers(0, 8, size=2 * fan_in)
    stimulus, cases = [], []
    for channel in range(2):
        masked = np.zeros(2 * fan_in, int)
        masked[channel * fan_in:(channel + 1) * fan_in] = acts[channel * fan_in:(channel + 1) *
                                                               fan_in]
        first_word = (channel * fan_in) // per_word
        last_word = ((channel + 1) * fan_in - 1) // per_word
        span = slice(first_word * per_word, (last_word + 1) * per_word)
        stimulus += _dot_product_words(dut, codes[span], masked[span], bits, 3)
        cases.append(int((codes[channel * fan_in:(channel + 1) * fan_in].astype(np.int64) *
                          acts[channel * fan_in:(channel + 1) * fan_in]).sum()))
    gaps = [int(g) for g in rng.integers(0, 3, size=len(stimulus))]
    results = _run(dut, bits, stimulus, gaps)
    assert results == cases, f"seed {seed}: got {results}, expected {cases}"


def test_latency():
    """The result appears LATENCY clock edges after the edge that accepts the last word, and
    only then."""
    dut = MACArray(WORD_BITS, act_bits_max=3, acc_bits=10)
    item = {"weights": _word([1] * 16, 3, WORD_BITS), "activations": [3] * WORD_BITS,
            "digit": 0, "first": 1, "last": 1}
    valid_after = []

    async def testbench(ctx):
        ctx.set(dut.weight_bits, 3)
        ctx.set(dut.input.payload, item)
        ctx.set(dut.input.valid, 1)
        for edge in range(1, 5):
            await ctx.tick()
            ctx.set(dut.input.valid, 0)
            if ctx.get(dut.result.valid):
                valid_after.append((edge, ctx.get(dut.result.payload)))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    assert valid_after == [(MACArray.LATENCY, 48)]


def test_word_padding_bits_are_ignored():
    """A 50-bit word holds 16 3b codes (2 padding bits), 25 2b codes, 50 1b codes; the padding
    bits of a 3b word never contribute, even if set."""
    dut = MACArray(50, act_bits_max=3, acc_bits=12)
    assert [dut.products_per_cycle(b) for b in (3, 2, 1)] == [16, 25, 50]
    codes = [1] * 16
    word = _word(codes, 3, 50) | (0b11 << 48)
    item = {"weights": word, "activations": [7] * 50, "digit": 0, "first": 1, "last": 1}
    assert _run(dut, 3, [item]) == [16 * 7]


def test_sizes_come_from_the_spec():
    spec = load_spec("nqe-1mb")
    dut = MACArray.from_spec(spec)
    layers = [layer for layer in spec.layers() if layer.has_weights]
    assert dut.weight_word_bits == spec.hardware.weight_word_bits
    assert dut.acc_bits == max(layer.acc_bits for layer in layers)
    assert dut.act_bits_max == max(layer.in_bits for layer in layers) == 8
    assert dut.lanes == 16 and dut.digits == 3
    assert [dut.products_per_cycle(b) for b in (3, 2, 1)] == [16, 24, 48]
    ports = []
    for _, _, value in dut.signature.flatten(dut):
        value = value.as_value() if isinstance(value, data.View) else value
        if isinstance(value, Signal):
            ports.append(value)
    assert "module" in rtlil.convert(dut, ports=ports)


# A constructor that raises leaves a half-built elaboratable behind; its warning is noise here.
@pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")
@pytest.mark.parametrize("kwargs, message", [
    (dict(weight_word_bits=2, act_bits_max=3, acc_bits=8), "weight_word_bits"),
    (dict(weight_word_bits=48, act_bits_max=0, acc_bits=8), "act_bits_max"),
    (dict(weight_word_bits=48, act_bits_max=3, acc_bits=1), "acc_bits"),
    (dict(weight_word_bits=48, act_bits_max=3, acc_bits=8, lane_act_bits=0), "lane_act_bits"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message) as raised:
        MACArray(**kwargs)
    del raised           # the traceback holds the half-built object: collect it under the filter
    gc.collect()


@pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")
def test_non_integer_argument_is_rejected():
    with pytest.raises(TypeError) as raised:
        MACArray(48.0, 3, 8)
    del raised
    gc.collect()
