"""MAC array on Verilator (bench nqe.cosim.bench_mac_array): every weight width with 1-3 bit and
8-bit activations (taken whole), random and extreme tiles (24 lanes, one dot product each, one
word a cycle; the lanes past the word's codes carry junk), back-to-back tiles and random input
gaps, a reset in the middle of every run. One build for the module (sim_build/mac_array, reused
while the Verilog is unchanged); the weight width is a run-time input.

The seed is drawn per run and printed; NQE_COSIM_SEED=<n> replays it; NQE_MAC_TILES sets the
tiles on each side of the reset (default 120).
"""


import pytest

from nqe.model import contract


from nqe.cosim.bench_mac_array import mac_array
from nqe.cosim.build import SIM_BUILD, build_simulator, draw_seed, run_seeded_bench

SEED = draw_seed()


@pytest.fixture(scope="module")
def simulator():
    return build_simulator(mac_array(), "mac_array", SIM_BUILD / "mac_array")


def _run(simulator, testcase):
    run_seeded_bench(simulator, "nqe.cosim.bench_mac_array", testcase, SEED, __file__)


@pytest.mark.parametrize("bits", contract.WEIGHT_BITS)
def test_one_weight_width_with_gaps_and_reset(simulator, bits):
    _run(simulator, f"one_weight_width_with_gaps_and_reset/bits={bits}")


def test_widths_change_back_to_back(simulator):
    _run(simulator, "widths_change_back_to_back")
