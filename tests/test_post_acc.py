"""PostAcc: BSN, HWMSB and every residual join against the contract's functions, with random
values over the spec's layer ranges, exact shift boundaries, clamp edges and negative values."""

import gc

import numpy as np
import pytest
from amaranth import Signal
from amaranth.back import rtlil
from amaranth.lib import data
from amaranth.sim import Simulator

from nqe.model import contract
from nqe.model.spec import ACT_BITS, Residual, load_spec
from nqe.model.random_spec import random_spec
from nqe.rtl.post_acc import PostAcc, PostAccMode

SEED = 20261123
SPEC = load_spec("nqe-1mb")
BSN_LAYERS = [layer for layer in SPEC.layers() if layer.has_bsn]
CLASSIFIER = SPEC.layer("classifier")


# The spec's widths, with out/skip widths widened to every legal activation width so that one
# unit exercises all of them.
WIDTHS = dict(PostAcc.widths_from_spec(SPEC), out_bits_max=max(ACT_BITS),
              skip_bits_max=max(ACT_BITS))


def _unit():
    return PostAcc(**WIDTHS)


def _item(mode, acc, bias, shift=0, out_bits=1, skip=0, skip_bits=0, select=0):
    return dict(mode=mode, acc=int(acc), bias=int(bias), shift=int(shift), out_bits=int(out_bits),
                skip=int(skip), skip_bits=int(skip_bits), select=int(select))


def _expected(item):
    """The contract's answer for one value."""
    y = contract.bsn(item["acc"], item["bias"], item["shift"])
    mode, bits = item["mode"], item["out_bits"]
    if mode is PostAccMode.ACTIVATE:
        return int(contract.hwmsb(y, bits))
    if mode is PostAccMode.ADD:
        return int(contract.residual_add(y, item["skip"], bits))
    if mode is PostAccMode.MUX:
        return int(contract.residual_mux(np.array([y]), np.array([item["skip"]]),
                                         np.array([item["select"]]), bits, item["skip_bits"],
                                         channel_axis=0)[0])
    if mode is PostAccMode.OR:
        return int(contract.residual_or(y, item["skip"]))
    return int(contract.bsn(item["acc"], item["bias"], 0))      # LOGIT: acc + bias


def _run(unit, items, gaps):
    """Drive ``items`` with ``gaps[i]`` idle cycles before item ``i``; returns (input cycle,
    output cycle, value) per output in order, pairing outputs with inputs in order."""
    accepted, produced = [], []

    async def testbench(ctx):
        cycle = 0

        async def tick():
            nonlocal cycle
            await ctx.tick()
            cycle += 1
            if ctx.get(unit.output.valid):
                produced.append((cycle, ctx.get(unit.output.payload)))

        for item, gap in zip(items, gaps):
            ctx.set(unit.input.valid, 0)
            for _ in range(gap):
                await tick()
            ctx.set(unit.mode, item["mode"])
            ctx.set(unit.shift, item["shift"])
            ctx.set(unit.out_bits, item["out_bits"])
            ctx.set(unit.skip_bits, item["skip_bits"])
            ctx.set(unit.input.payload, {k: item[k] for k in ("acc", "bias", "skip", "select")})
            ctx.set(unit.input.valid, 1)
            accepted.append(cycle)
            await tick()
        ctx.set(unit.input.valid, 0)
        # A scrambled configuration after the last value must not reach the values in flight.
        ctx.set(unit.mode, PostAccMode.LOGIT)
        ctx.set(unit.shift, 0)
        for _ in range(unit.LATENCY + 2):
            await tick()

    sim = Simulator(unit)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return accepted, produced


def _check(items, seed, gaps=None):
    unit = _unit()
    rng = np.random.default_rng(seed)
    gaps = gaps if gaps is not None else [int(g) for g in (rng.random(len(items)) < 0.2)]
    accepted, produced = _run(unit, items, gaps)
    assert len(produced) == len(items), f"seed {seed}: {len(produced)} outputs for {len(items)}"
    for item, start, (end, value) in zip(items, accepted, produced):
        want = _expected(item)
        assert value == want, f"seed {seed}: {item} gave {value}, the contract says {want}"
        assert end - start == PostAcc.LATENCY, f"seed {seed}: latency {end - start} for {item}"


def _random_layer_items(rng, layer, mode, count):
    """Values a layer can really produce: acc within its bound, bias within the contract range at
    a random legal shift, extremes of both mixed in."""
    items = []
    bound = layer.acc_bound
    for _ in range(count):
        shift = int(rng.integers(0, layer.max_shift + 1))
        lo, hi = layer.bias_bounds(shift)
        acc = int(rng.choice([-bound, bound, 0])) if rng.random() < 0.15 else \
            int(rng.integers(-bound, bound + 1))
        # Biases near -acc make y land near the clamp edges; the ends of the range are legal too.
        pick = rng.random()
        if pick < 0.15:
            bias = int(rng.choice([lo, hi]))
        elif pick < 0.6:
            bias = int(np.clip(-acc + rng.integers(-4 << shift, 8 << shift), lo, hi))
        else:
            bias = int(rng.integers(lo, hi + 1))
        items.append(_item(mode, acc, bias, shift, layer.out_bits))
    return items


def test_activate_over_the_spec_layers():
    seed = SEED
    rng = np.random.default_rng(seed)
    items = []
    for layer in BSN_LAYERS:
        items += _random_layer_items(rng, layer, PostAccMode.ACTIVATE, 12)
    for item in items[::3]:       # the same values at other output widths
        item["out_bits"] = int(rng.choice(ACT_BITS))
    _check(items, seed)


def test_exact_shift_boundaries_and_clamp_edges():
    """For every shift: sums at k * 2**shift - 1, k * 2**shift, k * 2**shift + 1 (floor on both
    sides of zero), and y = -1, 0, top, top + 1 for every output width."""
    acc_max = (1 << (WIDTHS["acc_bits"] - 1)) - 1
    items = []
    for shift in range(WIDTHS["max_shift"] + 1):
        for k in (-3, -2, -1, 0, 1, 2, 3, 4, 7, 8):
            for delta in (-1, 0, 1):
                total = k * (1 << shift) + delta
                if abs(total) > acc_max - 5:      # both splits below keep acc in range
                    continue
                for out_bits in ACT_BITS:
                    # Split the sum between acc and bias, both signs, so the adder is covered too.
                    items.append(_item(PostAccMode.ACTIVATE, total - 5, 5, shift, out_bits))
                    items.append(_item(PostAccMode.ACTIVATE, total + 3, -3, shift, out_bits))
    _check(items, SEED + 10)   # the seed only places the idle cycles


def test_residual_add_saturates():
    seed = SEED + 1
    rng = np.random.default_rng(seed)
    items = []
    for bits in ACT_BITS:
        top = (1 << bits) - 1
        for y in range(-top - 2, 2 * top + 3):            # every y around the clamp
            for skip in (0, 1, top):
                shift = int(rng.integers(0, 6))
                items.append(_item(PostAccMode.ADD, y << shift, int(rng.integers(0, 1 << shift)),
                                   shift, bits, skip, bits))
    adds = [layer for layer in BSN_LAYERS if layer.residual is Residual.ADD]
    for layer in adds:
        for item in _random_layer_items(rng, layer, PostAccMode.ADD, 10):
            item["skip"], item["skip_bits"] = int(rng.integers(0, 1 << layer.skip_bits)), \
                layer.skip_bits
            items.append(item)
    _check(items, seed)


def test_residual_mux_selects_and_rescales():
    seed = SEED + 2
    rng = np.random.default_rng(seed)
    items = []
    for out_bits in ACT_BITS:
        for skip_bits in range(out_bits, max(ACT_BITS) + 1):
            for skip in range(1 << skip_bits):
                for select in (0, 1):
                    y = int(rng.integers(-4, (1 << out_bits) + 4))
                    items.append(_item(PostAccMode.MUX, y * 4 - 1, int(rng.integers(1, 5)), 2,
                                       out_bits, skip, skip_bits, select))
    _check(items, seed)


def test_residual_or_of_binary_activations():
    seed = SEED + 3
    rng = np.random.default_rng(seed)
    items = []
    for y in range(-3, 4):
        for skip in (0, 1):
            shift = int(rng.integers(0, 4))
            items.append(_item(PostAccMode.OR, y << shift, 0, shift, 1, skip, 1))
            # The contract's OR clamps to one bit whatever out_bits the caller passes.
            items.append(_item(PostAccMode.OR, y << shift, 0, shift, 3, skip, 1))
    layer = next(layer for spec_seed in range(200) for layer in random_spec(spec_seed).layers()
                 if layer.residual is Residual.OR
                 and all(getattr(layer, name) <= WIDTHS[name]
                         for name in ("acc_bits", "bias_bits", "sum_bits", "max_shift")))
    for item in _random_layer_items(rng, layer, PostAccMode.OR, 30):
        item["skip"], item["skip_bits"] = int(rng.integers(0, 2)), 1
        items.append(item)
    _check(items, seed)


def test_classifier_logits_pass_through():
    seed = SEED + 4
    rng = np.random.default_rng(seed)
    bound = CLASSIFIER.acc_bound
    lo, hi = CLASSIFIER.bias_bounds(0)
    items = [_item(PostAccMode.LOGIT, acc, bias, int(rng.integers(0, 16)), int(rng.integers(0, 4)))
             for acc, bias in [(-bound, lo), (bound, hi), (-bound, hi), (0, 0), (-1, 0), (0, -1)]]
    for _ in range(60):
        items.append(_item(PostAccMode.LOGIT, rng.integers(-bound, bound + 1),
                           rng.integers(lo, hi + 1), rng.integers(0, 16), rng.integers(0, 4)))
    _check(items, seed)


def test_modes_interleaved_back_to_back():
    """Every value carries its own configuration through the pipeline: modes and shifts change
    every cycle with no gap."""
    seed = SEED + 5
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(150):
        layer = BSN_LAYERS[int(rng.integers(len(BSN_LAYERS)))]
        mode = PostAccMode(int(rng.integers(0, 5)))
        if mode is PostAccMode.LOGIT:
            bound = CLASSIFIER.acc_bound
            items.append(_item(mode, rng.integers(-bound, bound + 1), rng.integers(-bound, bound)))
            continue
        item = _random_layer_items(rng, layer, mode, 1)[0]
        bits = 1 if mode is PostAccMode.OR else item["out_bits"]
        skip_bits = bits if mode is not PostAccMode.MUX else int(rng.integers(bits, 4))
        item.update(out_bits=bits, skip_bits=skip_bits,
                    skip=int(rng.integers(0, 1 << skip_bits)), select=int(rng.integers(0, 2)))
        items.append(item)
    _check(items, seed, gaps=[0] * len(items))


def test_modes_of_the_spec_layers():
    assert PostAccMode.for_layer(SPEC.layer("stem")) is PostAccMode.ACTIVATE
    assert PostAccMode.for_layer(SPEC.layer("b1.pw2")) is PostAccMode.ADD
    assert PostAccMode.for_layer(CLASSIFIER) is PostAccMode.LOGIT
    with pytest.raises(ValueError, match="pool"):
        PostAccMode.for_layer(SPEC.layer("pool"))


def test_sizes_come_from_the_spec():
    unit = PostAcc.from_spec(SPEC)
    layers = [layer for layer in SPEC.layers() if layer.has_weights]
    assert unit.acc_bits == max(layer.acc_bits for layer in layers)
    assert unit.bias_bits == max(layer.bias_bits for layer in layers)
    assert unit.sum_bits == max(layer.sum_bits for layer in layers)
    assert unit.max_shift == max(layer.max_shift for layer in BSN_LAYERS)
    assert unit.out_bits_max == max(layer.out_bits for layer in BSN_LAYERS)
    ports = []
    for _, _, value in unit.signature.flatten(unit):
        value = value.as_value() if isinstance(value, data.View) else value
        if isinstance(value, Signal):
            ports.append(value)
    assert "module" in rtlil.convert(unit, ports=ports)


@pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")
@pytest.mark.parametrize("name, value", [("acc_bits", 0), ("sum_bits", 1), ("max_shift", -1),
                                         ("out_bits_max", 0), ("skip_bits_max", 0)])
def test_bad_arguments_are_named(name, value):
    widths = dict(acc_bits=8, bias_bits=8, sum_bits=9, max_shift=8, out_bits_max=2,
                  skip_bits_max=2)
    widths[name] = value
    with pytest.raises(ValueError, match=name) as raised:
        PostAcc(**widths)
    del raised           # the traceback holds the half-built object: collect it under the filter
    gc.collect()
