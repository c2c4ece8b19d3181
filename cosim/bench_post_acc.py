# amaranth: UnusedElaboratable=no
# (designs are made here to read their widths; the build elaborates its own)
"""cocotb bench of the post-accumulation unit (:class:`nqe.rtl.post_acc.PostAcc`) on Verilator.

The unit is sized from ``nqe-1mb`` with its output and skip widths widened to every activation
width (1-3 bits), as ``tests/test_post_acc.py`` does, so one build exercises all of them.

Stimulus, for each mode (``ACTIVATE``, ``ADD``, ``MUX``, ``OR``, ``LOGIT``) and with the modes
interleaved value by value: values a layer of the spec can produce (accumulators within its bound,
biases within the contract's range at a random legal shift, their extremes), sums exactly at
``k * 2**shift - 1``, ``k * 2**shift`` and ``k * 2**shift + 1`` for every shift (floor on both
sides of zero, negative sums included), and results at the clamp edges. Values arrive with random
gaps (the unit is always ready, so gaps are its only stall) and with junk on the payload and the
configuration ports while ``valid`` is low: the configuration must travel with its value.

Model: :func:`post_acc_model`, the contract's ``bsn``, ``hwmsb`` and ``residual_add`` /
``residual_mux`` / ``residual_or`` on what the input monitor saw. Checker: each output equals the
model's and comes :attr:`PostAcc.LATENCY` cycles after its value went in.

Every test resets the unit in the middle of its run, with values in the pipeline, and checks
(``bench_support.check_across_reset``) that it recovers.

Run from ``tests/test_cosim_post_acc.py``. Parameters (environment): ``NQE_COSIM_SEED``,
``NQE_POST_ACC_VALUES`` (values on each side of the reset, default 1500).
"""

import os

import cocotb
import numpy as np

from nqe.model import contract
from nqe.model.spec import ACT_BITS, load_spec
from nqe.rtl.post_acc import PostAcc, PostAccMode

from .build import start_clock
from .bench_support import (RunTimer, FieldsDriver, PortGroup, ResetMonitor, TransferMonitor, bench_random,
                            check_across_reset, drive_through_mid_reset, replay_hint,
                            split_at_reset, within_cycles)
from .streams import random_stalls, reset

__all__ = ["SPEC_NAME", "post_acc", "post_acc_model", "random_value"]

SPEC_NAME = "nqe-1mb"
_SPEC = load_spec(SPEC_NAME)
BSN_LAYERS = [layer for layer in _SPEC.layers() if layer.has_bsn]
CLASSIFIER = _SPEC.layer("classifier")


def post_acc():
    """The design under test, as the pytest wrapper builds it and the bench sizes it."""
    return PostAcc(**dict(PostAcc.widths_from_spec(_SPEC), out_bits_max=max(ACT_BITS),
                          skip_bits_max=max(ACT_BITS)))


def post_acc_model(value):
    """The contract's output for one input transaction ``value`` (the field dict of
    :func:`_fields`)."""
    mode = PostAccMode(value["mode"])
    if mode is PostAccMode.LOGIT:
        return int(contract.bsn(value["acc"], value["bias"], 0))      # logits = acc + bias
    y = contract.bsn(value["acc"], value["bias"], value["shift"])
    bits = value["out_bits"]
    if mode is PostAccMode.ACTIVATE:
        return int(contract.hwmsb(y, bits))
    if mode is PostAccMode.ADD:
        return int(contract.residual_add(y, value["skip"], bits))
    if mode is PostAccMode.MUX:
        return int(contract.residual_mux(np.array([y]), np.array([value["skip"]]),
                                         np.array([value["select"]]), bits, value["skip_bits"],
                                         channel_axis=0)[0])
    return int(contract.residual_or(y, value["skip"]))


def _port_range(bits):
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _sum_range(design):
    """The sums ``acc + bias`` the contract allows: within ``sum_bits`` and reachable from the
    two ports' ranges."""
    (acc_lo, acc_hi), (bias_lo, bias_hi) = map(_port_range, (design.acc_bits, design.bias_bits))
    sum_lo, sum_hi = _port_range(design.sum_bits)
    return max(sum_lo, acc_lo + bias_lo), min(sum_hi, acc_hi + bias_hi)


def _split_sum(rng, design, total):
    """``(acc, bias)`` adding up to ``total``, each in its port's range, drawn at random."""
    (acc_lo, acc_hi), (bias_lo, bias_hi) = map(_port_range, (design.acc_bits, design.bias_bits))
    acc = rng.randint(max(acc_lo, total - bias_hi), min(acc_hi, total - bias_lo))
    return acc, total - acc


def random_value(rng, design, mode):
    """One input transaction for ``mode``: a dict of ``acc``, ``bias``, ``skip``, ``select``,
    ``mode``, ``shift``, ``out_bits``, ``skip_bits`` within the contract's ranges."""
    junk = {"shift": rng.randint(0, design.max_shift), "skip": rng.getrandbits(3),
            "out_bits": rng.randint(0, design.out_bits_max), "select": rng.getrandbits(1),
            "skip_bits": rng.randint(0, design.skip_bits_max)}
    if mode is PostAccMode.LOGIT:
        # The classifier's range; shift, widths and skip are ignored, so junk there.
        bound = CLASSIFIER.acc_bound
        lo, hi = CLASSIFIER.bias_bounds(0)
        acc = rng.choice([-bound, bound, 0, -1, rng.randint(-bound, bound)])
        bias = rng.choice([lo, hi, 0, -1, rng.randint(lo, hi)])
        return dict(junk, mode=mode.value, acc=acc, bias=bias)

    out_bits = rng.choice(ACT_BITS)            # OR ignores it: any width must give 0 or 1
    skip_bits = {PostAccMode.MUX: rng.randint(out_bits, design.skip_bits_max),
                 PostAccMode.OR: 1}.get(mode, out_bits)
    config = dict(mode=mode.value, out_bits=out_bits, skip_bits=skip_bits,
                  skip=rng.getrandbits(skip_bits), select=rng.getrandbits(1))
    top = (1 << out_bits) - 1
    kind = rng.random()
    if kind < 0.4:
        # What a layer of the spec can produce; biases near -acc put y near the clamp edges.
        layer = rng.choice(BSN_LAYERS)
        shift = rng.randint(0, layer.max_shift)
        lo, hi = layer.bias_bounds(shift)
        bound = layer.acc_bound
        acc = rng.choice([-bound, bound, 0]) if rng.random() < 0.15 else rng.randint(-bound, bound)
        pick = rng.random()
        if pick < 0.15:
            bias = rng.choice([lo, hi])
        elif pick < 0.6:
            bias = min(max(-acc + rng.randint(-4 << shift, (8 << shift) - 1), lo), hi)
        else:
            bias = rng.randint(lo, hi)
        return dict(config, acc=acc, bias=bias, shift=shift)
    shift = rng.randint(0, design.max_shift)
    sum_lo, sum_hi = _sum_range(design)
    if kind < 0.75:
        # An exact shift boundary: floor((k * 2**shift + delta) / 2**shift), both signs of k.
        biggest = (sum_hi - 1) >> shift                         # k * 2**shift + 1 must fit
        k = rng.randint(-min(6, biggest), min(top + 3, biggest))
        total = (k << shift) + rng.choice((-1, 0, 1))
    else:
        # A clamp edge: y = -1, 0, 1, top, top + 1 (with ADD, the skip moves it; also covered).
        # y * 2**shift plus a remainder below 2**shift must stay within the sum's range.
        y_lo, y_hi = -(-sum_lo >> shift), (sum_hi - ((1 << shift) - 1)) >> shift
        y = max(y_lo, min(y_hi, rng.choice([-2, -1, 0, 1, top - 1, top, top + 1,
                                            top - config["skip"]])))
        total = (y << shift) + rng.randrange(1 << shift)
    acc, bias = _split_sum(rng, design, total)
    return dict(config, acc=acc, bias=bias, shift=shift)


def _transaction(design, value):
    """The driver's dict for :class:`PortGroup`: the packed payload and the configuration."""
    payload = design.input_layout.const({name: value[name]
                                         for name in ("acc", "bias", "skip", "select")})
    return {"payload": int(payload.as_bits()), "mode": value["mode"], "shift": value["shift"],
            "out_bits": value["out_bits"], "skip_bits": value["skip_bits"]}


def _fields(design, seen):
    """What the input monitor saw, back to the field dict :func:`post_acc_model` takes."""
    payload = design.input_layout.from_bits(seen["payload"])
    return dict(seen, acc=int(payload.acc), bias=int(payload.bias), skip=int(payload.skip),
                select=int(payload.select))


def _junk(design, rng):
    sizes = {"payload": design.input_layout.size, "mode": 3, "shift": len(design.shift),
             "out_bits": len(design.out_bits), "skip_bits": len(design.skip_bits)}
    return lambda: {name: rng.getrandbits(size) for name, size in sizes.items()}


async def _run_with_mid_reset(dut, rng, name, values_before, values_after, stall_probability):
    design = post_acc()
    start_clock(dut.clk)
    dut.input__valid.value = 0
    await reset(dut.clk, dut.rst)

    def ports():
        return PortGroup(payload=dut.input__payload, mode=dut.mode, shift=dut.shift,
                         out_bits=dut.out_bits, skip_bits=dut.skip_bits)

    values_in = TransferMonitor(dut.clk, dut.input__valid, ports())
    outputs = TransferMonitor(dut.clk, dut.output__valid, dut.output__payload, signed=True)
    resets = ResetMonitor(dut.clk, dut.rst)
    for monitor in (values_in, outputs, resets):
        monitor.start()
    driver = FieldsDriver(dut.clk, dut.input__valid, ports(),
                          stall=random_stalls(stall_probability, 5, rng),
                          idle_values=_junk(design, rng))
    before = [_transaction(design, value) for value in values_before]
    after = [_transaction(design, value) for value in values_after]

    timer = RunTimer()
    await within_cycles(
        drive_through_mid_reset(dut.clk, dut.rst, driver, before=before, after=after,
                                junk=_junk(design, rng), reset_cycles=rng.randint(1, 4),
                                drain_cycles=design.LATENCY + 4),
        10 * (len(before) + len(after) + 20), name)
    window, wall, cycles = timer.finish((values_in, outputs), resets, name)
    in_before, _, in_after = split_at_reset(values_in.transfers, window)
    out_before, out_during, out_after = split_at_reset(outputs.transfers, window)
    assert len(in_after) == len(after), (f"{replay_hint()} {name}: the input monitor saw "
                                         f"{len(in_after)} values after the reset, the bench "
                                         f"sent {len(after)}")

    def expect(transfers):
        return [(_fields(design, t.value), t.cycle) for t in transfers]

    def compare(expected, actual, label):
        value, in_cycle = expected
        want = post_acc_model(value)
        shown = {k: value[k] for k in ("acc", "bias", "shift", "out_bits", "skip", "skip_bits",
                                       "select")}
        assert actual.value == want, (f"{replay_hint()} {label}: "
                                      f"{PostAccMode(value['mode']).name} {shown} gave "
                                      f"{actual.value}, the contract says {want}")
        assert actual.cycle - in_cycle == design.LATENCY, (
            f"{replay_hint()} {label}: output {actual.cycle - in_cycle} cycles after "
            f"its value, documented latency {design.LATENCY}")

    check_across_reset(compare, expect(in_before), out_before + out_during, expect(in_after),
                       out_after, what=name)
    dut._log.info(f"{replay_hint()} {name}: {len(before) + len(after)} values, "
                  f"{len(out_before) + len(out_during)} + {len(out_after)} outputs checked around "
                  f"a reset at cycle {window.first}, {cycles:.0f} cycles in {wall:.2f} s "
                  f"({cycles / wall:,.0f} cycles/s)")


def _value_count():
    return int(os.environ.get("NQE_POST_ACC_VALUES", "1500"))


@cocotb.test()
@cocotb.parametrize(mode=[mode.name.lower() for mode in PostAccMode])
async def one_mode_with_gaps_and_reset(dut, mode):
    """One mode: layer values, shift boundaries and clamp edges, random gaps, a mid-run reset."""
    mode = PostAccMode[mode.upper()]
    rng = bench_random(f"one_mode/{mode.name}")
    design = post_acc()
    count = _value_count()
    await _run_with_mid_reset(dut, rng, f"mode {mode.name}",
                              [random_value(rng, design, mode) for _ in range(count)],
                              [random_value(rng, design, mode) for _ in range(count)],
                              stall_probability=0.3)


@cocotb.test()
async def modes_change_back_to_back(dut):
    """The mode, shift and widths change with every value and no idle cycle: each value's
    configuration travels with it through the pipeline, across a mid-run reset."""
    rng = bench_random("modes_change_back_to_back")
    design = post_acc()
    count = _value_count()

    def values():
        return [random_value(rng, design, rng.choice(list(PostAccMode))) for _ in range(count)]
    await _run_with_mid_reset(dut, rng, "modes interleaved", values(), values(),
                              stall_probability=0.0)
