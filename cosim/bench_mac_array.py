"""cocotb bench of the MAC array (:class:`nqe.rtl.mac_array.MACArray`, sized for ``nqe-1mb``) on
Verilator.

Stimulus: dot products of legal weight codes (3b, 2b, 1b; packed by ``contract.pack_codes``) with
unsigned 1, 2, 3 and 8-bit activations (8-bit ones digit-serial, each word presented once per
digit). Fan-ins start and end mid-word (the lanes outside a dot product carry zero activations, as
for a word straddling two output channels) and reach the accumulator's full range with the
extremes (all largest or smallest codes times the largest activations); lanes past a word's last
code carry junk. Words arrive with random gaps (the array is always ready, so the gaps are its
only stall), with junk on the ports while ``valid`` is low.

Model: :func:`dot_products_seen` rebuilds each dot product from the words a monitor saw, decodes
the codes with ``contract.unpack_codes`` and takes the exact dot product with numpy. Checker:
each result equals the model's and comes :attr:`MACArray.LATENCY` cycles after its last word.

Every test resets the array in the middle of its run, with a dot product half presented and
results in flight, and checks (``bench_support.check_across_reset``) that it recovers.

Run from ``tests/test_cosim_mac_array.py``. Parameters (environment): ``NQE_COSIM_SEED``,
``NQE_MAC_DOT_PRODUCTS`` (dot products on each side of the reset, default 120).
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

__all__ = ["SPEC_NAME", "DotProduct", "dot_products_seen", "extreme_dot_products", "mac_array",
           "presentations", "random_dot_product"]

SPEC_NAME = "nqe-1mb"
ACTIVATION_BITS = (1, 2, 3, 8)
#: Longest random dot product, in words: long enough for several partial sums, short enough
#: that a test covers many dot products.
MOST_WORDS = 6
#: Longest extreme dot product, in words (the accumulator's full range needs up to 11 at 2b x 8b).
MOST_EXTREME_WORDS = 12


def mac_array():
    """The design under test, as the pytest wrapper builds it and the bench sizes it."""
    return MACArray.from_spec(load_spec(SPEC_NAME))


@dataclasses.dataclass(frozen=True)
class DotProduct:
    """One dot product as the array sees it: ``codes`` fill whole words, ``acts`` is zero on the
    lanes outside the dot product (before its first term or after its last)."""
    bits: int
    in_bits: int
    codes: np.ndarray
    acts: np.ndarray


def _largest_fan_in(design, bits, in_bits, words):
    """The longest fan-in of at most ``words`` words whose worst case fits the accumulator."""
    most = ((1 << (design.acc_bits - 1)) - 1) // (contract.max_abs_code(bits) *
                                                 ((1 << in_bits) - 1))
    return min(most, words * design.products_per_cycle(bits))


def random_dot_product(rng, design, bits, in_bits):
    per_word = design.products_per_cycle(bits)
    fan_in = rng.randint(1, _largest_fan_in(design, bits, in_bits, MOST_WORDS))
    offset = rng.randrange(per_word)      # the first term may sit anywhere in its word
    words = -(-(offset + fan_in) // per_word)
    nprng = np.random.default_rng(rng.getrandbits(64))
    codes = nprng.choice(contract.legal_codes(bits), size=words * per_word)
    acts = np.zeros(words * per_word, np.int64)
    acts[offset:offset + fan_in] = nprng.integers(0, 1 << in_bits, size=fan_in)
    return DotProduct(bits, in_bits, codes, acts)


def extreme_dot_products(design, bits, in_bits):
    """The largest codes, the smallest, and alternating ones, times the largest activations over
    the longest fan-in the accumulator holds (its sum is +-the bound of ``contract``), and the
    largest codes times zero."""
    fan_in = _largest_fan_in(design, bits, in_bits, MOST_EXTREME_WORDS)
    per_word = design.products_per_cycle(bits)
    length = -(-fan_in // per_word) * per_word
    legal = contract.legal_codes(bits)
    top = np.zeros(length, np.int64)
    top[:fan_in] = (1 << in_bits) - 1
    alternating = np.where(np.arange(length) % 2, max(legal), min(legal))
    return [DotProduct(bits, in_bits, np.full(length, codes), acts) for codes, acts in [
        (max(legal), top), (min(legal), top), (max(legal), np.zeros(length, np.int64)),
    ]] + [DotProduct(bits, in_bits, alternating, top)]


def presentations(design, dot_product, rng):
    """The input transactions of one dot product: each word once per activation digit, with
    ``first`` on the first and ``last`` on the final one; lanes past the word's codes get junk.
    Returns a list of ``{"payload": bits, "weight_bits": width}``."""
    bits, per_word = dot_product.bits, design.products_per_cycle(dot_product.bits)
    words = words_from_bytes(contract.pack_codes(dot_product.codes, bits,
                                                 design.weight_word_bits),
                             design.weight_word_bits)
    digit_mask = (1 << design.lane_act_bits) - 1
    items = []
    for index, word in enumerate(words):
        acts = dot_product.acts[index * per_word:(index + 1) * per_word]
        for digit in range(design.cycles_per_word(dot_product.in_bits)):
            lanes = [int(a >> (digit * design.lane_act_bits)) & digit_mask for a in acts]
            lanes += [rng.getrandbits(design.lane_act_bits)
                      for _ in range(design.weight_word_bits - per_word)]
            items.append({"weights": word, "activations": lanes, "digit": digit,
                          "first": 0, "last": 0})
    items[0]["first"] = items[-1]["last"] = 1
    layout = design.input_layout
    return [{"payload": int(layout.const(item).as_bits()), "weight_bits": bits}
            for item in items]


def dot_products_seen(design, transfers):
    """The model on what the input monitor saw: for every complete dot product in ``transfers``
    (in order), ``(the contract's exact dot product, the cycle of its last word)``.

    The words of a dot product are rebuilt from their digit presentations (digit 0 opens a word,
    digit ``d`` adds its activations' bits ``d * lane_act_bits`` up), its codes decoded by
    ``contract.unpack_codes``. Words before the first ``first`` (cut by a reset) start nothing.
    """
    layout = design.input_layout
    results, terms, codes, acts, word = [], None, None, None, None
    for transfer in transfers:
        item = layout.from_bits(transfer.value["payload"])
        bits = transfer.value["weight_bits"]
        per_word = design.products_per_cycle(bits)
        if item.first:
            terms = []
        if terms is None:
            continue
        lanes = np.array([int(a) for a in item.activations][:per_word], np.int64)
        if item.digit == 0:
            word = int(item.weights)
            codes = contract.unpack_codes(bytes_from_words([word], design.weight_word_bits), bits,
                                          design.weight_word_bits, per_word,
                                          where=f"{replay_hint()} word at cycle "
                                                f"{transfer.cycle}")
            acts = lanes
            terms.append((codes, acts))
        else:
            assert int(item.weights) == word, (f"{replay_hint()} the bench presented digit "
                                               f"{int(item.digit)} of another word")
            acts += lanes << (int(item.digit) * design.lane_act_bits)
        if item.last:
            total = sum(int(np.dot(c.astype(np.int64), a)) for c, a in terms)
            results.append((total, transfer.cycle))
            terms = None
    return results


def _junk(design, rng, *, whole_dot_product=False):
    """Random port values; ``whole_dot_product`` sets ``first`` and ``last``, so that a word taken
    during a reset would show up as a spurious result."""
    layout = design.input_layout
    flags = (1 << layout["first"].offset) | (1 << layout["last"].offset)
    return lambda: {"payload": rng.getrandbits(layout.size) | (flags if whole_dot_product else 0),
                    "weight_bits": rng.getrandbits(2)}


async def _run_with_mid_reset(dut, rng, name, dots_before, dots_after, stall_probability):
    """Presents ``dots_before``, then half of one more dot product, resets the array while that
    one is half presented (junk words keep coming during the reset), presents ``dots_after``;
    then checks every result on both sides of the reset."""
    design = mac_array()
    start_clock(dut.clk)
    dut.input__valid.value = 0
    dut.weight_bits.value = 0
    await reset(dut.clk, dut.rst)

    words_in = TransferMonitor(dut.clk, dut.input__valid,
                               PortGroup(payload=dut.input__payload, weight_bits=dut.weight_bits))
    results_out = TransferMonitor(dut.clk, dut.result__valid, dut.result__payload, signed=True)
    resets = ResetMonitor(dut.clk, dut.rst)
    for monitor in (words_in, results_out, resets):
        monitor.start()
    group = PortGroup(payload=dut.input__payload, weight_bits=dut.weight_bits)
    driver = FieldsDriver(dut.clk, dut.input__valid, group,
                          stall=random_stalls(stall_probability, 5, rng),
                          idle_values=_junk(design, rng))

    before = [p for dot in dots_before for p in presentations(design, dot, rng)]
    cut = presentations(design, random_dot_product(rng, design, rng.choice(contract.WEIGHT_BITS),
                                                   8), rng)
    before += cut[:rng.randint(1, len(cut) - 1)]       # a dot product cut by the reset
    after = [p for dot in dots_after for p in presentations(design, dot, rng)]
    timer = RunTimer()

    async def run():
        await drive_through_mid_reset(dut.clk, dut.rst, driver, before=before, after=after,
                                      junk=_junk(design, rng, whole_dot_product=True),
                                      reset_cycles=rng.randint(1, 4),
                                      drain_cycles=design.LATENCY + 4)

    words = len(before) + len(after)
    await within_cycles(run(), 10 * (words + 20), name)
    window, wall, cycles = timer.finish((words_in, results_out), resets, name)
    words_before, _, words_after = split_at_reset(words_in.transfers, window)
    seen_before, seen_during, seen_after = split_at_reset(results_out.transfers, window)

    def compare(expected, actual, label):
        value, last_cycle = expected
        assert actual.value == value, (f"{replay_hint()} {label}: the array gave "
                                       f"{actual.value}, the contract's dot product is {value}")
        assert actual.cycle - last_cycle == design.LATENCY, (
            f"{replay_hint()} {label}: result {actual.cycle - last_cycle} cycles after "
            f"its last word, documented latency {design.LATENCY}")

    expected_after = dot_products_seen(design, words_after)
    assert len(expected_after) == len(dots_after), (
        f"{replay_hint()} {name}: the input monitor saw {len(expected_after)} dot products after "
        f"the reset, the bench sent {len(dots_after)}")
    check_across_reset(compare, dot_products_seen(design, words_before),
                       seen_before + seen_during, expected_after, seen_after, what=name)
    dut._log.info(f"{replay_hint()} {name}: {words} words, {len(seen_before) + len(seen_during)}"
                  f" + {len(seen_after)} results checked around a reset at cycle {window.first}, "
                  f"{cycles:.0f} cycles in {wall:.2f} s ({cycles / wall:,.0f} cycles/s)")


def _dot_product_count():
    return int(os.environ.get("NQE_MAC_DOT_PRODUCTS", "120"))


def _mixed_dot_products(rng, design, widths, count):
    """``count`` random dot products of random widths from ``widths`` and random activation
    widths, with the extremes of every pair of widths mixed in at random places."""
    dots = [random_dot_product(rng, design, rng.choice(widths), rng.choice(ACTIVATION_BITS))
            for _ in range(count)]
    for bits in widths:
        for in_bits in ACTIVATION_BITS:
            for dot in extreme_dot_products(design, bits, in_bits):
                dots.insert(rng.randrange(len(dots) + 1), dot)
    return dots


@cocotb.test()
@cocotb.parametrize(bits=list(contract.WEIGHT_BITS))
async def one_weight_width_with_gaps_and_reset(dut, bits):
    """One weight width, every activation width (digit-serial 8-bit included), random and
    extreme dot products with random gaps between words, a reset in the middle."""
    name = f"{bits}-bit weights"
    rng = bench_random(f"one_weight_width/{bits}")
    design = mac_array()
    count = _dot_product_count()
    await _run_with_mid_reset(dut, rng, name,
                              _mixed_dot_products(rng, design, [bits], count),
                              _mixed_dot_products(rng, design, [bits], count),
                              stall_probability=0.3)


@cocotb.test()
async def widths_change_back_to_back(dut):
    """The weight width changes from one dot product to the next with no idle cycle (it is
    sampled with each word), through a reset in the middle."""
    rng = bench_random("widths_change_back_to_back")
    design = mac_array()
    count = _dot_product_count()
    await _run_with_mid_reset(dut, rng, "widths interleaved",
                              _mixed_dot_products(rng, design, contract.WEIGHT_BITS, count),
                              _mixed_dot_products(rng, design, contract.WEIGHT_BITS, count),
                              stall_probability=0.0)
