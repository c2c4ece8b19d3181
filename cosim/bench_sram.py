"""cocotb bench of an SRAM bank (:class:`nqe.rtl.sram.Bank`) on Verilator: the ``nqe-1mb`` weight
bank, built with the image of one exported weights folder and written at run time with another.

Both images come from ``weight_image_from_folder`` on a folder written by
``weights_io.write_weights(random_integer_network(spec, seed), folder)``: the build-time one from
a fixed seed (an unchanged image keeps the build current), the run-time one from the run's seed.
The bench

1. reads back every word of the build-time image, addresses in random order;
2. writes the run-time image, addresses in random order, with reads of random addresses in the
   same cycles (sometimes the address being written: the read returns the old word); a reset is
   asserted in the middle of this phase;
3. reads back every word, with writes of random words to random addresses mixed in, then reads
   those back.

Reads and writes come with random gaps (the bank has no ready; ``en`` low is its only stall),
with junk on the address and data ports while idle.

Model: :class:`BankModel`, the words of the memory as the accepted writes left them. Checker:
each read's data, seen at the next read (the read data holds while ``en`` is low), equals the
model's word at that address before the writes of the read's cycle: the one-cycle synchronous
read latency, the hold and the read-during-write rule of the bank's docstring.

Reset: a bank has no state but its words, and those must survive a reset (the weights are
loaded once). Reads taken while reset is asserted are not checked, a word written then is not
known until written again, and the first read after the reset does not check the data held
across it; everything after the reset is checked against the words written before it.

Run from ``tests/test_cosim_sram.py``, which writes both weights folders. Parameters
(environment): ``NQE_COSIM_SEED``, ``NQE_SRAM_INIT_WEIGHTS`` and ``NQE_SRAM_RUN_WEIGHTS`` (the
two folders), ``NQE_SRAM_EXTRA_WRITES`` (random writes in phase 3, default 2000).
"""

import os

import cocotb
from cocotb.triggers import RisingEdge

from nqe.model.spec import load_spec
from nqe.rtl.sram import Bank, bank_geometries, weight_image_from_folder

from .build import start_clock
from .bench_support import (RunTimer, PortGroup, ResetMonitor, TransferMonitor, bench_random, replay_hint,
                            split_at_reset, within_cycles)
from .streams import random_stalls, reset, wait_cycles

__all__ = ["SPEC_NAME", "BankModel", "weight_bank"]

SPEC_NAME = "nqe-1mb"


def weight_bank(init=()):
    """The design under test: the spec's weight bank, with ``init`` as its build-time image."""
    size = bank_geometries(load_spec(SPEC_NAME))["weights"]
    return Bank(size.width, size.depth, init)


class BankModel:
    """The bank's words as the observed writes left them; ``None`` where not known (written
    while reset was asserted)."""

    def __init__(self, depth, init):
        self.words = list(init) + [0] * (depth - len(init))

    def read(self, address):
        return self.words[address]

    def write(self, address, word, known=True):
        self.words[address] = word if known else None


def check_reads(model, reads, writes, window, name):
    """The checker: replays ``reads`` and ``writes`` (:class:`Transfer` lists of
    ``{"addr", "data"}`` from the monitors) edge by edge on ``model``.

    At the edge of a read, the read data port shows the word of the previous read; the word a
    read returns is the model's before the writes of its own edge. Returns the reads checked.
    """
    writes_at = {}
    for write in writes:
        writes_at.setdefault(write.cycle, []).append(write.value)
    pending = None            # (cycle, address, expected word) of the read whose data is due
    checked = 0
    cycles = sorted({t.cycle for t in reads} | set(writes_at))
    reads_at = {t.cycle: t.value for t in reads}
    for cycle in cycles:
        read = reads_at.get(cycle)
        if read is not None:
            # The data held across a reset, and words written during one, are not checked.
            across_reset = pending is not None and pending[0] < window.first <= cycle
            if pending is not None and pending[2] is not None and not across_reset:
                issued, address, word = pending
                assert read["data"] == word, (
                    f"{replay_hint()} {name}: read of address {address} at cycle {issued} "
                    f"gave {read['data']:#x} (seen at cycle {cycle}), the bank held {word:#x}")
                checked += 1
            pending = None if cycle in window else (cycle, read["addr"],
                                                    model.read(read["addr"]))
        for write in writes_at.get(cycle, ()):
            model.write(write["addr"], write["data"], known=cycle not in window)
    return checked


def _operations(rng, depth, width, run_words, extra_writes):
    """The bench's three phases as per-cycle operations (dicts for the port group)."""
    def op(read=None, write=None):
        return {"read_en": int(read is not None), "read_addr": read if read is not None else 0,
                "write_en": int(write is not None),
                "write_addr": write[0] if write is not None else 0,
                "write_data": write[1] if write is not None else 0}

    def shuffled(count):
        order = list(range(count))
        rng.shuffle(order)
        return order

    read_back_init = [op(read=address) for address in shuffled(depth)]
    write_run_image = []
    for address in shuffled(len(run_words)):
        read = rng.choice([None, rng.randrange(depth), address])   # same address: the old word
        write_run_image.append(op(read=read, write=(address, run_words[address])))
    extra = [(rng.randrange(depth), rng.getrandbits(width)) for _ in range(extra_writes)]
    read_back_all = [op(read=address) for address in shuffled(depth)]
    for write in extra:
        index = rng.randrange(len(read_back_all) + 1)
        read_back_all.insert(index, op(read=rng.choice([None, write[0]]), write=write))
    read_back_all += [op(read=address) for address, _ in extra]
    read_back_all.append(op(read=0))     # its edge shows the data of the read before it
    return read_back_init, write_run_image, read_back_all


@cocotb.test()
async def images_and_random_words_read_back_across_reset(dut):
    """The build-time image reads back, the run-time image and random words written through
    the write port read back, with random gaps and a reset in the middle of the writes."""
    name = "weight bank"
    rng = bench_random("images_and_random_words")
    init_words = weight_image_from_folder(os.environ["NQE_SRAM_INIT_WEIGHTS"])
    run_words = weight_image_from_folder(os.environ["NQE_SRAM_RUN_WEIGHTS"])
    design = weight_bank()
    depth, width = design.depth, design.width
    assert len(init_words) == len(run_words) == depth, (
        f"{replay_hint()} the images ({len(init_words)}, {len(run_words)} words) do not fill "
        f"the {depth}-word bank")

    start_clock(dut.clk)
    group = PortGroup(read_en=dut.read__en, read_addr=dut.read__addr, write_en=dut.write__en,
                      write_addr=dut.write__addr, write_data=dut.write__data)
    addr_bits = len(dut.read__addr)

    def junk():
        return {"read_en": 0, "read_addr": rng.getrandbits(addr_bits), "write_en": 0,
                "write_addr": rng.getrandbits(addr_bits), "write_data": rng.getrandbits(width)}

    group.value = junk()
    await reset(dut.clk, dut.rst)
    reads = TransferMonitor(dut.clk, dut.read__en,
                            PortGroup(addr=dut.read__addr, data=dut.read__data))
    writes = TransferMonitor(dut.clk, dut.write__en,
                             PortGroup(addr=dut.write__addr, data=dut.write__data))
    resets = ResetMonitor(dut.clk, dut.rst)
    for monitor in (reads, writes, resets):
        monitor.start()

    phases = _operations(rng, depth, width, run_words,
                         int(os.environ.get("NQE_SRAM_EXTRA_WRITES", "2000")))
    stall = random_stalls(0.3, 4, rng)

    async def drive(operations):
        for operation in operations:
            idle = stall()
            if idle:
                group.value = junk()
                await wait_cycles(dut.clk, idle)
            group.value = operation
            await RisingEdge(dut.clk)
        group.value = junk()

    async def reset_after(cycles, length):
        await wait_cycles(dut.clk, cycles)
        dut.rst.value = 1
        await wait_cycles(dut.clk, length)
        dut.rst.value = 0

    operations = sum(len(phase) for phase in phases)
    timer = RunTimer()

    async def run():
        await drive(phases[0])
        # Somewhere in the first two thirds of the writes: reads and writes go on through it.
        # Both drawn here: the driver draws from rng too, the order must not depend on tasks.
        resetter = cocotb.start_soon(reset_after(rng.randint(1, len(phases[1]) * 2 // 3),
                                                 rng.randint(1, 4)))
        await drive(phases[1])
        await resetter
        await drive(phases[2])
        await wait_cycles(dut.clk, 2)

    await within_cycles(run(), 10 * (operations + 20), name)
    window, wall, cycles = timer.finish((reads, writes), resets, name)
    checked = check_reads(BankModel(depth, init_words), reads.transfers, writes.transfers,
                          window, name)
    _, _, reads_after = split_at_reset(reads.transfers, window)
    # Only reads around the reset go unchecked: a checker that skips more checks nothing.
    assert checked >= 0.95 * len(reads.transfers), (
        f"{replay_hint()} {name}: only {checked} of {len(reads.transfers)} reads checked")
    dut._log.info(f"{replay_hint()} {name}: {operations} operations, {checked} reads checked "
                  f"({len(reads_after)} after a reset at cycle {window.first}), {cycles:.0f} "
                  f"cycles in {wall:.2f} s ({cycles / wall:,.0f} cycles/s)")
