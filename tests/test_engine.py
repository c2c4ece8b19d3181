"""Engine: a tiny seeded spec, run one layer at a time in the Amaranth simulator; every layer's
output bank against the integer reference's activations of that layer, bit for bit; and the
layer's cycle count against the scheduler's op count."""

import time

import numpy as np
import pytest
from amaranth.sim import Simulator

from nqe.model.contract import Residual
from nqe.model.integer_reference import run_reference
from nqe.model.memory_map import build_memory_map
from nqe.model.random_spec import random_integer_network
from nqe.model.spec import BlockSpec, BottleneckSpec, Hardware, HeadSpec, NetworkSpec, StemSpec
from nqe.rtl.engine import Engine, Target
from nqe.rtl.host import hwc, image_elements, layer_output_hwc, memory_images, pack_elements
from nqe.rtl.scheduler import reference_ops

SEED = 20261122


def tiny_spec(variant=0):
    """8x8 input, a few channels; variant 0: add + mux residual blocks, stride 2, 3b/2b/1b, head;
    variant 1: OR residual, bottleneck code bits and no head."""
    if variant == 0:
        return NetworkSpec(
            name="tiny-0", input_height=8, input_width=8, input_channels=3,
            stem=StemSpec(out_channels=4, kernel=3, weight_bits=3, act_bits=2),
            blocks=(BlockSpec("b1", expand=8, out_channels=4, groups=2, residual=Residual.ADD,
                              weight_bits=(2, 3, 1), act_bits=(3, 2, 2), shift_sharing="layer"),
                    BlockSpec("b2", expand=8, out_channels=4, groups=4, stride=2,
                              weight_bits=(1, 2, 3), act_bits=(2, 1, 3)),
                    BlockSpec("b3", expand=4, out_channels=4, groups=2, residual=Residual.MUX,
                              weight_bits=(3, 1, 2), act_bits=(2, 2, 2))),
            head=HeadSpec(num_classes=5, weight_bits=2),
            hardware=Hardware(weight_word_bits=24, lanes=8))
    return NetworkSpec(
        name="tiny-1", input_height=8, input_width=8, input_channels=3,
        stem=StemSpec(out_channels=4, kernel=1, weight_bits=2, act_bits=1),
        blocks=(BlockSpec("b1", expand=4, out_channels=4, groups=2, residual=Residual.OR,
                          weight_bits=(1, 2, 3), act_bits=(2, 3, 1)),),
        bottleneck=BottleneckSpec(out_channels=8, weight_bits=1), head=None,
        hardware=Hardware(weight_word_bits=16, lanes=5))


async def load_memories(ctx, dut, net, image):
    """Write weights, biases, shifts, selects and the image through the host port."""
    mm = build_memory_map(net.spec)
    images = memory_images(net)
    images["act_a"] = pack_elements(image_elements(image, net.spec), 8, mm.act_word_bits)
    targets = {"weights": Target.WEIGHTS, "biases": Target.BIASES, "shifts": Target.SHIFTS,
               "selects": Target.SELECTS, "act_a": Target.ACT_A}
    for name, words in images.items():
        for addr, word in enumerate(words):
            ctx.set(dut.host_write, {"en": 1, "target": targets[name], "addr": addr,
                                     "data": word})
            await ctx.tick()
    ctx.set(dut.host_write.en, 0)


async def read_words(ctx, dut, target, count):
    words = []
    for addr in range(count):
        ctx.set(dut.host_read, {"target": target, "addr": addr})
        await ctx.tick()
        words.append(ctx.get(dut.host_read_data))
    return words


@pytest.mark.parametrize("variant", [0, 1])
def test_layer_by_layer_against_reference(variant):
    spec = tiny_spec(variant)
    seed = SEED + variant
    print(f"spec {spec.name}, seed {seed}")
    net = random_integer_network(spec, seed)
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(spec.input_height, spec.input_width,
                                       spec.input_channels), dtype=np.uint8)
    _, acts = run_reference(net, image[None], return_activations=True)
    mm = build_memory_map(spec)
    rows = mm.descriptors(spec)
    dut = Engine(spec)
    failures, cycles = [], {}

    async def testbench(ctx):
        await load_memories(ctx, dut, net, image)
        for layer, row, placement in zip(spec.layers(), rows, mm.placements):
            ctx.set(dut.first_layer, layer.index)
            ctx.set(dut.last_layer, layer.index)
            ctx.set(dut.start, 1)
            await ctx.tick()
            ctx.set(dut.start, 0)
            while ctx.get(dut.busy):
                await ctx.tick()
            cycles[layer.name] = ctx.get(dut.total_cycles)
            count = layer.out_channels * layer.out_height * layer.out_width
            per = mm.act_word_bits // (1 << row["out_slot_log2"])
            target = Target.ACT_B if placement.out_bank else Target.ACT_A
            words = await read_words(ctx, dut, target, -(-count // per))
            got = layer_output_hwc(layer, words, mm.act_word_bits)
            expected = acts[layer.name][0]
            expected = hwc(expected if expected.ndim == 3 else expected.reshape(-1))
            if not np.array_equal(got, expected):
                failures.append(f"layer {layer.name!r}: got {got.tolist()}, expected "
                                f"{expected.tolist()}")
                return
        if spec.head:
            assert ctx.get(dut.class_index) == int(np.argmax(acts["classifier"][0]))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    started = time.perf_counter()
    sim.run()
    print(f"simulated in {time.perf_counter() - started:.1f} s")
    assert not failures, f"seed {seed}: " + failures[0]
    for layer, row in zip(spec.layers(), rows):
        ops = len(reference_ops(row))
        print(f"{layer.name:12s} cycles {cycles[layer.name]:6d}  ops {ops:6d}  "
              f"expected {Engine.layer_cycles(row):6d}  macs {layer.macs}")
        assert cycles[layer.name] == Engine.layer_cycles(row), layer.name
