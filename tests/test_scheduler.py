"""Scheduler: the emitted operation sequence against the plain-Python loop nest
(:func:`reference_ops`) for nqe-1mb's layer shapes (truncated) and whole layers of random specs;
and the loop nest itself, interpreted in Python, against the integer reference."""

import numpy as np
import pytest
from amaranth.sim import Simulator

from nqe.model import contract
from nqe.model.integer_reference import run_reference
from nqe.model.memory_map import build_memory_map, weight_stream
from nqe.model.random_spec import random_integer_network, random_spec
from nqe.model.spec import LayerKind, Residual, load_spec
from nqe.rtl.scheduler import Scheduler, reference_ops

SEED = 20261122
SPEC_SEEDS = [3, 11, 17, 29]
OP_FIELDS = ("act_addr", "act_slot", "zero", "weight_addr", "first", "last", "lanes")


def _emitted(dut, desc, limit, stall_every=0):
    """Run one layer; the first ``limit`` accepted ops as dicts, and whether ``done`` rose."""
    ops = []
    state = {"done": False}

    async def testbench(ctx):
        ctx.set(dut.desc, desc)
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        cycle = 0
        while len(ops) < limit:
            ready = not (stall_every and cycle % stall_every == stall_every - 1)
            ctx.set(dut.ops.ready, ready)
            if ctx.get(dut.done):
                state["done"] = True
                break
            if ready and ctx.get(dut.ops.valid):
                payload = ctx.get(dut.ops.payload)
                ops.append({f: int(getattr(payload, f)) for f in OP_FIELDS})
            await ctx.tick()
            cycle += 1

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return ops, state["done"]


def _strip(ops):
    return [{f: op[f] for f in OP_FIELDS} for op in ops]


def _compare(spec, names, limit, stall_every=0):
    mm = build_memory_map(spec)
    dut = Scheduler(mm, spec)
    rows = dict(zip([layer.name for layer in spec.layers()], mm.descriptors(spec)))
    for name in names:
        expected = _strip(reference_ops(rows[name]))
        got, done = _emitted(dut, rows[name], min(limit, len(expected)) + 1, stall_every)
        where = f"spec {spec.name!r}, layer {name!r}"
        for index, (g, e) in enumerate(zip(got, expected)):
            assert g == e, f"{where}: op {index}: got {g}, expected {e}"
        if len(expected) <= limit:
            assert len(got) == len(expected) and done, \
                f"{where}: {len(got)} ops then done={done}, expected {len(expected)}"


def test_nqe_1mb_layer_shapes_truncated():
    spec = load_spec("nqe-1mb")
    # Stem (3x3, 8-bit image), pointwise, group-wise stride 1 and 2, pool, classifier.
    _compare(spec, ["stem", "b1.pw1", "b1.gw", "b2.gw", "b6.pw2"], limit=400)
    _compare(spec, ["pool", "classifier"], limit=2500)


@pytest.mark.parametrize("seed", SPEC_SEEDS)
def test_random_spec_layers(seed):
    spec = random_spec(seed)
    print(f"spec seed {seed}")
    names = [layer.name for layer in spec.layers()]
    _compare(spec, names, limit=1500, stall_every=5 if seed % 2 else 0)


# -- the loop nest's meaning: interpret the ops in Python, compare with the integer reference ---


def _hwc(a):
    """[C, H, W] -> HWC-ordered flat element list (the activation bank order)."""
    return np.asarray(a, dtype=np.int64).transpose(1, 2, 0).reshape(-1)


def interpret_layer(layer, desc, stream, x_hwc, word_codes):
    """Run ``reference_ops(desc)`` on the flat HWC input the way the engine routes it (lane ``l``
    takes code ``l`` of the word and lane group ``l >> lane_group_log2``'s element, groups
    ``2**(group_stride_log2 - in_slot_log2)`` elements apart): the flat HWC accumulators."""
    elems = 1 << desc["in_elems_log2"]
    group_step = 1 << max(desc["group_stride_log2"] - desc["in_slot_log2"], 0)
    accs = []
    acc = np.zeros(word_codes, dtype=np.int64)
    for op in reference_ops(desc):
        base = (op["weight_addr"] - desc["weight_base"]) * word_codes
        element = op["act_addr"] * elems + op["act_slot"]
        for lane in range(op["lanes"]):
            a = 0 if op["zero"] else x_hwc[element + (lane >> desc["lane_group_log2"]) * group_step]
            acc[lane] = (0 if op["first"] else acc[lane]) + int(stream[base + lane]) * int(a)
        if op["last"]:
            accs.extend(int(v) for v in acc[:op["lanes"]])
    return np.array(accs, dtype=np.int64)


@pytest.mark.parametrize("seed", SPEC_SEEDS)
def test_loop_nest_computes_the_reference(seed):
    spec = random_spec(seed)
    net = random_integer_network(spec, seed + SEED)
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(1, spec.input_height, spec.input_width,
                                       spec.input_channels), dtype=np.uint8)
    _, acts = run_reference(net, image, return_activations=True)
    rows = build_memory_map(spec).descriptors(spec)
    x = image[0].transpose(2, 0, 1)
    block_input = {}
    for layer, desc in zip(spec.layers(), rows):
        if layer.name.endswith(".pw1"):
            block_input[layer.name] = _hwc(x)
        if layer.has_weights:
            stream = weight_stream(net.layers[layer.name].codes, layer, spec.hardware)
            word_codes = contract.codes_per_word(layer.weight_bits,
                                                 spec.hardware.weight_word_bits)
        else:
            word_codes = spec.hardware.weight_word_bits      # all-ones 1-bit words
            stream = np.ones(len(reference_ops(desc)) * word_codes, dtype=np.int64)
        x_hwc = _hwc(x if x.ndim == 3 else np.asarray(x).reshape(-1, 1, 1))
        acc = interpret_layer(layer, desc, stream, x_hwc, word_codes)
        channel = np.tile(np.arange(layer.out_channels), layer.out_height * layer.out_width)
        if layer.kind is LayerKind.POOL:
            y = acc
        elif layer.kind is LayerKind.CLASSIFIER:
            y = acc + net.layers[layer.name].bias[channel]
        else:
            y = contract.bsn(acc, net.layers[layer.name].bias[channel], net.shift_of(layer))
            skip = block_input.get(layer.residual_source)
            if layer.residual is Residual.ADD:
                y = contract.residual_add(y, skip, layer.out_bits)
            elif layer.residual is Residual.MUX:
                y = contract.residual_mux(y, skip, net.layers[layer.name].select[channel],
                                          layer.out_bits, layer.skip_bits, channel_axis=0)
            elif layer.residual is Residual.OR:
                y = contract.residual_or(y, skip)
            else:
                y = contract.hwmsb(y, layer.out_bits)
        expected = acts[layer.name][0]
        expected_hwc = _hwc(expected if expected.ndim == 3 else expected.reshape(-1, 1, 1))
        assert np.array_equal(y, expected_hwc), f"seed {seed}, layer {layer.name!r}"
        x = np.asarray(y).reshape(layer.out_height, layer.out_width, -1).transpose(2, 0, 1)
