"""Host protocol on Verilator (bench nqe.cosim.bench_host): the accelerator top of the tiny spec of
tests/test_engine.py (tiny-0: add and mux residuals, stride 2, 3b/2b/1b, a head) driven over its
byte streams with random stalls on both: valid sessions against the integer reference and the
loop nest's counters, malformed traffic (unknown opcodes, wrong lengths, RUN before the loads)
against the documented statuses with a bound on every reply, and a reset in the middle of a
load's payload followed by an exact session. One build (sim_build/host_tiny_0); weights and
images are loaded at run time, drawn from the run's seed.

Self-check: the bench fails on a deliberately broken accelerator (a response byte lost after a
stall of two cycles; its own build, sim_build/host_tiny_0_broken) and when its model is deliberately
wrong (the reference on another network; BAD_LENGTH expected for unknown opcodes).

The seed is drawn per run and printed; NQE_COSIM_SEED=<n> replays it.
"""

import pytest
from test_cosim_scheduler import cocotb_failure_messages
from test_engine import tiny_spec

from nqe.cosim.bench_host import BrokenAccelerator
from nqe.cosim.build import SIM_BUILD, build_simulator, draw_seed, run_seeded_bench
from nqe.rtl.top import Accelerator

SEED = draw_seed()
SPEC = tiny_spec(0)
BENCH = "nqe.cosim.bench_host"


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / f"{SPEC.name}.json"
    path.write_text(SPEC.to_json())
    return path


@pytest.fixture(scope="module")
def simulator():
    return build_simulator(Accelerator(SPEC), "host_tiny_0", SIM_BUILD / "host_tiny_0")


def _run(simulator, spec_file, testcase, **env):
    run_seeded_bench(simulator, BENCH, testcase, SEED, __file__,
                     extra_env={"NQE_HOST_SPEC": spec_file, **env})


def test_valid_sessions_match_reference(simulator, spec_file):
    _run(simulator, spec_file, "valid_sessions_match_reference")


def test_malformed_traffic_sets_status_and_never_hangs(simulator, spec_file):
    _run(simulator, spec_file, "malformed_traffic_sets_status_and_never_hangs")


@pytest.mark.parametrize("target", ["weights", "image"])
def test_reset_mid_payload_recovers(simulator, spec_file, target):
    _run(simulator, spec_file, f"reset_mid_payload_recovers/target={target}")


#: A deliberately wrong model, the cocotb test that must fail with it, and what it must say.
WRONG_MODELS = {"weights": ("valid_sessions_match_reference", "the integer reference gives"),
                "status": ("malformed_traffic_sets_status_and_never_hangs",
                           "status UNKNOWN_OPCODE, the protocol says BAD_LENGTH")}


@pytest.mark.parametrize("wrong", WRONG_MODELS)
def test_bench_catches_a_wrong_model(simulator, spec_file, wrong):
    testcase, message = WRONG_MODELS[wrong]
    with pytest.raises(AssertionError, match="failed"):
        _run(simulator, spec_file, testcase, NQE_HOST_WRONG_MODEL=wrong)
    messages = cocotb_failure_messages(simulator.build_dir)
    assert any(message in text for text in messages), messages


def test_bench_catches_a_broken_accelerator(spec_file):
    sim = build_simulator(BrokenAccelerator(SPEC), "host_tiny_0_broken",
                          SIM_BUILD / "host_tiny_0_broken")
    with pytest.raises(AssertionError, match="failed"):
        _run(sim, spec_file, "valid_sessions_match_reference")
    messages = cocotb_failure_messages(sim.build_dir)
    assert messages and all("NQE_COSIM_SEED" in text for text in messages), messages
