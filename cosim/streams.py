"""cocotb drivers and a monitor for ``amaranth.lib.stream`` valid/ready interfaces.

Amaranth flattens a stream member ``name`` of a component into the Verilog ports
``name__valid``, ``name__ready`` and ``name__payload`` (a structured payload is one flat vector,
packed as its :class:`amaranth.lib.data.Layout` says); :class:`StreamPorts` looks them up.

Timing rules these classes rely on (cocotb 2.1 + Verilator, checked by the smoke bench): Python
resumed by ``RisingEdge(clk)`` runs *before* the design evaluates that edge, so the values it
reads are the ones the flip-flops sample at that edge; its writes take effect after the edge
(inertial writes), for the next one. A transfer therefore is "valid and ready read as 1 right
after a rising edge".

Speed: Python wakes on transfers and on the rising edges of valid or ready, never once per idle
cycle; a stall of n cycles costs two wake-ups, not n (:func:`wait_cycles`). The clock itself runs
in the simulator (:func:`nqe.cosim.build.start_clock`).
"""

import dataclasses
import random

import cocotb
from cocotb.queue import Queue
from cocotb.triggers import RisingEdge, Timer

from .build import CLOCK_PERIOD_NS

__all__ = ["BackgroundTask", "StreamPorts", "StreamDriver", "StreamSink", "StreamMonitor",
           "random_stalls",
           "reset", "wait_cycles", "wait_transfer"]


class BackgroundTask:
    """A coroutine ``_run`` that a bench component runs in the background between :meth:`start`
    and :meth:`stop` (sinks and monitors)."""

    _task = None

    def start(self):
        if self._task is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        self._task = cocotb.start_soon(self._run())

    def stop(self):
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self):
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class StreamPorts:
    """The simulator handles of one stream: ``valid``, ``ready``, ``payload``."""
    valid: object
    ready: object
    payload: object

    @classmethod
    def of(cls, dut, name):
        """The ports of stream member ``name`` of the Amaranth component simulated as ``dut``."""
        try:
            return cls(*(getattr(dut, f"{name}__{port}") for port in ("valid", "ready", "payload")))
        except AttributeError as error:
            raise AttributeError(f"{dut._name} has no stream {name!r} "
                                 f"(expected ports {name}__valid, {name}__ready, "
                                 f"{name}__payload)") from error


def random_stalls(probability, longest, rng=random):
    """A stall policy: before each transfer, with ``probability``, 1 to ``longest`` idle cycles,
    else none. ``rng`` defaults to :mod:`random`, which cocotb seeds (``COCOTB_RANDOM_SEED``)."""
    if not 0 <= probability <= 1:
        raise ValueError(f"stall probability must be in [0, 1], not {probability}")

    def stall():
        return rng.randint(1, longest) if rng.random() < probability else 0
    return stall


def _no_stalls():
    return 0


async def wait_cycles(clk, cycles, period_ns=CLOCK_PERIOD_NS):
    """From just after a rising edge of ``clk``, return just after the ``cycles``-th next one.

    Sleeps with a timer to the falling edge before it, so Python wakes twice, not ``cycles``
    times (cocotb's ``ClockCycles`` awaits every edge in Python)."""
    if cycles <= 0:
        return
    await Timer(cycles * period_ns - period_ns / 2, unit="ns")
    await RisingEdge(clk)


async def wait_transfer(clk, ports):
    """Return just after the next rising edge of ``clk`` at which ``ports`` transfers.

    Call it just after a rising edge (or at time 0); the transfer of that edge, if any, does not
    count. While valid or ready is low it sleeps until that signal rises instead of polling."""
    while True:
        if not ports.valid.value:
            await RisingEdge(ports.valid)
        elif not ports.ready.value:
            await RisingEdge(ports.ready)
        await RisingEdge(clk)
        if ports.valid.value and ports.ready.value:
            return


async def reset(clk, rst, cycles=2):
    """Hold synchronous reset ``rst`` for ``cycles`` rising edges; returns just after the last."""
    rst.value = 1
    for _ in range(cycles):
        await RisingEdge(clk)
    rst.value = 0


class StreamDriver:
    """Drives the source side of a stream (``valid``, ``payload``): one payload per
    :meth:`send`, after the idle cycles the ``stall`` policy asks for.

    Use it from one task, starting just after a rising edge (e.g. after :func:`reset`).
    """

    def __init__(self, clk, ports, *, stall=_no_stalls, period_ns=CLOCK_PERIOD_NS):
        self._clk = clk
        self._ports = ports
        self._stall = stall
        self._period_ns = period_ns
        ports.valid.value = 0

    async def send(self, payload):
        """Offer ``payload`` (an int, the packed bits) and return just after it transferred."""
        idle = self._stall()
        if idle:
            self._ports.valid.value = 0
            await wait_cycles(self._clk, idle, self._period_ns)
        self._ports.payload.value = payload
        self._ports.valid.value = 1
        await wait_transfer(self._clk, self._ports)
        # Dropped now, written over by the next send() in the same time step if it follows at
        # once: the design never sees a stale payload offered twice.
        self._ports.valid.value = 0

    async def send_all(self, payloads):
        for payload in payloads:
            await self.send(payload)


class StreamSink(BackgroundTask):
    """Drives the sink side of a stream (``ready``): ready until a transfer, then low for the
    idle cycles the ``stall`` policy asks for. Runs as a background task: :meth:`start`."""

    def __init__(self, clk, ports, *, stall=_no_stalls, period_ns=CLOCK_PERIOD_NS):
        self._clk = clk
        self._ports = ports
        self._stall = stall
        self._period_ns = period_ns
        ports.ready.value = 0

    async def _run(self):
        while True:
            self._ports.ready.value = 1
            await wait_transfer(self._clk, self._ports)
            idle = self._stall()
            if idle:
                self._ports.ready.value = 0
                await wait_cycles(self._clk, idle, self._period_ns)


class StreamMonitor(BackgroundTask):
    """Observes a stream and drives nothing: every transferred payload (an int) goes into
    :attr:`values`, a :class:`cocotb.queue.Queue`, in order. :meth:`start` it after reset."""

    def __init__(self, clk, ports):
        self._clk = clk
        self._ports = ports
        self.values = Queue()
        self.count = 0

    async def _run(self):
        while True:
            await wait_transfer(self._clk, self._ports)
            self.count += 1
            self.values.put_nowait(int(self._ports.payload.value))
