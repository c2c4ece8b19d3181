"""Smoke bench for the co-simulation chain: Amaranth -> Verilog -> Verilator -> cocotb.

The design under test, :class:`PacketSum`, is deliberately tiny; what this bench proves is the
chain and the harness later benches reuse (:mod:`nqe.cosim.build`, :mod:`nqe.cosim.streams`):
a driver and a sink with random valid/ready stalls, monitors that only observe, a plain Python
model and a checker comparing the two, transaction by transaction.

Run from pytest (``tests/test_cosim_smoke.py``), which builds the simulator and names this module
as the cocotb test module. Parameters arrive as environment variables: ``SMOKE_PACKETS``.
"""

import os
import random
import time

import cocotb
from amaranth import Module, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out
from cocotb.triggers import Event, with_timeout

from .build import CLOCK_PERIOD_NS, start_clock
from .streams import (StreamDriver, StreamMonitor, StreamPorts, StreamSink, random_stalls,
                      reset, wait_cycles)

__all__ = ["PacketSum", "PacketSumChecker", "packet_sums", "random_packets"]


class PacketSum(wiring.Component):
    """Sums each packet of input values; a packet ends with the value whose ``last`` is set.

    Latency: a sum is offered one cycle after its packet's last value is accepted. Throughput:
    one value a cycle while the sum output is not stalled (``values.ready`` follows
    ``sums.ready`` while a sum waits).

    Members
    -------
    values: ``In(stream.Signature(StructLayout({"value": value_width, "last": 1})))``
    sums: ``Out(stream.Signature(sum_width))``, the packet sum modulo ``2**sum_width``.
    """

    def __init__(self, value_width=8, sum_width=16):
        assert value_width >= 1 and sum_width >= value_width, (value_width, sum_width)
        self.value_width = value_width
        self.sum_width = sum_width
        self.value_layout = data.StructLayout({"value": value_width, "last": 1})
        super().__init__({
            "values": In(stream.Signature(self.value_layout)),
            "sums": Out(stream.Signature(sum_width)),
        })

    def elaborate(self, platform):
        m = Module()
        partial = Signal(self.sum_width)

        # Take a value unless a finished sum still waits for its reader.
        m.d.comb += self.values.ready.eq(~self.sums.valid | self.sums.ready)
        with m.If(self.sums.valid & self.sums.ready):
            m.d.sync += self.sums.valid.eq(0)
        with m.If(self.values.valid & self.values.ready):
            total = partial + self.values.payload.value
            with m.If(self.values.payload.last):
                m.d.sync += [self.sums.payload.eq(total), self.sums.valid.eq(1), partial.eq(0)]
            with m.Else():
                m.d.sync += partial.eq(total)
        return m


def packet_sums(values, sum_width=16):
    """The model: the sum modulo ``2**sum_width`` of each packet in ``values``, a list of
    ``(value, last)``; an unfinished packet at the end yields nothing."""
    sums, partial = [], 0
    for value, last in values:
        partial += value
        if last:
            sums.append(partial % 2**sum_width)
            partial = 0
    return sums


def random_packets(count, value_width, longest=6, rng=random):
    """``count`` packets of 1 to ``longest`` random values, as one list of ``(value, last)``."""
    values = []
    for _ in range(count):
        length = rng.randint(1, longest)
        values += [(rng.getrandbits(value_width), index == length - 1) for index in range(length)]
    return values


class PacketSumChecker:
    """Monitors both streams of a :class:`PacketSum`, runs the model on the values that went
    in and compares its sums with the ones that came out, in order."""

    def __init__(self, dut, design):
        self.design = design
        self.values_in = StreamMonitor(dut.clk, StreamPorts.of(dut, "values"))
        self.sums_out = StreamMonitor(dut.clk, StreamPorts.of(dut, "sums"))
        self.checked = 0
        self._pending_values = []
        self._expected = []
        self._task = None
        self._progress = Event()

    async def wait_checked(self, count):
        """Return once ``count`` sums have been checked."""
        while self.checked < count:
            self._progress.clear()
            await self._progress.wait()

    def start(self):
        self.values_in.start()
        self.sums_out.start()
        self._task = cocotb.start_soon(self._check())

    def stop(self):
        self.values_in.stop()
        self.sums_out.stop()
        self._task.cancel()

    def _decode_value(self, bits):
        fields = self.design.value_layout.from_bits(bits)
        return int(fields.value), bool(fields.last)

    async def _check(self):
        while True:
            actual = await self.sums_out.values.get()
            # Every value that went in before this sum came out is in the input queue by now:
            # the sum leaves at least one cycle after its packet's last value.
            while not self._expected:
                self._pending_values.append(self._decode_value(await self.values_in.values.get()))
                self._expected += packet_sums(self._pending_values, self.design.sum_width)
                if self._expected:
                    self._pending_values.clear()
            expected = self._expected.pop(0)
            assert actual == expected, (f"sum #{self.checked}: design gave {actual}, "
                                        f"model {expected}")
            self.checked += 1
            self._progress.set()


@cocotb.test()
async def packet_sums_match_model_under_random_stalls(dut):
    """Random packets in, random back-pressure out: every sum equals the model's."""
    design = PacketSum(value_width=len(dut.values__payload) - 1, sum_width=len(dut.sums__payload))
    packet_count = int(os.environ.get("SMOKE_PACKETS", "2000"))

    start_clock(dut.clk)
    dut.values__valid.value = 0
    dut.sums__ready.value = 0
    await reset(dut.clk, dut.rst)

    checker = PacketSumChecker(dut, design)
    checker.start()
    sink = StreamSink(dut.clk, StreamPorts.of(dut, "sums"), stall=random_stalls(0.3, 4))
    sink.start()
    driver = StreamDriver(dut.clk, StreamPorts.of(dut, "values"), stall=random_stalls(0.3, 4))

    values = random_packets(packet_count, design.value_width)
    expected_sums = len(packet_sums(values, design.sum_width))
    payloads = [int(design.value_layout.const({"value": value, "last": last}).as_bits())
                for value, last in values]

    async def drive_and_check():
        await driver.send_all(payloads)
        await checker.wait_checked(expected_sums)

    started = time.perf_counter()
    start_ns = cocotb.utils.get_sim_time("ns")
    # Generous: at most 20 cycles a value even with both sides stalling; a hang fails, not waits.
    await with_timeout(drive_and_check(), 20 * len(values) * CLOCK_PERIOD_NS, "ns")
    wall = time.perf_counter() - started
    cycles = (cocotb.utils.get_sim_time("ns") - start_ns) / CLOCK_PERIOD_NS
    dut._log.info(f"{len(values)} values, {expected_sums} sums checked in {cycles:.0f} cycles, "
                  f"{wall:.2f} s ({cycles / wall:,.0f} cycles/s)")
    await wait_cycles(dut.clk, 10)  # room for a spurious extra sum to show up
    assert checker.values_in.count == len(values), "the input monitor missed values"
    assert checker.sums_out.count == expected_sums, "the design gave more sums than packets"
    checker.stop()
    sink.stop()


@cocotb.test()
async def idle_cycles_run_without_python(dut):
    """The clock runs in the simulator: 200,000 idle cycles wake Python twice (the speed rule of
    docs/DESIGN.md); the log line gives this machine's cycles/s for a clock-only run."""
    cycles = 200_000
    start_clock(dut.clk)
    await reset(dut.clk, dut.rst)
    started = time.perf_counter()
    await wait_cycles(dut.clk, cycles)
    wall = time.perf_counter() - started
    dut._log.info(f"{cycles} idle cycles in {wall:.2f} s ({cycles / wall:,.0f} cycles/s)")
