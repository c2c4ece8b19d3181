"""SRAM bank on Verilator (bench nqe.cosim.bench_sram): the nqe-1mb weight bank built with the
image of one exported random weights folder, written at run time with another, read back with
random gaps, concurrent reads and writes, and a reset in the middle of the writes.

The build-time folder has a fixed seed so the build (sim_build/sram_weights) stays current; the
run-time folder comes from the run's seed, drawn per run and printed; NQE_COSIM_SEED=<n>
replays it.
"""


import pytest


from nqe.cosim.bench_sram import SPEC_NAME, weight_bank
from nqe.cosim.build import SIM_BUILD, build_simulator, draw_seed, run_seeded_bench
from nqe.model.random_spec import random_integer_network
from nqe.model.spec import load_spec
from nqe.model.weights_io import write_weights
from nqe.rtl.sram import weight_image_from_folder

SEED = draw_seed()
# The build-time image's weights: fixed, so that the Verilog (which holds the image) is too.
INIT_WEIGHTS_SEED = 20261125


def _weights_folder(folder, seed):
    return write_weights(random_integer_network(load_spec(SPEC_NAME), seed), folder)


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory):
    return _weights_folder(tmp_path_factory.mktemp("init") / "weights", INIT_WEIGHTS_SEED)


@pytest.fixture(scope="module")
def simulator(init_weights):
    return build_simulator(weight_bank(weight_image_from_folder(init_weights)), "sram_weights",
                           SIM_BUILD / "sram_weights")


def test_weight_bank_reads_back_images_across_reset(simulator, init_weights, tmp_path):
    run_weights = _weights_folder(tmp_path / "weights", SEED)
    run_seeded_bench(simulator, "nqe.cosim.bench_sram",
                     "images_and_random_words_read_back_across_reset", SEED, __file__,
                     extra_env={"NQE_SRAM_INIT_WEIGHTS": init_weights,
                                "NQE_SRAM_RUN_WEIGHTS": run_weights})
