# amaranth: UnusedElaboratable=no
# (designs are made here to read their layouts and lengths; the build elaborates its own)
"""cocotb bench of the host protocol: the accelerator top (:class:`nqe.rtl.top.Accelerator`) of a
tiny spec on Verilator, driven over its two byte streams.

Stimulus: command frames built by :class:`nqe.rtl.host.HostProtocol` (or by hand for malformed
ones) for random integer networks and random images drawn from the run's seed; a
:class:`~nqe.cosim.streams.StreamDriver` sends them and a :class:`~nqe.cosim.streams.StreamSink`
takes the response bytes, both with random stalls whose profile changes command by command
(none, short, long); a :class:`~nqe.cosim.streams.StreamMonitor` hands the response bytes over.

- valid sessions: the loads (weights, biases, shifts, selects) in random order, LOAD_IMAGE, RUN,
  READ_RESULT, READ_COUNTERS, READ_STATUS, for several images and a second network;
- malformed traffic: unknown opcodes (with payloads that look like commands), every opcode with a
  wrong payload length, RUN before every memory and a fresh image are loaded, mixed at random with
  valid loads and reads; a bad-length load must leave the memory and its loaded state alone;
- a reset in the middle of a load's payload (bytes still streaming), then a new session.

Model: :class:`ProtocolModel`, the documented protocol (the table of ``rtl/top.py``): each
command's status, the sticky error READ_STATUS returns and clears, which memories are loaded (a
RUN consumes the image, a reset forgets everything). Results: the integer reference
(:func:`nqe.model.integer_reference.run_reference`) of the network and image last loaded;
counters: the scheduler's loop nest (``Engine.layer_cycles`` a layer,
one MAC-busy cycle per scheduler op). Checker: every reply byte for byte (status, data, length), no byte
more; every command must be answered within a bound (a hang fails, naming the command).
READ_RESULT's data is not checked after a LOAD_IMAGE that wrote over the final map (bank A):
the protocol (rtl/top.py) keeps a result only until the next LOAD_IMAGE.

Bench self-check: the bench must fail on :class:`BrokenAccelerator` (a response byte lost after a
stall of two cycles) and with a deliberately wrong model (``NQE_HOST_WRONG_MODEL``).

Run from ``tests/test_cosim_host.py``. Parameters (environment): ``NQE_COSIM_SEED``,
``NQE_HOST_SPEC`` (the spec JSON the simulator was built from), ``NQE_HOST_WRONG_MODEL``
(bench self-check only: ``"weights"`` runs the reference on another network, ``"status"``
expects BAD_LENGTH for unknown opcodes; either must make the bench fail).
"""

import collections
import os
import time

import cocotb
import numpy as np
from amaranth import Module, Signal
from amaranth.lib import wiring
from cocotb.triggers import RisingEdge

from nqe.model.integer_reference import run_reference
from nqe.model.memory_map import build_memory_map
from nqe.model.random_spec import random_integer_network
from nqe.model.spec import load_spec
from nqe.rtl.engine import Engine
from nqe.rtl.host import HostProtocol
from nqe.rtl.scheduler import reference_ops
from nqe.rtl.top import Accelerator, Opcode, Status

from .build import CLOCK_PERIOD_NS, start_clock
from .bench_support import (ResetMonitor, RunTimer, bench_random, replay_hint, within_cycles)
from .streams import StreamDriver, StreamMonitor, StreamPorts, StreamSink, reset, wait_cycles

__all__ = ["LOADS", "BrokenAccelerator", "ProtocolModel", "expected_counters", "load_frames"]

LOADS = (Opcode.LOAD_WEIGHTS, Opcode.LOAD_BIASES, Opcode.LOAD_SHIFTS, Opcode.LOAD_SELECTS,
         Opcode.LOAD_IMAGE)
#: Stall profiles (probability, longest stall), dealt per command for each stream from a
#: shuffled deck, so that every run of four commands or more uses each of them (drawn
#: independently, a run could miss the long stalls and the bench's self-check with it).
STALL_PROFILES = ((0.0, 1), (0.3, 3), (0.6, 8), (0.1, 25))


class ProtocolModel:
    """The documented host protocol at transaction level: the status of each command, the sticky
    error, and which memories are loaded."""

    def __init__(self, accelerator, wrong=""):
        self.lengths = {op.value: accelerator.length(op) for op in Opcode}
        self.needed = {op.value for op in accelerator.needed_loads}
        self._wrong = wrong
        self.reset()

    def reset(self):
        self.loaded = set()
        self.sticky = Status.OK.value

    def status(self, opcode, length):
        """The status of a command of ``length`` payload bytes; updates the state."""
        if opcode not in self.lengths:
            status = Status.BAD_LENGTH if self._wrong == "status" else Status.UNKNOWN_OPCODE
        elif length != self.lengths[opcode]:
            status = Status.BAD_LENGTH
        elif opcode == Opcode.RUN.value and not self.needed <= self.loaded:
            status = Status.NOT_LOADED
        else:
            status = Status.OK
            if opcode in {op.value for op in LOADS}:
                self.loaded.add(opcode)
            elif opcode == Opcode.RUN.value:
                self.loaded.discard(Opcode.LOAD_IMAGE.value)      # the run consumes the image
        if status is not Status.OK:
            self.sticky = status.value
        return status.value

    def read_status(self):
        """The sticky error READ_STATUS returns; it is cleared."""
        value, self.sticky = self.sticky, Status.OK.value
        return value


def load_frames(host, net):
    """``{opcode: frame}`` of the memory loads of ``net`` (the frames of ``host.load_all``)."""
    data, frames = host.load_all(net), {}
    while data:
        length = int.from_bytes(data[1:4], "little")
        frames[data[0]] = data[:4 + length]
        data = data[4 + length:]
    return frames


def expected_counters(spec):
    """READ_COUNTERS after a RUN, from the loop nest: ``{'total', 'mac', 'layers'}``."""
    rows = build_memory_map(spec).descriptors(spec)
    layers = {layer.name: Engine.layer_cycles(row)
              for layer, row in zip(spec.layers(), rows)}
    mac = sum(len(reference_ops(row)) for row in rows)
    return {"total": sum(layers.values()), "mac": mac, "layers": layers}


class HostBench:
    """The host side of one test: sends commands, checks every reply against the model."""

    def __init__(self, dut, spec, name):
        self.dut = dut
        self.spec = spec
        self.name = name
        self.rng = bench_random(name)
        self.host = HostProtocol(spec)
        self.accelerator = Accelerator(spec)
        self.wrong = os.environ.get("NQE_HOST_WRONG_MODEL", "")
        self.model = ProtocolModel(self.accelerator, self.wrong)
        self.counters = expected_counters(spec)
        self.run_cycles = self.counters["total"]
        self.sources = {}            # opcode -> the network or image its memory holds
        self.result = None           # reference (logits or code bits) of the last RUN
        # The final map may sit in bank A, which LOAD_IMAGE writes: READ_RESULT then reads back
        # image bytes (rtl/top.py: the result lasts until the next LOAD_IMAGE), so the data is
        # not checked until the next RUN.
        self.image_overwrites_result = build_memory_map(spec).placements[-1].out_bank == 0
        self.commands = self.bytes = 0
        self.statuses = collections.Counter()
        self._profiles = {"command": STALL_PROFILES[0], "response": STALL_PROFILES[0]}
        self._decks = {stream: [] for stream in self._profiles}
        self.driver = StreamDriver(dut.clk, StreamPorts.of(dut, "command"),
                                   stall=self._stall("command"))
        self.sink = StreamSink(dut.clk, StreamPorts.of(dut, "response"),
                               stall=self._stall("response"))
        self.replies = StreamMonitor(dut.clk, StreamPorts.of(dut, "response"))

    def _stall(self, stream):
        stall_rng = bench_random(f"{self.name}/{stream}")

        def stall():
            probability, longest = self._profiles[stream]
            return stall_rng.randint(1, longest) if stall_rng.random() < probability else 0
        return stall

    def start(self):
        self.sink.start()
        self.replies.start()

    def _bound(self, frame):
        longest = max(longest for _, longest in STALL_PROFILES) + 1
        reply = self.host.reply_length("READ_RESULT") + self.host.reply_length("READ_COUNTERS")
        run = self.run_cycles if frame[0] == Opcode.RUN.value else 0
        return (len(frame) + reply + 8) * longest + run + 100

    async def _reply(self, opcode, length, what):
        status = await self.replies.values.get()
        expected = self.model.status(opcode, length)
        assert status == expected, (
            f"{replay_hint()} {what}: status {_name(status)}, the protocol says "
            f"{_name(expected)} (lengths {self.model.lengths}, loaded "
            f"{sorted(self.model.loaded)})")
        rest = self.host.reply_length(opcode, status) - 1
        return bytes([status] + [await self.replies.values.get() for _ in range(rest)])

    async def send(self, frame, what, source=None):
        """Send one command frame and check its whole reply; returns the reply. ``source``: the
        network or image a load carries (for the model of the results)."""
        hint = replay_hint()
        assert self.replies.values.empty(), (
            f"{hint} before {what}: {self.replies.values.qsize()} response bytes nobody asked for")
        for stream, deck in self._decks.items():
            if not deck:
                deck.extend(self.rng.sample(STALL_PROFILES, len(STALL_PROFILES)))
            self._profiles[stream] = deck.pop()
        opcode, length = frame[0], len(frame) - 4
        sending = cocotb.start_soon(self.driver.send_all(frame))
        bound = self._bound(frame)
        reply = await within_cycles(self._reply(opcode, length, what), bound,
                                    f"{what}: no complete reply (a hang)")
        await within_cycles(sending, bound, f"{what}: command bytes not taken")
        self.commands += 1
        self.bytes += len(frame) + len(reply)
        self.statuses[_name(reply[0])] += 1
        if reply[0] == Status.OK.value:
            self._check_data(opcode, reply, what, source)
        return reply

    def _check_data(self, opcode, reply, what, source):
        hint = replay_hint()
        if opcode in {op.value for op in LOADS}:
            self.sources[opcode] = source
            if opcode == Opcode.LOAD_IMAGE.value and self.image_overwrites_result:
                self.result = None
        elif opcode == Opcode.RUN.value:
            self.result = self._reference()
        elif opcode == Opcode.READ_STATUS.value:
            expected = self.model.read_status()
            assert reply[1] == expected, (f"{hint} {what}: sticky error {_name(reply[1])}, "
                                          f"expected {_name(expected)}")
        elif opcode == Opcode.READ_RESULT.value and self.result is not None:
            index, output = self.host.parse_result(reply)
            expected = self.result
            assert np.array_equal(output, expected), (
                f"{hint} {what}: output {output.tolist()}, the integer reference gives "
                f"{expected.tolist()}")
            if self.spec.head is not None:
                assert index == int(np.argmax(expected)), (
                    f"{hint} {what}: class index {index}, the reference's logits give "
                    f"{int(np.argmax(expected))}")
        elif opcode == Opcode.READ_COUNTERS.value and self.result is not None:
            counters = self.host.parse_counters(reply)
            assert counters == self.counters, (f"{hint} {what}: counters {counters}, the loop "
                                               f"nest gives {self.counters}")

    def _reference(self):
        nets = {id(self.sources[op.value]): self.sources[op.value] for op in LOADS
                if op is not Opcode.LOAD_IMAGE and op.value in self.model.needed}
        assert len(nets) == 1, "bench error: a RUN on memories loaded from different networks"
        net = next(iter(nets.values()))
        if self.wrong == "weights":
            net = random_integer_network(self.spec, self.rng.getrandbits(32))
        return run_reference(net, self.sources[Opcode.LOAD_IMAGE.value][None])[0]

    async def load_network(self, net, what):
        """The needed memory loads of ``net``, in random order."""
        frames = load_frames(self.host, net)
        order = [op for op in frames if op in self.model.needed]
        self.rng.shuffle(order)
        for opcode in order:
            await self.send(frames[opcode], f"{what}: {Opcode(opcode).name}", source=net)

    async def infer(self, image, what):
        """LOAD_IMAGE, RUN, then READ_RESULT and READ_COUNTERS in random order."""
        await self.send(self.host.load_image(image), f"{what}: LOAD_IMAGE", source=image)
        await self.send(self.host.run(), f"{what}: RUN")
        reads = [(self.host.read_result(), "READ_RESULT"),
                 (self.host.read_counters(), "READ_COUNTERS")]
        self.rng.shuffle(reads)
        for frame, name in reads:
            await self.send(frame, f"{what}: {name}")

    def random_image(self):
        shape = (self.spec.input_height, self.spec.input_width, self.spec.input_channels)
        return np.random.default_rng(self.rng.getrandbits(64)).integers(0, 256, size=shape,
                                                                         dtype=np.uint8)

    def random_network(self):
        return random_integer_network(self.spec, self.rng.getrandbits(32))

    async def finish(self, what):
        """Room for late or spurious response bytes: there must be none."""
        await wait_cycles(self.dut.clk, 20)
        assert self.replies.values.empty(), (
            f"{replay_hint()} {what}: {self.replies.values.qsize()} response bytes after the "
            f"last reply")


class BrokenAccelerator(wiring.Component):
    """A deliberately broken copy of the accelerator (same ports), for the bench self-check: in the
    second cycle of a stall on the response stream the inner accelerator's ``ready`` is forced
    high, so a response byte is lost (only stalls of two cycles or more find it; after three,
    as before 2026-12-06, a run could draw too few long stalls to show it)."""

    def __init__(self, spec):
        self._inner = Accelerator(spec)
        super().__init__(self._inner.signature)

    def elaborate(self, platform):
        m = Module()
        m.submodules.inner = inner = self._inner
        wiring.connect(m, wiring.flipped(self.command), inner.command)
        stalled = Signal()
        m.d.sync += stalled.eq(self.response.valid & ~self.response.ready & ~stalled)
        m.d.comb += [self.response.valid.eq(inner.response.valid),
                     self.response.payload.eq(inner.response.payload),
                     inner.response.ready.eq(self.response.ready | stalled)]
        return m


def _name(status):
    try:
        return Status(status).name
    except ValueError:
        return f"{status:#04x}"


async def _start(dut, name):
    spec = load_spec(os.environ["NQE_HOST_SPEC"])
    bench = HostBench(dut, spec, name)
    start_clock(dut.clk)
    dut.command__valid.value = 0
    dut.response__ready.value = 0
    await reset(dut.clk, dut.rst)
    bench.start()
    return bench


def _log(dut, bench, name, started, cycles_before):
    wall = time.perf_counter() - started
    cycles = cocotb.utils.get_sim_time("ns") / CLOCK_PERIOD_NS - cycles_before
    dut._log.info(f"{replay_hint()} {name}: {bench.commands} commands "
                  f"({dict(bench.statuses)}), {bench.bytes} bytes, {cycles:.0f} cycles in "
                  f"{wall:.2f} s ({cycles / wall:,.0f} cycles/s)")


@cocotb.test()
async def valid_sessions_match_reference(dut):
    """Loads in random order, then per image LOAD_IMAGE, RUN, READ_RESULT, READ_COUNTERS, with
    READ_STATUS between; a second network loaded over the first; RUN without a new image."""
    name = "valid sessions"
    bench = await _start(dut, name)
    started, cycles = time.perf_counter(), cocotb.utils.get_sim_time("ns") / CLOCK_PERIOD_NS
    host = bench.host
    await bench.send(host.read_status(), "READ_STATUS after reset")
    for part, images in (("network A", 2), ("network B", 1)):
        await bench.load_network(bench.random_network(), part)
        await bench.send(host.read_status(), f"{part}: READ_STATUS after the loads")
        for index in range(images):
            await bench.infer(bench.random_image(), f"{part}, image {index}")
        await bench.send(host.read_result(), f"{part}: READ_RESULT again")
    await bench.send(host.run(), "RUN without a new image")                     # NOT_LOADED
    await bench.send(host.read_result(), "READ_RESULT after the refused RUN")   # unchanged
    await bench.send(host.read_status(), "READ_STATUS: NOT_LOADED")
    await bench.send(host.read_status(), "READ_STATUS: cleared")
    await bench.finish(name)
    _log(dut, bench, name, started, cycles)


def _malformed(bench, rng):
    """One malformed command: ``(frame, what)``."""
    host = bench.host
    known = set(bench.model.lengths)
    payload = lambda count: bytes(rng.choice([rng.getrandbits(8), rng.choice(sorted(known))])
                                  for _ in range(count))           # noqa: E731
    if rng.random() < 0.35:
        opcode = rng.choice([0x00, 0x0A, 0x7E, 0xFF, rng.randint(0x0A, 0xFF)])
        frame = host.frame(opcode, payload(rng.choice([0, 1, 3, rng.randint(0, 12)])))
        return frame, f"unknown opcode {opcode:#04x}, {len(frame) - 4} payload bytes"
    opcode = rng.choice(sorted(known))
    exact = bench.model.lengths[opcode]
    wrong = [exact + 1, exact + rng.randint(2, 9)] + ([0, exact - 1, rng.randint(1, exact - 1)]
                                                      if exact > 1 else [])
    length = rng.choice(wrong)
    return (host.frame(opcode, payload(length)),
            f"{Opcode(opcode).name} with {length} payload bytes (exact: {exact})")


@cocotb.test()
async def malformed_traffic_sets_status_and_never_hangs(dut):
    """Unknown opcodes, wrong lengths for every opcode, RUN before the loads, mixed at random with
    valid loads, RUNs and reads: every command answered with the documented status, the stream
    never loses its framing, a bad-length load changes no memory."""
    name = "malformed traffic"
    bench = await _start(dut, name)
    started, cycles = time.perf_counter(), cocotb.utils.get_sim_time("ns") / CLOCK_PERIOD_NS
    rng, host = bench.rng, bench.host
    net, image = bench.random_network(), bench.random_image()
    loads = {**load_frames(host, net), Opcode.LOAD_IMAGE.value: host.load_image(image)}
    sources = {op: (image if op == Opcode.LOAD_IMAGE.value else net) for op in loads}
    await bench.send(host.run(), "RUN before anything is loaded")
    await bench.send(host.read_status(), "READ_STATUS after it")
    for step in range(60):
        pick = rng.random()
        if pick < 0.55:
            frame, what = _malformed(bench, rng)
            await bench.send(frame, f"command {step}: {what}")
        elif pick < 0.75:
            opcode = rng.choice([op for op in loads if op in bench.model.needed])
            await bench.send(loads[opcode], f"command {step}: {Opcode(opcode).name}",
                             source=sources[opcode])
        elif pick < 0.85:
            await bench.send(host.run(), f"command {step}: RUN")      # OK once all is loaded
        else:
            frame, what = rng.choice([(host.read_status(), "READ_STATUS"),
                                      (host.read_result(), "READ_RESULT"),
                                      (host.read_counters(), "READ_COUNTERS")])
            await bench.send(frame, f"command {step}: {what}")
    # Whatever is missing, then a run: the bad-length loads above must have changed nothing.
    for opcode in sorted(bench.model.needed - bench.model.loaded):
        await bench.send(loads[opcode], f"final {Opcode(opcode).name}", source=sources[opcode])
    await bench.send(host.run(), "final RUN")
    await bench.send(host.read_result(), "final READ_RESULT")
    await bench.send(host.read_counters(), "final READ_COUNTERS")
    await bench.send(host.read_status(), "final READ_STATUS")
    await bench.finish(name)
    _log(dut, bench, name, started, cycles)


@cocotb.test()
@cocotb.parametrize(target=["weights", "image"])
async def reset_mid_payload_recovers(dut, target):
    """A session, then a load of another network's weights (or another image) cut by a reset
    while its payload streams in: no reply, nothing loaded any more, sticky error clear; a full
    new session after it is exact."""
    name = f"reset in a {target} payload"
    bench = await _start(dut, name)
    rng, host = bench.rng, bench.host
    resets = ResetMonitor(dut.clk, dut.rst)
    resets.start()
    timer = RunTimer()
    net = bench.random_network()
    await bench.load_network(net, "before the reset")
    await bench.infer(bench.random_image(), "before the reset")

    other = bench.random_network()
    frame = (load_frames(host, other)[Opcode.LOAD_WEIGHTS.value] if target == "weights"
             else host.load_image(bench.random_image()))
    cut = 4 + rng.randint(1, len(frame) - 6)           # header and some payload bytes
    await within_cycles(bench.driver.send_all(frame[:cut]), bench._bound(frame), "cut frame")
    rest = cocotb.start_soon(bench.driver.send_all(frame[cut:]))
    await wait_cycles(dut.clk, rng.randint(0, 3))       # bytes still streaming in
    dut.rst.value = 1
    await wait_cycles(dut.clk, rng.randint(1, 4))
    rest.cancel()
    dut.command__valid.value = 0
    dut.rst.value = 0
    bench.model.reset()
    bench.sources.clear()
    bench.result = None
    await RisingEdge(dut.clk)
    assert bench.replies.values.empty(), (
        f"{replay_hint()} {name}: {bench.replies.values.qsize()} response bytes for the cut "
        f"command")

    await bench.send(host.read_status(), "after the reset: READ_STATUS (cleared)")
    await bench.send(host.run(), "after the reset: RUN (nothing loaded any more)")
    await bench.send(host.read_status(), "after the reset: READ_STATUS (NOT_LOADED)")
    await bench.load_network(other, "after the reset")
    await bench.infer(bench.random_image(), "after the reset")
    await bench.send(host.read_status(), "after the reset: final READ_STATUS")
    await bench.finish(name)
    window, wall, cycles = timer.finish((bench.sink, bench.replies), resets, name)
    dut._log.info(f"{replay_hint()} {name}: {bench.commands} commands, reset at cycle "
                  f"{window.first} ({window.end - window.first} cycles) after {cut} of "
                  f"{len(frame)} bytes were offered, {cycles:.0f} cycles in {wall:.2f} s")
