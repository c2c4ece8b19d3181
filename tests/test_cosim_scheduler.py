"""Layer scheduler on Verilator (bench nqe.cosim.bench_scheduler): whole layers of random specs
(stem, pointwise and bottleneck, group-wise stride 1 and 2, pooling, classifier), op by op
against the plain-Python loop nest (reference_ops), with random ready stalls, idle gaps with junk
descriptors, and a reset in the middle of a layer after which the layer reruns exactly. One build
(sim_build/scheduler) sized for every spec the bench draws from.

Self-check: the checker rejects a wrong expected op (no simulator), and the bench fails on two
deliberately broken schedulers (an op lost after a long stall; reset ignored), each its own build
(sim_build/scheduler_<fault>).

The seed is drawn per run and printed; NQE_COSIM_SEED=<n> replays it.
"""

import os
import xml.etree.ElementTree as ElementTree

import pytest

from nqe.cosim.bench_scheduler import (KINDS, MUTANTS, OP_FIELDS, BrokenScheduler, FieldCodec,
                                       LayerRun, check_layer_runs, decode_op, op_role, scheduler,
                                       stall_coverage)
from nqe.cosim.bench_support import ResetWindow, Transfer, check_across_reset
from nqe.cosim.build import (SEED_VARIABLE, SIM_BUILD, build_simulator, draw_seed,
                             run_seeded_bench)
from nqe.model.memory_map import build_memory_map
from nqe.model.random_spec import random_spec

SEED = draw_seed()
BENCH = "nqe.cosim.bench_scheduler"
#: The cocotb test that must catch each broken scheduler.
MUTANT_TESTCASES = {
    "drops_op_after_long_stall": "layers_of_one_kind_with_stalls_and_reset/kind=groupwise",
    "ignores_reset": "mixed_layers_back_to_back",
}


@pytest.fixture(scope="module")
def simulator():
    return build_simulator(scheduler(), "scheduler", SIM_BUILD / "scheduler")


def _run(simulator, testcase):
    run_seeded_bench(simulator, BENCH, testcase, SEED, __file__)


@pytest.mark.parametrize("kind", list(KINDS))
def test_layers_of_one_kind_with_stalls_and_reset(simulator, kind):
    _run(simulator, f"layers_of_one_kind_with_stalls_and_reset/kind={kind}")


def test_mixed_layers_back_to_back(simulator):
    _run(simulator, "mixed_layers_back_to_back")


def test_checker_rejects_a_wrong_expected_op(monkeypatch):
    """The bench's checker on the loop nest's own ops: silent; with any one expected op field off
    by one (the model deliberately wrong), it fails and names the op. The stall coverage count
    sees the stalls the transfer cycles imply."""
    monkeypatch.setenv(SEED_VARIABLE, str(SEED))
    spec = random_spec(11)
    layer, row = spec.layers()[2], build_memory_map(spec).descriptors(spec)[2]
    run = LayerRun.of(11, layer, row)
    codec = FieldCodec(scheduler().op_layout)
    run.start, run.done = 100, 100 + len(run.ops)
    taken = [Transfer(run.start + 1 + index, codec.pack(op)) for index, op in enumerate(run.ops)]
    window = ResetWindow(50, 52)
    check_layer_runs([run], taken, window)

    def compare(expected, actual, label):
        assert decode_op(codec, actual.value) == expected, label

    check_across_reset(compare, [], [], run.ops, taken, what="self-check")
    index = len(run.ops) // 2
    for field in OP_FIELDS:
        wrong = [dict(op) for op in run.ops]
        wrong[index][field] ^= 1
        with pytest.raises(AssertionError, match=f"output #{index} after the reset"):
            check_across_reset(compare, [], [], wrong, taken, what="self-check")
    with pytest.raises(AssertionError, match="outside every layer run"):
        check_layer_runs([run], taken + [Transfer(run.done + 3, taken[0].value)], window)

    # Stall coverage: none at one op a cycle; a 2-cycle stall on the first last op shows up.
    run.profile = (0.5, 8)
    assert all(stalled == 0 for _, stalled in stall_coverage([run], taken).values())
    last = next(i for i, op in enumerate(run.ops) if op["last"])
    late = [Transfer(t.cycle + 2 * (i >= last), t.value) for i, t in enumerate(taken)]
    run.done += 2
    coverage = stall_coverage([run], late)
    assert coverage["last"][1] == 1 and sum(s for _, s in coverage.values()) == 1, coverage
    assert sum(offered for offered, _ in coverage.values()) == len(run.ops)
    assert op_role(run.ops[last]) == "last"


def cocotb_failure_messages(build_dir):
    """The failure messages of the cocotb run of the current pytest test in ``build_dir`` (from
    cocotb's results file)."""
    name = os.environ["PYTEST_CURRENT_TEST"].rsplit(":", 1)[-1].split(" ", 1)[0]
    root = ElementTree.parse(build_dir / f"{name}.result.xml").getroot()
    return [element.get("message", "") for element in root.iter()
            if element.tag in ("failure", "error")]


@pytest.mark.parametrize("fault", MUTANTS)
def test_bench_catches_a_broken_scheduler(fault):
    sim = build_simulator(BrokenScheduler(fault), f"scheduler_{fault}",
                          SIM_BUILD / f"scheduler_{fault}")
    with pytest.raises(AssertionError, match="failed"):
        run_seeded_bench(sim, BENCH, MUTANT_TESTCASES[fault], SEED, __file__)
    messages = cocotb_failure_messages(sim.build_dir)
    print(f"{fault}: {messages}")
    assert messages and all("NQE_COSIM_SEED" in message for message in messages), messages
