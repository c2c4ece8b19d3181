"""Accelerator top: whole images through the host byte protocol in the Amaranth simulator, against
the integer reference bit for bit; and every malformed-traffic case of the protocol."""

import time

import numpy as np
import pytest
from amaranth.sim import Simulator

from nqe.model.integer_reference import run_reference
from nqe.model.random_spec import random_integer_network, random_spec
from nqe.rtl import host as host_module
from nqe.rtl.engine import Engine
from nqe.rtl.host import HostProtocol
from nqe.rtl.top import Accelerator, Opcode, Status
from test_engine import tiny_spec

SEED = 20261122


def session(dut, steps, max_cycles=200_000):
    """``steps``: list of (command bytes, reply byte count). Sends each step's bytes, waits for its
    whole reply, returns the replies (bytes). Fails, rather than hangs, past ``max_cycles``."""
    replies = []

    async def testbench(ctx):
        ctx.set(dut.response.ready, 1)
        cycles = 0
        for data, expect in steps:
            reply = bytearray()
            pending = list(data)
            while pending or len(reply) < expect:
                ctx.set(dut.command.valid, bool(pending))
                if pending:
                    ctx.set(dut.command.payload, pending[0])
                accepted = bool(pending) and ctx.get(dut.command.ready)
                out = ctx.get(dut.response.payload) if ctx.get(dut.response.valid) else None
                await ctx.tick()
                cycles += 1
                assert cycles < max_cycles, f"no reply after {cycles} cycles (step {len(replies)})"
                if accepted:
                    pending.pop(0)
                if out is not None:
                    reply.append(out)
            ctx.set(dut.command.valid, 0)
            for _ in range(3):               # nothing more may follow the reply
                assert not ctx.get(dut.response.valid), f"extra reply byte after step {len(replies)}"
                await ctx.tick()
            replies.append(bytes(reply))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return replies


def _image(spec, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(spec.input_height, spec.input_width, spec.input_channels),
                        dtype=np.uint8)


def test_protocol_constants_match_the_host_driver():
    assert {op.name: op.value for op in Opcode} == host_module.OPCODES
    assert {s.value: s.name for s in Status} == host_module.STATUSES


# Random specs (model.random_spec) chosen for short simulations that together cover the residual
# modes: 23 add, 30 or + bottleneck, 11 mux, 35 add and mux.
RANDOM_SPEC_SEEDS = (23, 30, 11, 35)


def _case(case):
    kind, number = case.split("-")
    if kind == "tiny":
        return tiny_spec(int(number)), SEED + 100 + int(number)
    return random_spec(int(number)), int(number)


@pytest.mark.parametrize("case", ["tiny-0", "tiny-1"] +
                         [f"random-{seed}" for seed in RANDOM_SPEC_SEEDS])
def test_end_to_end_matches_reference(case):
    spec, seed = _case(case)
    print(f"spec {spec.name}, seed {seed}")
    net = random_integer_network(spec, seed)
    image = _image(spec, seed)
    expected, acts = run_reference(net, image[None], return_activations=True)
    host = HostProtocol(spec)
    dut = Accelerator(spec)
    loads = host.load_all(net)
    n_loads = len(dut.needed_loads) - 1           # LOAD_IMAGE is separate
    steps = [(loads, n_loads), (host.load_image(image), 1), (host.run(), 1),
             (host.read_result(), host.reply_length("READ_RESULT")),
             (host.read_counters(), host.reply_length("READ_COUNTERS")),
             (host.run(), 1)]                    # the run consumed the image
    started = time.perf_counter()
    replies = session(dut, steps)
    print(f"simulated in {time.perf_counter() - started:.1f} s")
    assert replies[0] == bytes(n_loads) and replies[1] == b"\0" and replies[2] == b"\0"
    index, output = host.parse_result(replies[3])
    if spec.head:
        assert np.array_equal(output, expected[0]), f"seed {seed}: logits {output} vs {expected[0]}"
        assert index == int(np.argmax(expected[0]))
    else:
        assert np.array_equal(output, expected[0]), f"seed {seed}: code bits differ"
    counters = host.parse_counters(replies[4])
    rows = host.memory_map.descriptors(spec)
    ideal = 0.0
    for layer, row in zip(spec.layers(), rows):
        assert counters["layers"][layer.name] == Engine.layer_cycles(row)
        if layer.has_weights:
            ideal += layer.macs / (spec.hardware.weight_word_bits // layer.weight_bits)
    assert counters["total"] == sum(counters["layers"].values())
    assert 0 < counters["mac"] < counters["total"]
    print(f"cycles {counters['total']}, MAC-busy {counters['mac']}, ideal {ideal:.0f} "
          f"({counters['total'] / ideal:.2f}x)")
    assert replies[5] == bytes([Status.NOT_LOADED.value])


def test_malformed_traffic_sets_status_and_never_hangs():
    spec = tiny_spec(0)
    dut = Accelerator(spec)
    host = HostProtocol(spec)
    image = _image(spec, SEED)
    good_image = host.load_image(image)
    pixels = bytes(image.reshape(-1))
    err = lambda status: bytes([status.value])           # noqa: E731
    steps = [
        (host.run(), 1),                                   # run before anything is loaded
        (host.read_status(), 2),
        (host.read_status(), 2),                           # reading cleared it
        (host.frame(0x7E, b"\x01\x02\x03"), 1),            # unknown opcode, payload discarded
        (host.frame("LOAD_IMAGE", pixels[:-1]), 1),        # one image byte too few
        (host.frame("LOAD_IMAGE", pixels + b"\0"), 1),     # one too many
        (host.frame("RUN", b"\0"), 1),                     # RUN with a payload
        (good_image, 1),
        (host.run(), 1),                                   # image but no weights
        (host.read_status(), 2),
    ]
    replies = session(dut, steps, max_cycles=20_000)
    assert replies == [
        err(Status.NOT_LOADED),
        b"\0" + err(Status.NOT_LOADED),
        b"\0\0",
        err(Status.UNKNOWN_OPCODE),
        err(Status.BAD_LENGTH),
        err(Status.BAD_LENGTH),
        err(Status.BAD_LENGTH),
        b"\0",
        err(Status.NOT_LOADED),
        b"\0" + err(Status.NOT_LOADED),
    ]
