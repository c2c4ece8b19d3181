"""Post-accumulation unit on Verilator (bench nqe.cosim.bench_post_acc): every mode (activate,
add, mux, or, classifier logits) alone and interleaved value by value, with layer values, exact
shift boundaries, negative sums and clamp edges, random input gaps and a reset in the middle of
every run. One build for the module (sim_build/post_acc, reused while the Verilog is unchanged);
the mode and widths are run-time inputs.

The seed is drawn per run and printed; NQE_COSIM_SEED=<n> replays it.
"""


import pytest


from nqe.cosim.bench_post_acc import post_acc
from nqe.cosim.build import SIM_BUILD, build_simulator, draw_seed, run_seeded_bench
from nqe.rtl.post_acc import PostAccMode

SEED = draw_seed()


@pytest.fixture(scope="module")
def simulator():
    return build_simulator(post_acc(), "post_acc", SIM_BUILD / "post_acc")


def _run(simulator, testcase):
    run_seeded_bench(simulator, "nqe.cosim.bench_post_acc", testcase, SEED, __file__)


@pytest.mark.parametrize("mode", [mode.name.lower() for mode in PostAccMode])
def test_one_mode_with_gaps_and_reset(simulator, mode):
    _run(simulator, f"one_mode_with_gaps_and_reset/mode={mode}")


def test_modes_change_back_to_back(simulator):
    _run(simulator, "modes_change_back_to_back")
