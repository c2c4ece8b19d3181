"""The co-simulation chain end to end: Amaranth -> Verilog -> Verilator -> cocotb bench
(nqe.cosim.bench_smoke). About 15 s from a clean build folder, a few seconds when it is current.

NQE_COSIM_WAVES=1 also writes waveforms (debug): sim_build/packet_sum_waves/dump.fst, or dump.vcd
where the LZ4 headers FST needs are missing.
"""

import os

from nqe.cosim.bench_smoke import PacketSum
from nqe.cosim.build import SIM_BUILD, build_simulator, run_bench


def test_packet_sum_bench_on_verilator():
    waves = os.environ.get("NQE_COSIM_WAVES") == "1"
    sim = build_simulator(PacketSum(value_width=8, sum_width=16), "packet_sum",
                          SIM_BUILD / ("packet_sum_waves" if waves else "packet_sum"),
                          waves=waves)
    run_bench(sim, "nqe.cosim.bench_smoke", waves=waves, extra_env={"SMOKE_PACKETS": 2000})
    if waves:
        assert sim.waves_file.stat().st_size > 0, sim.waves_file
