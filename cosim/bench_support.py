"""What the block benches share (``bench_mac_array``, ``bench_post_acc``, ``bench_sram``): the
replayable seed, a driver and a monitor for always-ready inputs whose transaction spans several
ports, a reset monitor, and the checker rule for a reset in the middle of a run.

Seeds: the pytest wrappers draw one seed per run (or take ``NQE_COSIM_SEED``), print it and hand
it to the simulator both as ``NQE_COSIM_SEED`` and as ``COCOTB_RANDOM_SEED``; every random draw of a
bench comes from :func:`bench_random`, a generator derived from that seed and the test's name, so
``NQE_COSIM_SEED=<n> pytest tests/test_cosim_<block>.py`` replays a failure exactly. Every
failure message starts with :func:`replay_hint`.

Reset: a bench asserts ``rst`` once in the middle of a run, while the block is busy.
:class:`ResetMonitor` records which clock edges sampled it, and :func:`split_at_reset` cuts
what the monitors saw into before / during / after. The checker's rule
(:func:`check_across_reset`): outputs seen before the reset are a prefix of what the model makes of
the inputs before it (the values in flight may be lost), and outputs after the reset are exactly
what the model makes of the inputs after it.
"""

import dataclasses
import os
import random

import cocotb
from cocotb.triggers import FallingEdge, RisingEdge, SimTimeoutError, with_timeout

from .build import CLOCK_PERIOD_NS
from .streams import BackgroundTask, wait_cycles

__all__ = ["ALWAYS_READY", "SEED_VARIABLE", "FieldsDriver", "PortGroup", "ResetMonitor",
           "ResetWindow", "RunTimer", "Transfer", "TransferMonitor", "bench_random", "bench_seed",
           "check_across_reset", "cycle_now", "drive_through_mid_reset", "replay_hint",
           "split_at_reset", "within_cycles"]

from nqe.cosim.build import SEED_VARIABLE  # noqa: E402  (one name for benches and wrappers)


def bench_seed():
    """The run's seed: ``NQE_COSIM_SEED`` as the pytest wrapper passed it, else cocotb's."""
    text = os.environ.get(SEED_VARIABLE)
    return int(text) if text else cocotb.RANDOM_SEED


def replay_hint(seed=None):
    """The prefix of every failure message: how to replay this run."""
    return f"[{SEED_VARIABLE}={bench_seed() if seed is None else seed}]"


def bench_random(test_name):
    """A :class:`random.Random` seeded from the run's seed and ``test_name``: each test draws
    its own sequence, the same one whichever other tests run (cocotb's ``testcase`` filter)."""
    return random.Random(f"{bench_seed()}/{test_name}")


def cycle_now():
    """The index of the rising edge Python was just resumed by (the clock starts at 0 ns)."""
    return round(cocotb.utils.get_sim_time("ns") / CLOCK_PERIOD_NS)


async def within_cycles(coroutine, cycles, what):
    """Run ``coroutine``; a block that hangs fails the test after ``cycles`` clock cycles, with
    the seed in the message, instead of stalling the run."""
    try:
        return await with_timeout(coroutine, cycles * CLOCK_PERIOD_NS, "ns")
    except SimTimeoutError as error:
        raise AssertionError(f"{replay_hint()} {what}: not done after {cycles} cycles") from error


class _AlwaysReady:
    """Stands in for the ``ready`` port an ``always_ready`` stream does not have."""
    value = 1


#: The ``ready`` of an ``always_ready`` stream, which has no port (see ``build.component_ports``).
ALWAYS_READY = _AlwaysReady()


class PortGroup:
    """Ports written and read together as one transaction: a stream's payload plus the
    configuration inputs the block samples with it (``weight_bits``, ``mode``, ...).

    ``group.value = {"payload": 5, "mode": 1}`` writes those ports; ``group.value`` reads all of
    them as a dict of unsigned ints.
    """

    def __init__(self, **handles):
        self.handles = handles

    @property
    def value(self):
        return {name: int(handle.value) for name, handle in self.handles.items()}

    @value.setter
    def value(self, values):
        for name, value in values.items():
            self.handles[name].value = value


@dataclasses.dataclass(frozen=True)
class Transfer:
    """One transaction seen by a monitor: the rising edge that took it and what it carried."""
    cycle: int
    value: object


class FieldsDriver:
    """Drives an always-ready input: ``valid`` plus a :class:`PortGroup`, one transaction a cycle,
    with the idle cycles the ``stall`` policy asks for before each.

    While idle the group carries ``idle_values()`` (random junk from the bench): a block must
    sample its inputs only with ``valid``, so junk there must change nothing.
    """

    def __init__(self, clk, valid, group, *, stall, idle_values=None):
        self._clk = clk
        self._valid = valid
        self._group = group
        self._stall = stall
        self._idle_values = idle_values
        valid.value = 0

    async def send(self, values):
        """Present ``values`` (a dict for the group) and return just after the edge taking it."""
        idle = self._stall()
        if idle:
            self._valid.value = 0
            if self._idle_values is not None:
                self._group.value = self._idle_values()
            await wait_cycles(self._clk, idle)
        self._group.value = values
        self._valid.value = 1
        await RisingEdge(self._clk)            # always ready: the first edge takes it

    async def send_all(self, transactions):
        for values in transactions:
            await self.send(values)
        self._valid.value = 0

    def present(self, values):
        """Offer ``values`` with ``valid`` high from the next edge on, without waiting (for
        junk during a reset)."""
        self._group.value = values
        self._valid.value = 1


class TransferMonitor(BackgroundTask):
    """Observes a stream, drives nothing: each edge at which ``valid`` and ``ready`` read 1 adds a
    :class:`Transfer` of ``payload.value`` (an int, or a dict for a :class:`PortGroup`) to
    :attr:`transfers`. Sleeps while ``valid`` is low."""

    def __init__(self, clk, valid, payload, ready=ALWAYS_READY, *, signed=False):
        self._clk = clk
        self._valid = valid
        self._ready = ready
        self._payload = payload
        self._signed = signed
        self.transfers = []

    def _read(self):
        if isinstance(self._payload, PortGroup):
            return self._payload.value
        return self._payload.value.to_signed() if self._signed else int(self._payload.value)

    async def _run(self):
        while True:
            if not self._valid.value:
                await RisingEdge(self._valid)
            elif not self._ready.value:
                await RisingEdge(self._ready)
            await RisingEdge(self._clk)
            if self._valid.value and self._ready.value:
                self.transfers.append(Transfer(cycle_now(), self._read()))


@dataclasses.dataclass(frozen=True)
class ResetWindow:
    """The rising edges that sampled ``rst`` high: ``first`` up to, not including, ``end``."""
    first: int
    end: int

    def __contains__(self, cycle):
        return self.first <= cycle < self.end


class ResetMonitor(BackgroundTask):
    """Observes ``rst``: each time it is asserted, the :class:`ResetWindow` of edges that sampled
    it goes into :attr:`windows`. Start it after the initial reset."""

    def __init__(self, clk, rst):
        self._clk = clk
        self._rst = rst
        self.windows = []

    async def _run(self):
        while True:
            await RisingEdge(self._rst)
            await RisingEdge(self._clk)
            first = cycle_now()
            await FallingEdge(self._rst)
            await RisingEdge(self._clk)
            self.windows.append(ResetWindow(first, cycle_now()))


def split_at_reset(transfers, window):
    """``(before, during, after)``: the transfers taken before ``window``, at an edge that sampled
    reset, and after it."""
    before = [t for t in transfers if t.cycle < window.first]
    during = [t for t in transfers if t.cycle in window]
    after = [t for t in transfers if t.cycle >= window.end]
    return before, during, after


def check_across_reset(compare, expected_before, actual_before, expected_after, actual_after,
                       *, what):
    """The checker's rule for a mid-run reset. ``compare(expected, actual, label)`` asserts one
    output; ``expected_*`` and ``actual_*`` are lists in stream order.

    Before the reset the block gave a prefix of the model's outputs (values in flight when the reset
    came may be lost, none may be invented); after it, exactly the model's outputs."""
    hint = replay_hint()
    assert len(actual_before) <= len(expected_before), (
        f"{hint} {what}: {len(actual_before)} outputs before the reset, but the inputs before it "
        f"make only {len(expected_before)}")
    for index, (expected, actual) in enumerate(zip(expected_before, actual_before)):
        compare(expected, actual, f"{what}, output #{index} before the reset")
    assert len(actual_after) == len(expected_after), (
        f"{hint} {what}: {len(actual_after)} outputs after the reset, the model makes "
        f"{len(expected_after)} of the inputs after it")
    for index, (expected, actual) in enumerate(zip(expected_after, actual_after)):
        compare(expected, actual, f"{what}, output #{index} after the reset")


async def drive_through_mid_reset(clk, rst, driver, *, before, after, junk, reset_cycles,
                                  drain_cycles):
    """Send the ``before`` transactions, then assert ``rst`` for ``reset_cycles`` edges right
    after the last of them (the block is busy: values in flight, a dot product half done), then
    send ``after`` and wait ``drain_cycles``, room for late or spurious outputs.

    Junk stays valid through the reset (``junk()`` gives a dict for the driver's group each
    cycle): the block must drop it, not count it. A :class:`ResetMonitor` records the window.
    """
    await driver.send_all(before)
    rst.value = 1
    for _ in range(reset_cycles):
        driver.present(junk())
        await wait_cycles(clk, 1)
    rst.value = 0
    await driver.send_all(after)
    await wait_cycles(clk, drain_cycles)


class RunTimer:
    """Wall time and simulated cycles since it was made: the figures of a bench's cycles/s line."""

    def __init__(self):
        import time
        self._time = time
        self._started = time.perf_counter()
        self._start_ns = cocotb.utils.get_sim_time("ns")

    def finish(self, monitors, resets, name):
        """Stop ``monitors`` and ``resets``; returns ``(window, wall seconds, cycles)`` where
        ``window`` is the run's one reset window (a run without exactly one reset fails)."""
        from .build import CLOCK_PERIOD_NS

        wall = self._time.perf_counter() - self._started
        cycles = (cocotb.utils.get_sim_time("ns") - self._start_ns) / CLOCK_PERIOD_NS
        for monitor in (*monitors, resets):
            monitor.stop()
        assert len(resets.windows) == 1, f"{replay_hint()} {name}: reset windows {resets.windows}"
        return resets.windows[0], wall, cycles
