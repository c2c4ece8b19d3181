# amaranth: UnusedElaboratable=no
# (designs are made here to read their layouts and lengths; the build elaborates its own)
"""cocotb bench of the layer scheduler (:class:`nqe.rtl.scheduler.Scheduler`) on Verilator.

One build runs the layers of every spec ``random_spec(seed)`` with ``seed`` in
:data:`SPEC_SEEDS`: :func:`scheduler` sizes the scheduler for the widest of their memory maps
(:class:`WidestMemoryMap`), so the descriptor and the op fields are wide enough for all of them.

Stimulus: whole layers of random specs (spec seeds drawn from the run's seed), one test per layer
kind (stem 1x1 and 3x3 with 8-bit inputs, pointwise and bottleneck, group-wise with stride 1
and 2, global pooling, classifier) and one with every kind mixed. Each layer is started
with its descriptor row (``memory_map.descriptors``) on ``desc`` and a ``start`` pulse; between
layers ``desc`` carries random junk for random idle cycles (the scheduler may sample it only
with ``start``). The only stream, ``ops``, has random ``ready`` stalls whose profile changes
layer by layer (none, short, long, nearly always stalled; each in every test); the scheduler
drives ``valid``, so the bench's side of the stall is ``ready`` and the gap before ``start``.
The stalls do not look at the ops: one may fall on any op, ``first`` and ``last`` ones included
(the engine holds ``ready`` low on a ``last`` op while the previous tile drains), and a test with
stalls requires that some ``first``, inner and ``last`` ops were stalled (:func:`stall_coverage`,
each role with at least :data:`STALL_COVERAGE_OPS` ops under a stalling profile).

Model: :func:`~nqe.rtl.scheduler.reference_ops`, the plain-Python loop nest of
``tests/test_scheduler.py``. Checker: every accepted op equals the loop nest's op of the same
index, every field (:data:`OP_FIELDS`: ``act_addr``, ``act_slot``, ``zero``, ``weight_addr``,
``first``, ``last``, ``lanes``); the first op is offered the cycle after ``start``; ``done``
falls with ``start``, rises the cycle after the last op is accepted and holds until the next
``start``; no op is offered while idle. The mixed test has no stalls and checks one op a cycle.

Every test resets the scheduler once, in the middle of a layer (random op, 1-4 cycles, ``ready``
still stalling), then starts that layer again: the ops before the reset are a prefix of the
layer's, the scheduler is idle right after it (``done`` high, ``valid`` low), and every layer
after it is exact again (``bench_support.check_across_reset``).

Bench self-check: :class:`BrokenScheduler` wraps the scheduler with a deliberate fault (an op
lost after a long stall; a scheduler that ignores reset); the pytest wrapper builds them and
requires this bench to fail on them.

Run from ``tests/test_cosim_scheduler.py``. Parameters (environment): ``NQE_COSIM_SEED``,
``NQE_SCHEDULER_OPS`` (ops per test, default 30000).
"""

import functools
import os

import cocotb
from amaranth import ClockDomain, ClockSignal, DomainRenamer, Module, Mux, Shape, Signal
from amaranth.lib import wiring
from cocotb.triggers import RisingEdge

from nqe.model.memory_map import DESCRIPTOR_FIELDS, build_memory_map
from nqe.model.random_spec import random_spec
from nqe.model.spec import LayerKind
from nqe.rtl.scheduler import Scheduler, descriptor_layout, reference_ops

from .build import start_clock
from .bench_support import (RunTimer, ResetMonitor, TransferMonitor, bench_random,
                            check_across_reset, cycle_now, replay_hint, split_at_reset,
                            within_cycles)
from .streams import StreamPorts, StreamSink, reset, wait_cycles

__all__ = ["KINDS", "MUTANTS", "OP_FIELDS", "SPEC_SEEDS", "BrokenScheduler", "FieldCodec",
           "LayerRun", "WidestMemoryMap", "check_layer_runs", "decode_op", "draw_layers",
           "op_role", "scheduler", "stall_coverage"]

#: The random specs the build is sized for; a test draws its specs among them.
SPEC_SEEDS = range(256)
#: The fields of an op (``Scheduler.op_layout``), all checked on every op.
OP_FIELDS = ("act_addr", "act_slot", "zero", "weight_addr", "first", "last", "lanes")
#: Layer kinds, one test each: which layers, and the variants each test must contain.
KINDS = {
    "stem": ({LayerKind.STEM}, (lambda layer: layer.kernel == 1, lambda layer: layer.kernel == 3)),
    "pointwise": ({LayerKind.POINTWISE, LayerKind.BOTTLENECK},
                  (lambda layer: layer.kind is LayerKind.POINTWISE,
                   lambda layer: layer.kind is LayerKind.BOTTLENECK)),
    "groupwise": ({LayerKind.GROUPWISE}, (lambda layer: layer.stride == 1,
                                          lambda layer: layer.stride == 2)),
    "pool": ({LayerKind.POOL}, ()),
    "classifier": ({LayerKind.CLASSIFIER}, ()),
}
#: ``ready`` stall profiles (probability, longest stall), one per layer, each in every test.
STALL_PROFILES = ((0.0, 1), (0.25, 3), (0.5, 8), (0.9, 2))
#: Longest layer a test draws, in ops (a 3x3 stem of a 16x16 spec has up to 13,824, a
#: group-wise layer up to 27,648; a few of those are left out).
MOST_OPS = 12_000


class WidestMemoryMap:
    """What :class:`Scheduler` reads of a memory map (descriptor widths, descriptor rows, bank
    words, activation word bits), the widest over several specs: one scheduler for all of them."""

    def __init__(self, specs):
        maps = [build_memory_map(spec) for spec in specs]
        self.descriptor_widths = {name: max(mm.descriptor_widths[name] for mm in maps)
                                  for name in DESCRIPTOR_FIELDS}
        self.bank_words = (max(max(mm.bank_words) for mm in maps),)
        self.act_word_bits = max(mm.act_word_bits for mm in maps)
        self.rows = [row for mm, spec in zip(maps, specs) for row in mm.descriptors(spec)]

    def descriptors(self, spec):
        return self.rows


class _RowCount:
    """Stands in for the spec :class:`Scheduler` checks its row count against."""

    def __init__(self, count):
        self._count = count

    def layers(self):
        return [None] * self._count


@functools.cache
def _widest_map():
    return WidestMemoryMap([random_spec(seed) for seed in SPEC_SEEDS])


def scheduler():
    """The design under test: one scheduler sized for every spec of :data:`SPEC_SEEDS`."""
    widest = _widest_map()
    return Scheduler(widest, _RowCount(len(widest.rows)))


class FieldCodec:
    """Packs and unpacks a :class:`~amaranth.lib.data.StructLayout` as plain ints (fast: no
    Amaranth values per op)."""

    def __init__(self, layout):
        self.size = layout.size
        self._fields = [(name, field.offset, field.width, Shape.cast(field.shape).signed)
                        for name, field in layout]

    def pack(self, values):
        """``values``: a dict of ints or enum members; fields left out are 0."""
        bits = 0
        for name, offset, width, signed in self._fields:
            value = values.get(name, 0)
            value = int(getattr(value, "value", value))
            low = -(1 << (width - 1)) if signed else 0
            if not low <= value < low + (1 << width):
                raise ValueError(f"{name}={value} does not fit {width} bits")
            bits |= (value & ((1 << width) - 1)) << offset
        return bits

    def unpack(self, bits, names=None):
        values = {}
        for name, offset, width, signed in self._fields:
            if names is None or name in names:
                value = (bits >> offset) & ((1 << width) - 1)
                values[name] = value - (1 << width) if signed and value >> (width - 1) else value
        return values


def decode_op(codec, bits):
    """An emitted op as the loop nest writes it: a dict of the :data:`OP_FIELDS`."""
    return codec.unpack(bits, OP_FIELDS)


def _strip(op):
    return {name: op[name] for name in OP_FIELDS}


class LayerRun:
    """One layer as a test runs it: its descriptor row, the loop nest's ops, and (filled in by
    the run) the edge that sampled ``start`` and the edge after which ``done`` read high
    (``None`` for the run the reset cuts)."""

    def __init__(self, where, row, ops=None):
        self.where = where
        self.row = row
        self.ops = [_strip(op) for op in reference_ops(row)] if ops is None else ops
        self.start = self.done = None
        self.profile = (0.0, 1)

    @classmethod
    def of(cls, seed, layer, row):
        return cls(f"spec random-{seed} layer {layer.name} ({layer.kind.value}, stride "
                   f"{layer.stride}, kernel {layer.kernel}, groups {layer.groups})", row)

    def again(self):
        """The same layer, run again after the reset."""
        return LayerRun(f"{self.where} (rerun after the reset)", self.row, self.ops)


def op_role(op):
    """Where an op sits in its tile's dot products: ``"last"`` (closes them; the engine holds
    ``ready`` low on these while the previous tile drains), ``"first"`` or ``"inner"``."""
    return "last" if op["last"] else "first" if op["first"] else "inner"


#: Ops of one role offered under stalling profiles above which the test requires that at least
#: one of them was stalled (at the mildest profile, 25 %, none in 50 is a 6e-7 chance).
STALL_COVERAGE_OPS = 50


def stall_coverage(runs, transfers):
    """``{role: [ops offered under a stalling profile, ops of them offered for more than one
    cycle]}`` over the finished runs (:func:`op_role`): while a layer runs ``valid`` stays high,
    so op ``i`` is offered from the cycle after op ``i - 1`` was taken (op 0: after ``start``)."""
    coverage = {role: [0, 0] for role in ("first", "inner", "last")}
    for run in runs:
        if run.done is None or run.profile[0] == 0:
            continue
        mine = [t for t in transfers if run.start < t.cycle <= run.done]
        offered = run.start + 1
        for op, transfer in zip(run.ops, mine):
            counts = coverage[op_role(op)]
            counts[0] += 1
            counts[1] += transfer.cycle > offered
            offered = transfer.cycle + 1
    return coverage


@functools.cache
def _spec_layers(seed):
    spec = random_spec(seed)
    return list(zip(spec.layers(), build_memory_map(spec).descriptors(spec)))


@functools.cache
def _op_count(seed, index):
    return len(reference_ops(_spec_layers(seed)[index][1]))


def draw_layers(rng, kinds, required, budget):
    """Whole layers of ``kinds`` from random specs of :data:`SPEC_SEEDS`, about ``budget`` ops in
    all, at least one for each predicate of ``required`` (e.g. a stride-2 group-wise layer)."""
    runs, total, wanted = [], 0, list(required)
    for _ in range(2000):
        if total >= budget and not wanted:
            break
        seed = rng.choice(SPEC_SEEDS)
        candidates = [(layer, row) for index, (layer, row) in enumerate(_spec_layers(seed))
                      if layer.kind in kinds and _op_count(seed, index) <= MOST_OPS
                      and (not wanted or any(test(layer) for test in wanted))]
        if not candidates:
            continue
        layer, row = rng.choice(candidates)
        wanted = [test for test in wanted if not test(layer)]
        runs.append(LayerRun.of(seed, layer, row))
        total += len(runs[-1].ops)
    assert not wanted, f"{replay_hint()} no layer of {sorted(k.value for k in kinds)} met " \
                       f"every requirement in {len(SPEC_SEEDS)} specs"
    return runs


def check_layer_runs(runs, transfers, window):
    """The per-layer checks: the ops of each finished run lie between its ``start`` and its
    ``done`` (the last one at the edge after which ``done`` read high), a run cut by the reset
    emits nothing after the reset, and no op is offered outside a run."""
    hint = replay_hint()
    claimed = 0
    for run in runs:
        end = window.end - 1 if run.done is None else run.done
        mine = [t for t in transfers if run.start < t.cycle <= end]
        claimed += len(mine)
        if run.done is None:
            continue
        assert len(mine) == len(run.ops), (
            f"{hint} {run.where}: {len(mine)} ops between start (cycle {run.start}) and done "
            f"(cycle {run.done}), the loop nest has {len(run.ops)}")
        assert mine[-1].cycle == run.done, (
            f"{hint} {run.where}: done rose after cycle {run.done}, the last op was taken at "
            f"cycle {mine[-1].cycle}")
    assert claimed == len(transfers), (
        f"{hint} {len(transfers) - claimed} ops offered and taken outside every layer run "
        f"(while idle, or after the reset before the next start)")


#: Longest reset the bench asserts, in cycles.
MAX_RESET_CYCLES = 4
#: Fewest ops of the layer a reset cuts: at most (waited + 1 + reset cycles + 1) ops are taken by
#: the check right after the reset, so this leaves a reset-ignoring scheduler busy there.
RESET_LAYER_MIN_OPS = MAX_RESET_CYCLES + 8


#: The faults of :class:`BrokenScheduler`.
MUTANTS = ("drops_op_after_long_stall", "ignores_reset")


class BrokenScheduler(wiring.Component):
    """A deliberately broken copy of :func:`scheduler` (same ports), for the bench self-check.

    ``"drops_op_after_long_stall"``: after 3 stalled cycles the inner scheduler's ``ready`` is
    forced high, so an op is lost (only stalls find it). ``"ignores_reset"``: the inner
    scheduler runs in a domain that ``rst`` does not reset."""

    def __init__(self, fault):
        if fault not in MUTANTS:
            raise ValueError(f"fault {fault!r}: one of {MUTANTS}")
        self._fault = fault
        self._inner = scheduler()
        super().__init__(self._inner.signature)

    def elaborate(self, platform):
        m = Module()
        inner = self._inner
        if self._fault == "ignores_reset":
            m.domains.noreset = ClockDomain(local=True, reset_less=True)
            m.d.comb += ClockSignal("noreset").eq(ClockSignal())
            m.submodules.inner = DomainRenamer("noreset")(inner)
        else:
            m.submodules.inner = inner
        m.d.comb += [inner.desc.eq(self.desc), inner.start.eq(self.start),
                     self.done.eq(inner.done), self.ops.valid.eq(inner.ops.valid),
                     self.ops.payload.eq(inner.ops.payload), inner.ops.ready.eq(self.ops.ready)]
        if self._fault == "drops_op_after_long_stall":
            stalled = Signal(2)
            with m.If(self.ops.valid & ~self.ops.ready):
                m.d.sync += stalled.eq(Mux(stalled == 3, 0, stalled + 1))
            with m.Else():
                m.d.sync += stalled.eq(0)
            m.d.comb += inner.ops.ready.eq(self.ops.ready | (stalled == 3))
        return m


def _ops_budget(kind, share=1):
    """Ops for ``kind`` layers (a ``share`` of the test's): classifiers are 4-24 ops, a tenth."""
    return int(os.environ.get("NQE_SCHEDULER_OPS", "30000")) // share // (
        10 if kind == "classifier" else 1)


async def _run_layers(dut, name, runs, rng, stalls):
    """Run ``runs`` one after the other, cut the one in the middle with a reset and run it
    again, then check everything the monitors saw."""
    design = scheduler()
    ops_codec = FieldCodec(design.op_layout)
    desc_codec = FieldCodec(descriptor_layout(_widest_map()))
    stall_rng = bench_random(f"{name}/ready")
    profile = [0.0, 1]

    def ready_stall():
        return stall_rng.randint(1, profile[1]) if stall_rng.random() < profile[0] else 0

    start_clock(dut.clk)
    dut.start.value = 0
    dut.desc.value = rng.getrandbits(desc_codec.size)
    ops = StreamPorts.of(dut, "ops")
    await reset(dut.clk, dut.rst)
    sink = StreamSink(dut.clk, ops, stall=ready_stall)
    taken = TransferMonitor(dut.clk, ops.valid, ops.payload, ops.ready)
    resets = ResetMonitor(dut.clk, dut.rst)
    for task in (sink, taken, resets):
        task.start()

    # The reset cuts a layer in the middle of the schedule that is long enough for a scheduler
    # ignoring the reset to still be offering ops when the bench checks it is idle (a short
    # layer would finish during the reset cycles, and that fault would go unseen).
    long_enough = [index for index, run in enumerate(runs) if len(run.ops) >= RESET_LAYER_MIN_OPS]
    assert long_enough, f"{name}: no layer of {RESET_LAYER_MIN_OPS}+ ops to reset in"
    middle = [index for index in long_enough if len(runs) // 3 <= index <= 2 * len(runs) // 3]
    cut = rng.choice(middle or long_enough)
    schedule = runs[:cut + 1] + [runs[cut].again()] + runs[cut + 1:]
    # Every profile in every test (shuffled over the layers): long stalls are never left out.
    profiles = [STALL_PROFILES[index % len(STALL_PROFILES)] if stalls else (0.0, 1)
                for index in range(len(schedule))]
    rng.shuffle(profiles)
    hint = replay_hint()

    async def start_layer(run, stall_profile):
        idle = rng.choice([0, 0, 1, rng.randint(2, 8)]) if stalls else 0
        if idle:
            dut.desc.value = rng.getrandbits(desc_codec.size)     # junk while idle
            await wait_cycles(dut.clk, idle)
        assert int(dut.done.value) == 1, f"{hint} {run.where}: done fell while idle"
        profile[:] = stall_profile
        run.profile = stall_profile
        dut.desc.value = desc_codec.pack(run.row)
        dut.start.value = 1
        await RisingEdge(dut.clk)
        run.start = cycle_now()
        dut.start.value = 0
        await RisingEdge(dut.clk)
        assert int(dut.ops__valid.value) == 1 and int(dut.done.value) == 0, (
            f"{hint} {run.where}: the cycle after start, valid={dut.ops__valid.value} "
            f"done={dut.done.value} (expected 1, 0)")

    async def drive():
        for index, run in enumerate(schedule):
            await start_layer(run, profiles[index])
            if index == cut:
                # The reset, ready still stalling, early enough that ops are left after it: at
                # most r + 1 are taken before it and one per reset cycle, so a scheduler that
                # ignored it would still be offering ops.
                await wait_cycles(dut.clk, rng.randint(0, len(run.ops) - RESET_LAYER_MIN_OPS))
                dut.rst.value = 1
                await wait_cycles(dut.clk, rng.randint(1, MAX_RESET_CYCLES))
                dut.rst.value = 0
                await RisingEdge(dut.clk)
                assert int(dut.done.value) == 1 and int(dut.ops__valid.value) == 0, (
                    f"{hint} {run.where}: right after the reset done={dut.done.value} "
                    f"valid={dut.ops__valid.value} (expected idle: 1, 0)")
                continue
            await RisingEdge(dut.done)
            await RisingEdge(dut.clk)
            run.done = cycle_now() - 1
        dut.desc.value = rng.getrandbits(desc_codec.size)
        await wait_cycles(dut.clk, 4)         # room for spurious ops

    ops_total = sum(len(run.ops) for run in schedule)
    timer = RunTimer()
    longest = max(longest for _, longest in STALL_PROFILES)
    await within_cycles(drive(), (longest + 1) * ops_total + 20 * len(schedule) + 100, name)
    window, wall, cycles = timer.finish((sink, taken), resets, name)

    check_layer_runs(schedule, taken.transfers, window)
    before, during, after = split_at_reset(taken.transfers, window)

    def expect(part):
        return [(run, index, op) for run in part for index, op in enumerate(run.ops)]

    def compare(expected, actual, label):
        run, index, want = expected
        got = decode_op(ops_codec, actual.value)
        assert got == want, (f"{hint} {run.where}: op #{index} of {len(run.ops)} (cycle "
                             f"{actual.cycle}) is {got}, the loop nest gives {want}")

    check_across_reset(compare, expect(schedule[:cut + 1]), before + during,
                       expect(schedule[cut + 1:]), after, what=name)
    coverage = stall_coverage(schedule, taken.transfers)
    for role, (offered, stalled) in coverage.items():
        # Stalls fall on any op: the engine's (ready low on a last op) among them.
        assert offered < STALL_COVERAGE_OPS or stalled, (
            f"{hint} {name}: none of {offered} {role} ops offered under a stalling profile was "
            f"stalled")
    if not stalls:
        for run in schedule:
            if run.done is not None:       # one op a cycle, the first the cycle after start
                assert run.done == run.start + len(run.ops), (
                    f"{hint} {run.where}: {len(run.ops)} ops took cycles {run.start + 1} to "
                    f"{run.done} with ready always high (expected one op a cycle)")
    stalled_ops = ", ".join(f"{stalled}/{offered} {role}" for role, (offered, stalled)
                            in coverage.items())
    dut._log.info(f"{hint} {name}: {len(schedule)} layer runs ({ops_total} ops; "
                  f"{len(before) + len(during)} + {len(after)} taken around a reset at cycle "
                  f"{window.first}; ops stalled: {stalled_ops if stalls else 'no stalls'}), "
                  f"{cycles:.0f} cycles in {wall:.2f} s ({cycles / wall:,.0f} cycles/s)")


@cocotb.test()
@cocotb.parametrize(kind=list(KINDS))
async def layers_of_one_kind_with_stalls_and_reset(dut, kind):
    """Whole layers of one kind from random specs, random ready stalls and idle gaps with junk
    descriptors, a reset in the middle of one layer."""
    rng = bench_random(f"one_kind/{kind}")
    kinds, required = KINDS[kind]
    await _run_layers(dut, f"{kind} layers",
                      draw_layers(rng, kinds, required, _ops_budget(kind)), rng, stalls=True)


@cocotb.test()
async def mixed_layers_back_to_back(dut):
    """Layers of every kind, one after the other with no stall, each started as soon as done
    is seen: one op a cycle, the first the cycle after start; a reset in the middle of one
    layer."""
    rng = bench_random("mixed_back_to_back")
    runs = []
    for kind, (kinds, required) in KINDS.items():
        runs += draw_layers(rng, kinds, required, _ops_budget(kind, share=len(KINDS)))
    rng.shuffle(runs)
    await _run_layers(dut, "mixed layers", runs, rng, stalls=False)
