"""Post-accumulation unit on Verilator (bench nqe.cosim.bench_post_acc): every mode (activate,
add, mux, or, classifier logits) alone and interleaved value by value, with layer values, exact
shift boundaries, negative sums and clamp edges, random input gaps and a reset in the middle of
every run. One build for the module (sim_build/post_acc, reused while the Verilog is unchanged);
the mode and widths are run-time inputs.

The seed is drawn per run and printed; NQE_COSIM_SEED=<n> replays it.
"""


import random

import pytest


from nqe.cosim.bench_post_acc import post_acc, random_value
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


class _ExtremeRandom(random.Random):
    """Draws the largest (or the smallest) value every time, and ``random()`` = ``fraction``:
    the stimulus's corners, which random seeds reach about once in ten million values."""

    def __init__(self, largest, fraction):
        super().__init__(0)
        self.largest, self.fraction = largest, fraction

    def random(self):
        return self.fraction

    def randint(self, a, b):
        return b if self.largest else a

    def randrange(self, start, stop=None):
        start, stop = (0, start) if stop is None else (start, stop)
        return stop - 1 if self.largest else start

    def choice(self, seq):
        if all(isinstance(item, int) for item in seq):
            return max(seq) if self.largest else min(seq)
        return seq[-1] if self.largest else seq[0]              # e.g. the spec's layers

    def getrandbits(self, k):
        return (1 << k) - 1 if self.largest else 0


@pytest.mark.parametrize("mode", list(PostAccMode), ids=lambda mode: mode.name.lower())
def test_stimulus_stays_within_the_ports_and_the_sum_range(mode):
    # A clamp edge at shift 15 once drew a sum the two ports cannot carry (seed 3972927867).
    design = post_acc()
    sum_lo, sum_hi = -(1 << (design.sum_bits - 1)), (1 << (design.sum_bits - 1)) - 1
    rngs = [_ExtremeRandom(largest, fraction)
            for largest in (True, False) for fraction in (0.0, 0.3, 0.5, 0.7, 0.8, 0.99)]
    rngs += [random.Random(seed) for seed in (0, 1)]
    for rng in rngs:
        for _ in range(2_000):
            value = random_value(rng, design, mode)
            assert -(1 << (design.acc_bits - 1)) <= value["acc"] < 1 << (design.acc_bits - 1)
            assert -(1 << (design.bias_bits - 1)) <= value["bias"] < 1 << (design.bias_bits - 1)
            if mode is not PostAccMode.LOGIT:
                assert sum_lo <= value["acc"] + value["bias"] <= sum_hi
