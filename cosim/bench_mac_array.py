"""cocotb bench of the MAC array (:class:`nqe.rtl.mac_array.MACArray`, sized for ``nqe-1mb``: 48-bit
words, 24 lanes of 8-bit activations, 17-bit accumulators) on Verilator.

Stimulus: tiles of legal weight codes (3b, 2b, 1b; packed by ``contract.pack_codes``), one word a
cycle, lane ``j`` taking code ``j`` of the word times its own unsigned activation (1, 2, 3 or
8 bits, taken whole). Tiles of 1 to :data:`MOST_WORDS` words (one-word tiles are both ``first``
and ``last``); the lanes past the word's codes (lanes 16-23 at 3 bits) carry junk activations of
the full width, which must count for nothing. Extremes (all largest or smallest codes times the
largest activations, both signs side by side in one tile, codes alternating word by word) run
long enough to reach the 17-bit accumulator's full range at 8-bit activations. Words arrive with
random gaps (the array is always ready, so the gaps are its only stall), with junk on the ports
while ``valid`` is low; the next tile's ``first`` word may follow the ``last`` directly.

Model: :func:`tile_sums_seen` rebuilds each tile from the words a monitor saw, decodes the codes
with ``contract.unpack_codes`` and takes every lane's exact dot product with numpy (0 for the
lanes without a code). Checker: each result equals the model's, lane by lane, and comes
:attr:`MACArray.LATENCY` cycles after its last word.

Every test resets the array in the middle of its run, with a tile half presented and results in
flight, and checks (``bench_support.check_across_reset``) that it recovers.

Run from ``tests/test_cosim_mac_array.py``. Parameters (environment): ``NQE_COSIM_SEED``,
``NQE_MAC_TILES`` (tiles on each side of the reset, default 120).
"""

import dataclasses
import os

import cocotb
import numpy as np

from nqe.model import contract
from nqe.model.spec import load_spec
from nqe.rtl.mac_array import MACArray
from nqe.rtl.sram import bytes_from_words, words_from_bytes

from .build import start_clock
from .bench_support import (RunTimer, FieldsDriver, PortGroup, ResetMonitor, TransferMonitor, bench_random,
                            check_across_reset, drive_through_mid_reset, replay_hint,
                            split_at_reset, within_cycles)
from .streams import random_stalls, reset

__all__ = ["SPEC_NAME", "Tile", "extreme_tiles", "lane_sums", "mac_array", "presentations",
           "random_tile", "tile_sums_seen"]

SPEC_NAME = "nqe-1mb"
ACTIVATION_BITS = (1, 2, 3, 8)
#: Longest random tile, in words: several partial sums a lane, as long as the short layers of
#: nqe-1mb (the stem's 27 terms, the group-wise layers' 36), short enough for many tiles a test.
MOST_WORDS = 40
#: Longest extreme tile, in words: the accumulator's full range at 8-bit activations needs 128
#: words at 3b (128 x 2 x 255 = 65,280) and 257 at 2b and 1b (257 x 255 = 65,535 = 2**16 - 1).
MOST_EXTREME_WORDS = 257


def mac_array():
    """The design under test, as the pytest wrapper builds it and the bench sizes it."""
    return MACArray.from_spec(load_spec(SPEC_NAME))


@dataclasses.dataclass(frozen=True)
class Tile:
    """One tile as the array sees it: ``codes`` (words x codes per word) fills every word,
    ``acts`` (words x lanes) is each lane's activation a word (junk on the lanes without a
    code)."""
    bits: int
    in_bits: int
    codes: np.ndarray
    acts: np.ndarray


def _code_lanes(design, bits):
    """Lanes with a code at this width: the word's code count (the contract's packing), capped by
    the lanes."""
    return min(design.lanes, contract.codes_per_word(bits, design.weight_word_bits))


def _largest_fan_in(design, bits, in_bits, words):
    """The longest tile of at most ``words`` words whose worst case fits the accumulator."""
    most = ((1 << (design.acc_bits - 1)) - 1) // (contract.max_abs_code(bits) *
                                                 ((1 << in_bits) - 1))
    return min(most, words)


def _acts(nprng, design, bits, words, lane_acts):
    """``words`` x lanes activations: ``lane_acts`` (words x code lanes) on the lanes with a
    code, junk of the full activation width on the others."""
    acts = nprng.integers(0, 1 << design.act_bits, size=(words, design.lanes), dtype=np.int64)
    acts[:, :_code_lanes(design, bits)] = lane_acts
    return acts


def random_tile(rng, design, bits, in_bits):
    words = rng.randint(1, _largest_fan_in(design, bits, in_bits, MOST_WORDS))
    nprng = np.random.default_rng(rng.getrandbits(64))
    per_word = contract.codes_per_word(bits, design.weight_word_bits)
    codes = nprng.choice(contract.legal_codes(bits), size=(words, per_word))
    lane_acts = nprng.integers(0, 1 << in_bits, size=(words, _code_lanes(design, bits)))
    return Tile(bits, in_bits, codes, _acts(nprng, design, bits, words, lane_acts))


def extreme_tiles(design, bits, in_bits, rng):
    """The largest codes, the smallest, both side by side (even lanes largest, odd lanes
    smallest) and codes alternating word by word, times the largest activations over the longest
    tile the accumulator holds (every lane's sum is +-the bound of ``contract``, or 0 or
    +-one term when alternating), and the largest codes times zero."""
    words = _largest_fan_in(design, bits, in_bits, MOST_EXTREME_WORDS)
    per_word = contract.codes_per_word(bits, design.weight_word_bits)
    lanes = _code_lanes(design, bits)
    legal = contract.legal_codes(bits)
    nprng = np.random.default_rng(rng.getrandbits(64))
    top = np.full((words, lanes), (1 << in_bits) - 1, np.int64)
    by_lane = np.tile(np.where(np.arange(per_word) % 2, min(legal), max(legal)), (words, 1))
    by_word = np.tile(np.where(np.arange(words)[:, None] % 2, min(legal), max(legal)),
                      (1, per_word))
    return [Tile(bits, in_bits, codes, _acts(nprng, design, bits, words, acts)) for codes, acts in [
        (np.full((words, per_word), max(legal)), top),
        (np.full((words, per_word), min(legal)), top),
        (by_lane, top),
        (by_word, top),
        (np.full((words, per_word), max(legal)), np.zeros((words, lanes), np.int64)),
    ]]


class _Fields:
    """Bit offsets of the input payload's fields (``design.input_layout``): the bench packs and
    unpacks payloads with shifts, as ``layout.const`` / ``layout.from_bits`` would, but fast
    enough for tens of thousands of words a test."""

    def __init__(self, design):
        layout = design.input_layout
        self.weights = layout["weights"].offset
        self.word_mask = (1 << design.weight_word_bits) - 1
        self.acts = layout["activations"].offset
        self.act_bits = design.act_bits
        self.act_mask = (1 << design.act_bits) - 1
        self.lanes = design.lanes
        self.first = layout["first"].offset
        self.last = layout["last"].offset

    def pack(self, word, acts, first, last):
        payload = (word << self.weights) | (first << self.first) | (last << self.last)
        for lane, act in enumerate(acts):
            payload |= int(act) << (self.acts + lane * self.act_bits)
        return payload

    def unpack(self, payload):
        """``(word, [activation of each lane], first, last)``."""
        acts = payload >> self.acts
        return ((payload >> self.weights) & self.word_mask,
                [(acts >> (lane * self.act_bits)) & self.act_mask for lane in range(self.lanes)],
                (payload >> self.first) & 1, (payload >> self.last) & 1)


def presentations(design, tile):
    """The input transactions of one tile: one word a cycle, with ``first`` on the first word and
    ``last`` on the final one. Returns a list of ``{"payload": bits, "weight_bits": width}``."""
    words = words_from_bytes(contract.pack_codes(tile.codes, tile.bits, design.weight_word_bits),
                             design.weight_word_bits)
    assert len(words) == len(tile.codes)
    fields = _Fields(design)
    return [{"payload": fields.pack(word, acts, int(index == 0), int(index == len(words) - 1)),
             "weight_bits": tile.bits}
            for index, (word, acts) in enumerate(zip(words, tile.acts))]


def lane_sums(design, value):
    """A result payload (an unsigned int, as the monitor reads the flat port) -> every lane's
    signed sum."""
    sums = design.result.payload.shape().from_bits(value)
    return [int(sums[lane]) for lane in range(design.lanes)]


def _tile_sums(design, words, hint):
    """Every lane's exact dot product over ``words`` (``(bits, word, acts, cycle)`` each): the
    codes decoded by ``contract.unpack_codes`` at each word's width (a run of words of one width
    at a time), lane ``j`` taking code ``j`` times its activation, the lanes past the word's codes
    nothing."""
    sums = np.zeros(design.lanes, np.int64)
    start = 0
    while start < len(words):
        bits = words[start][0]
        end = start
        while end < len(words) and words[end][0] == bits:
            end += 1
        run = words[start:end]
        per_word = contract.codes_per_word(bits, design.weight_word_bits)
        lanes = _code_lanes(design, bits)
        codes = contract.unpack_codes(
            bytes_from_words([word for _, word, _, _ in run], design.weight_word_bits), bits,
            design.weight_word_bits, len(run) * per_word,
            where=f"{hint} words at cycles {run[0][3]}..{run[-1][3]}").reshape(len(run), per_word)
        acts = np.array([acts[:lanes] for _, _, acts, _ in run], np.int64).reshape(len(run), lanes)
        sums[:lanes] += (codes[:, :lanes].astype(np.int64) * acts).sum(axis=0)
        start = end
    return [int(s) for s in sums]


def tile_sums_seen(design, transfers):
    """The model on what the input monitor saw: for every complete tile in ``transfers`` (in
    order), ``(every lane's exact dot product, the cycle of its last word)``.

    Each word's codes are decoded by ``contract.unpack_codes`` at the width that came with it;
    lane ``j`` takes code ``j`` times its activation, the lanes past the word's codes nothing.
    Words before the first ``first`` (cut by a reset) start nothing.
    """
    fields = _Fields(design)
    hint = replay_hint()
    results, words = [], None
    for transfer in transfers:
        word, acts, first, last = fields.unpack(transfer.value["payload"])
        if first:
            words = []
        if words is None:
            continue
        words.append((transfer.value["weight_bits"], word, acts, transfer.cycle))
        if last:
            results.append((_tile_sums(design, words, hint), transfer.cycle))
            words = None
    return results


def _junk(design, rng, *, whole_tile=False):
    """Random port values; ``whole_tile`` sets ``first`` and ``last``, so that a word taken during
    a reset would show up as a spurious result."""
    layout = design.input_layout
    flags = (1 << layout["first"].offset) | (1 << layout["last"].offset)
    return lambda: {"payload": rng.getrandbits(layout.size) | (flags if whole_tile else 0),
                    "weight_bits": rng.getrandbits(2)}


async def _run_with_mid_reset(dut, rng, name, tiles_before, tiles_after, stall_probability):
    """Presents ``tiles_before``, then part of one more tile, resets the array while that one is
    half presented (junk words keep coming during the reset), presents ``tiles_after``; then
    checks every result on both sides of the reset."""
    design = mac_array()
    start_clock(dut.clk)
    dut.input__valid.value = 0
    dut.weight_bits.value = 0
    await reset(dut.clk, dut.rst)

    words_in = TransferMonitor(dut.clk, dut.input__valid,
                               PortGroup(payload=dut.input__payload, weight_bits=dut.weight_bits))
    results_out = TransferMonitor(dut.clk, dut.result__valid, dut.result__payload)
    resets = ResetMonitor(dut.clk, dut.rst)
    for monitor in (words_in, results_out, resets):
        monitor.start()
    group = PortGroup(payload=dut.input__payload, weight_bits=dut.weight_bits)
    driver = FieldsDriver(dut.clk, dut.input__valid, group,
                          stall=random_stalls(stall_probability, 5, rng),
                          idle_values=_junk(design, rng))

    before = [p for tile in tiles_before for p in presentations(design, tile)]
    cut = []
    while len(cut) < 2:
        cut = presentations(design, random_tile(rng, design, rng.choice(contract.WEIGHT_BITS), 8))
    before += cut[:rng.randint(1, len(cut) - 1)]       # a tile cut by the reset
    after = [p for tile in tiles_after for p in presentations(design, tile)]
    timer = RunTimer()

    async def run():
        await drive_through_mid_reset(dut.clk, dut.rst, driver, before=before, after=after,
                                      junk=_junk(design, rng, whole_tile=True),
                                      reset_cycles=rng.randint(1, 4),
                                      drain_cycles=design.LATENCY + 4)

    words = len(before) + len(after)
    await within_cycles(run(), 10 * (words + 20), name)
    window, wall, cycles = timer.finish((words_in, results_out), resets, name)
    words_before, _, words_after = split_at_reset(words_in.transfers, window)
    seen_before, seen_during, seen_after = split_at_reset(results_out.transfers, window)

    def compare(expected, actual, label):
        sums, last_cycle = expected
        got = lane_sums(design, actual.value)
        wrong = [lane for lane in range(design.lanes) if got[lane] != sums[lane]]
        assert not wrong, (f"{replay_hint()} {label}: lanes {wrong[:8]}: the array gave "
                           f"{[got[lane] for lane in wrong[:8]]}, the contract's dot products "
                           f"are {[sums[lane] for lane in wrong[:8]]}")
        assert actual.cycle - last_cycle == design.LATENCY, (
            f"{replay_hint()} {label}: result {actual.cycle - last_cycle} cycles after "
            f"its last word, documented latency {design.LATENCY}")

    expected_after = tile_sums_seen(design, words_after)
    assert len(expected_after) == len(tiles_after), (
        f"{replay_hint()} {name}: the input monitor saw {len(expected_after)} tiles after the "
        f"reset, the bench sent {len(tiles_after)}")
    check_across_reset(compare, tile_sums_seen(design, words_before),
                       seen_before + seen_during, expected_after, seen_after, what=name)
    dut._log.info(f"{replay_hint()} {name}: {words} words, {len(seen_before) + len(seen_during)}"
                  f" + {len(seen_after)} results checked around a reset at cycle {window.first}, "
                  f"{cycles:.0f} cycles in {wall:.2f} s ({cycles / wall:,.0f} cycles/s)")


def _tile_count():
    return int(os.environ.get("NQE_MAC_TILES", "120"))


def _mixed_tiles(rng, design, widths, count):
    """``count`` random tiles of random widths from ``widths`` and random activation widths, with
    the extremes of every pair of widths mixed in at random places."""
    tiles = [random_tile(rng, design, rng.choice(widths), rng.choice(ACTIVATION_BITS))
             for _ in range(count)]
    for bits in widths:
        for in_bits in ACTIVATION_BITS:
            for tile in extreme_tiles(design, bits, in_bits, rng):
                tiles.insert(rng.randrange(len(tiles) + 1), tile)
    return tiles


@cocotb.test()
@cocotb.parametrize(bits=list(contract.WEIGHT_BITS))
async def one_weight_width_with_gaps_and_reset(dut, bits):
    """One weight width, every activation width (8-bit taken whole), random and extreme tiles
    with random gaps between words, a reset in the middle."""
    name = f"{bits}-bit weights"
    rng = bench_random(f"one_weight_width/{bits}")
    design = mac_array()
    count = _tile_count()
    await _run_with_mid_reset(dut, rng, name,
                              _mixed_tiles(rng, design, [bits], count),
                              _mixed_tiles(rng, design, [bits], count),
                              stall_probability=0.3)


@cocotb.test()
async def widths_change_back_to_back(dut):
    """The weight width changes from one tile to the next with no idle cycle (it is sampled with
    each word; each tile's ``first`` word right after the previous ``last``), through a reset in
    the middle."""
    rng = bench_random("widths_change_back_to_back")
    design = mac_array()
    count = _tile_count()
    await _run_with_mid_reset(dut, rng, "widths interleaved",
                              _mixed_tiles(rng, design, contract.WEIGHT_BITS, count),
                              _mixed_tiles(rng, design, contract.WEIGHT_BITS, count),
                              stall_probability=0.0)
