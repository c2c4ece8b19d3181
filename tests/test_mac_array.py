"""MACArray: every weight width with random and extreme codes and activations, against exact
per-lane integer dot products of the codes that the contract decodes from the packed words.

Lane ``j`` of a tile sums ``code_j * activations[j]`` over the tile's words (``first`` to
``last``), where ``code_j`` is code ``j`` of the word (``contract.pack_codes`` packs them); lanes
past the word's code count at that width sum nothing. The testbenches count clock edges: the
inputs set before edge ``t`` are taken by edge ``t``, and a result seen valid just after edge
``t`` is taken by edge ``t + 1`` (as the cocotb bench's monitors count them).
"""

import gc

import numpy as np
import pytest
from amaranth import Signal
from amaranth.back import rtlil
from amaranth.lib import data
from amaranth.sim import Simulator

from nqe.model import contract
from nqe.model.memory_map import layer_tiling
from nqe.model.spec import load_spec
from nqe.rtl.mac_array import MACArray

SEED = 20261122
WORD_BITS = 48
ACT_BITS = (1, 2, 3, 8)


def _word(codes, bits, word_bits):
    """One packed weight word, exactly as the weight SRAM holds it (the contract's packer)."""
    return int.from_bytes(contract.pack_codes(np.asarray(codes), bits, word_bits), "little")


def _code_lanes(dut, bits):
    """Lanes that have a code at this width: those whose field fits in the word (the truth from
    the contract's packing, not the design's ``products_per_cycle``)."""
    return min(dut.lanes, contract.codes_per_word(bits, dut.weight_word_bits))


def _acc_bits(fan_in, bits, in_bits):
    bound = contract.accumulator_bound(fan_in, bits, in_bits)
    return contract.signed_bits(-bound, bound)


def _random_tile(rng, dut, bits, in_bits, words):
    """``(codes, acts)``: ``codes`` fills every word with random legal codes (words x codes per
    word), ``acts`` random ``in_bits`` activations for every lane (words x lanes): the lanes past
    the word's codes get activations too, which must count for nothing."""
    per_word = contract.codes_per_word(bits, dut.weight_word_bits)
    codes = rng.choice(contract.legal_codes(bits), size=(words, per_word))
    acts = rng.integers(0, 1 << in_bits, size=(words, dut.lanes))
    return codes, acts


def _expected(dut, bits, codes, acts):
    """Every lane's exact dot product over the tile (numpy, int64); 0 for lanes without a code."""
    n = _code_lanes(dut, bits)
    sums = [0] * dut.lanes
    sums[:n] = [int(s) for s in (np.asarray(codes, np.int64)[:, :n] *
                                 np.asarray(acts, np.int64)[:, :n]).sum(axis=0)]
    return sums


def _tile_items(dut, bits, codes, acts):
    """The words of one tile: ``(weight_bits, payload)``, ``first`` on the first word and
    ``last`` on the final one (both on a one-word tile)."""
    items = []
    for index, (word_codes, word_acts) in enumerate(zip(codes, acts)):
        items.append((bits, {"weights": _word(word_codes, bits, dut.weight_word_bits),
                             "activations": [int(a) for a in word_acts],
                             "first": int(index == 0), "last": int(index == len(codes) - 1)}))
    return items


def _junk(rng, dut):
    """Random values for the ports while ``valid`` is low, ``first`` and ``last`` included: a
    junk word taken by mistake would reload an accumulator or show up as a spurious result."""
    return (int(rng.integers(0, 4)),
            {"weights": int.from_bytes(rng.bytes(contract.word_bytes(dut.weight_word_bits)),
                                       "little") & ((1 << dut.weight_word_bits) - 1),
             "activations": [int(a) for a in rng.integers(0, 1 << dut.act_bits, size=dut.lanes)],
             "first": 1, "last": 1})


def _run(dut, stimulus, gaps=None, junk_rng=None, drain=6):
    """Drive ``stimulus`` (a list of ``(weight_bits, payload)``), with ``gaps[i]`` idle cycles
    (``valid`` low, junk on the ports when ``junk_rng`` is given) before item ``i``.

    Returns ``(results, last_edges)``: every result transfer as ``(edge taking it, [lane sums])``
    and the edge that took each ``last`` word."""
    results, last_edges = [], []
    lanes = dut.lanes

    async def testbench(ctx):
        edge = 0

        async def tick():
            nonlocal edge
            await ctx.tick()
            edge += 1
            if ctx.get(dut.result.valid):
                payload = ctx.get(dut.result.payload)
                results.append((edge + 1, [payload[j] for j in range(lanes)]))

        for index, (bits, item) in enumerate(stimulus):
            for _ in range(gaps[index] if gaps else 0):
                ctx.set(dut.input.valid, 0)
                if junk_rng is not None:
                    junk_bits, junk_item = _junk(junk_rng, dut)
                    ctx.set(dut.weight_bits, junk_bits)
                    ctx.set(dut.input.payload, junk_item)
                await tick()
            ctx.set(dut.weight_bits, bits)
            ctx.set(dut.input.payload, item)
            ctx.set(dut.input.valid, 1)
            await tick()
            if item["last"]:
                last_edges.append(edge)
        ctx.set(dut.input.valid, 0)
        for _ in range(drain):
            if junk_rng is not None:
                junk_bits, junk_item = _junk(junk_rng, dut)
                ctx.set(dut.weight_bits, junk_bits)
                ctx.set(dut.input.payload, junk_item)
            await tick()

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return results, last_edges


def _check(dut, tiles, seed, gaps=None, junk_rng=None):
    """``tiles``: list of ``(bits, codes, acts)``, run back to back (``gaps`` idle cycles before
    each word); each result must be every lane's exact sum, LATENCY edges after its last word."""
    stimulus = [item for bits, codes, acts in tiles for item in _tile_items(dut, bits, codes, acts)]
    results, last_edges = _run(dut, stimulus, gaps, junk_rng)
    expected = [_expected(dut, bits, codes, acts) for bits, codes, acts in tiles]
    widths = [bits for bits, _, _ in tiles]
    assert len(results) == len(tiles), (f"seed {seed}: {len(results)} results for {len(tiles)} "
                                        f"tiles (widths {widths})")
    for index, ((edge, sums), want, last_edge) in enumerate(zip(results, expected, last_edges)):
        wrong = [j for j in range(dut.lanes) if sums[j] != want[j]]
        assert not wrong, (f"seed {seed}, tile {index} ({widths[index]}-bit weights): lanes "
                           f"{wrong[:8]} got {[sums[j] for j in wrong[:8]]}, expected "
                           f"{[want[j] for j in wrong[:8]]}")
        assert edge - last_edge == MACArray.LATENCY, (
            f"seed {seed}, tile {index}: result taken {edge - last_edge} edges after its last "
            f"word, documented latency {MACArray.LATENCY}")


@pytest.mark.parametrize("bits", contract.WEIGHT_BITS)
@pytest.mark.parametrize("in_bits", ACT_BITS)
def test_random_tiles(bits, in_bits):
    """Random tiles of 1-12 words (one-word tiles are both ``first`` and ``last``), lanes sized
    as nqe-1mb's (24: at 3 bits the last 8 have no code), activations of the full width."""
    seed = SEED + 10 * bits + in_bits
    rng = np.random.default_rng(seed)
    most_words = 12
    dut = MACArray(WORD_BITS, act_bits=8, acc_bits=_acc_bits(most_words, 3, 8), lanes=24)
    tiles = [(bits, *_random_tile(rng, dut, bits, in_bits, int(rng.integers(1, most_words + 1))))
             for _ in range(6)]
    tiles.insert(0, (bits, *_random_tile(rng, dut, bits, in_bits, 1)))
    _check(dut, tiles, seed)


@pytest.mark.parametrize("bits", contract.WEIGHT_BITS)
@pytest.mark.parametrize("in_bits", ACT_BITS)
def test_extremes_reach_the_derived_accumulator_width(bits, in_bits):
    """All largest codes and all smallest codes times the largest activations, per lane, reach
    exactly +-accumulator_bound in an accumulator of exactly the width the contract derives from
    that bound (no spare bit to hide an overflow); both signs side by side in one tile (even
    lanes largest, odd lanes smallest), codes alternating over the words, and zero activations.
    Fan-ins 1, 5 and 9 make the bound the largest value of its width for several widths
    (3 x 5 = 15, 7 x 9 = 63, 255 x 1, 1 x 1)."""
    legal = contract.legal_codes(bits)
    top = (1 << in_bits) - 1
    for fan_in in (1, 5, 9):
        bound = contract.accumulator_bound(fan_in, bits, in_bits)
        dut = MACArray(WORD_BITS, act_bits=in_bits, acc_bits=_acc_bits(fan_in, bits, in_bits))
        per_word = contract.codes_per_word(bits, WORD_BITS)
        n = _code_lanes(dut, bits)
        full = np.full((fan_in, dut.lanes), top)
        lane_sign = np.where(np.arange(per_word) % 2, min(legal), max(legal))
        word_sign = np.where(np.arange(fan_in)[:, None] % 2, min(legal), max(legal))
        tiles = [
            (bits, np.full((fan_in, per_word), max(legal)), full),
            (bits, np.full((fan_in, per_word), min(legal)), full),
            (bits, np.tile(lane_sign, (fan_in, 1)), full),
            (bits, np.tile(word_sign, (1, per_word)), full),
            (bits, np.full((fan_in, per_word), max(legal)), np.zeros((fan_in, dut.lanes), int)),
            (bits, np.full((fan_in, per_word), min(legal)), full),
        ]
        assert _expected(dut, *tiles[0])[:n] == [bound] * n
        assert _expected(dut, *tiles[1])[:n] == [-bound] * n
        assert contract.signed_bits(-bound, bound) == dut.acc_bits
        _check(dut, tiles, seed=f"none (fixed extremes, fan-in {fan_in})")


@pytest.mark.parametrize("repeat", range(3))
def test_back_to_back_tiles_and_idle_cycles(repeat):
    """Tiles of every width and activation width follow each other: first with no bubble
    (the next tile's ``first`` word right after the ``last``), then with random idle cycles
    between any two words, inside tiles too, with junk (``first`` and ``last`` set, random
    weights, activations and weight width) on the ports while ``valid`` is low: the idle cycles
    must neither disturb the accumulators nor produce a result."""
    seed = SEED + 100 + repeat
    rng = np.random.default_rng(seed)
    dut = MACArray(WORD_BITS, act_bits=8, acc_bits=_acc_bits(8, 3, 8), lanes=24)
    tiles = []
    for _ in range(10):
        bits = int(rng.choice(contract.WEIGHT_BITS))
        in_bits = int(rng.choice(ACT_BITS))
        tiles.append((bits, *_random_tile(rng, dut, bits, in_bits, int(rng.integers(1, 9)))))
    _check(dut, tiles, f"{seed} (no gaps)")
    words = sum(len(codes) for _, codes, _ in tiles)
    gaps = [int(g) if rng.random() < 0.4 else 0 for g in rng.integers(1, 4, size=words)]
    _check(dut, tiles, f"{seed} (with gaps)", gaps=gaps, junk_rng=rng)


def test_latency():
    """The result is taken LATENCY edges after the edge that accepts the last word (valid the
    cycle before), once; idle cycles inside the tile do not move it, junk after it makes no
    second result."""
    dut = MACArray(WORD_BITS, act_bits=3, acc_bits=10)
    codes = np.tile([1, -1, 2, -2, 0, 1, 1, 1, 2, 2, -1, 0, 1, 2, -2, 1], (3, 1))
    acts = np.tile(np.arange(dut.lanes) % 8, (3, 1))
    stimulus = _tile_items(dut, 3, codes, acts)
    results, last_edges = _run(dut, stimulus, gaps=[0, 2, 1],
                               junk_rng=np.random.default_rng(SEED), drain=8)
    # Edges: word 0 at 1, idle 2-3, word 1 at 4, idle 5, word 2 (last) at 6.
    assert last_edges == [6]
    assert results == [(6 + MACArray.LATENCY, _expected(dut, 3, codes, acts))]


def test_lanes_past_the_word_codes_are_ignored():
    """A 50-bit word holds 16 3b codes (2 padding bits), 25 2b codes, 50 1b codes: with both
    padding bits set and activations on every lane, lanes 16-49 (3b) and 25-49 (2b) stay 0."""
    rng = np.random.default_rng(SEED + 200)
    dut = MACArray(50, act_bits=3, acc_bits=_acc_bits(4, 3, 3))
    assert dut.lanes == 50
    assert [dut.products_per_cycle(b) for b in (3, 2, 1)] == [16, 25, 50]
    tiles = []
    for bits in (3, 2, 1):
        codes, _ = _random_tile(rng, dut, bits, 3, 4)
        tiles.append((bits, codes, np.full((4, dut.lanes), 7)))
    stimulus = [item for tile in tiles for item in _tile_items(dut, *tile)]
    for bits, item in stimulus[:4]:
        item["weights"] |= 0b11 << 48          # the 3b words' padding bits
    results, _ = _run(dut, stimulus)
    sums = [s for _, s in results]
    assert sums == [_expected(dut, *tile) for tile in tiles], f"seed {SEED + 200}"
    assert sums[0][16:] == [0] * 34 and sums[1][25:] == [0] * 25


def test_lanes_cap_the_products():
    """Fewer lanes than the word's codes: lane ``j`` still takes code ``j``, the codes past the
    last lane count for nothing, and products_per_cycle is the lane count."""
    seed = SEED + 300
    rng = np.random.default_rng(seed)
    dut = MACArray(WORD_BITS, act_bits=8, acc_bits=_acc_bits(5, 3, 8), lanes=10)
    assert [dut.products_per_cycle(b) for b in (3, 2, 1)] == [10, 10, 10]
    tiles = [(bits, *_random_tile(rng, dut, bits, 8, 5)) for bits in (3, 2, 1)]
    _check(dut, tiles, seed)


def test_invalid_weight_bits_give_zero_products():
    """A weight width the array does not know (0: the only other value of the 2-bit port)
    multiplies by nothing: every lane sums 0, whatever the words and activations, and a valid
    tile right after it is exact."""
    weight_bits = 0
    seed = SEED + 400
    rng = np.random.default_rng(seed)
    dut = MACArray(WORD_BITS, act_bits=8, acc_bits=_acc_bits(4, 3, 8), lanes=24)
    stimulus = []
    for _ in range(4):
        stimulus.append((weight_bits, {
            "weights": int.from_bytes(rng.bytes(6), "little"),
            "activations": [int(a) for a in rng.integers(1, 256, size=dut.lanes)],
            "first": 0, "last": 0}))
    stimulus[0][1]["first"] = stimulus[-1][1]["last"] = 1
    codes, acts = _random_tile(rng, dut, 3, 8, 3)
    stimulus += _tile_items(dut, 3, codes, acts)
    results, _ = _run(dut, stimulus)
    assert [s for _, s in results] == [[0] * dut.lanes, _expected(dut, 3, codes, acts)], \
        f"seed {seed}"


def test_sizes_come_from_the_spec():
    spec = load_spec("nqe-1mb")
    dut = MACArray.from_spec(spec)
    layers = spec.layers()
    tilings = [layer_tiling(layer, spec.hardware) for layer in layers]
    pool_acc = [contract.signed_bits(0, t.fan_in * ((1 << layer.in_bits) - 1))
                for layer, t in zip(layers, tilings) if not layer.has_weights]
    assert pool_acc, "nqe-1mb has a pooling layer"
    lanes = max(t.lanes for t in tilings)
    assert dut.weight_word_bits == spec.hardware.weight_word_bits == 48
    assert dut.lanes == lanes == 24
    # the classifier reads 9-bit sums (64 pooled 3-bit activations), wider than the 8-bit image
    assert dut.act_bits == max(layer.in_bits for layer in layers) == 9
    assert dut.acc_bits == max([layer.acc_bits for layer in layers if layer.has_weights]
                               + pool_acc) == 18
    assert [dut.products_per_cycle(b) for b in (3, 2, 1)] == [
        min(lanes, contract.codes_per_word(b, 48)) for b in (3, 2, 1)] == [16, 24, 24]
    ports = []
    for _, _, value in dut.signature.flatten(dut):
        value = value.as_value() if isinstance(value, data.View) else value
        if isinstance(value, Signal):
            ports.append(value)
    assert "module" in rtlil.convert(dut, ports=ports)


# A constructor that raises leaves a half-built elaboratable behind; its warning is noise here.
@pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")
@pytest.mark.parametrize("kwargs, message", [
    (dict(weight_word_bits=2, act_bits=3, acc_bits=8), "weight_word_bits"),
    (dict(weight_word_bits=48, act_bits=0, acc_bits=8), "act_bits"),
    (dict(weight_word_bits=48, act_bits=3, acc_bits=1), "acc_bits"),
    (dict(weight_word_bits=48, act_bits=3, acc_bits=8, lanes=0), "lanes"),
    (dict(weight_word_bits=48, act_bits=3, acc_bits=8, lanes=49), "lanes"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message) as raised:
        MACArray(**kwargs)
    del raised           # the traceback holds the half-built object: collect it under the filter
    gc.collect()


@pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")
@pytest.mark.parametrize("args, kwargs", [
    ((48.0, 3, 8), {}), ((48, 3.0, 8), {}), ((48, 3, "8"), {}), ((48, 3, 8), {"lanes": 2.5}),
])
def test_non_integer_argument_is_rejected(args, kwargs):
    with pytest.raises(TypeError) as raised:
        MACArray(*args, **kwargs)
    del raised
    gc.collect()
