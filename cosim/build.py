"""Amaranth component -> Verilog -> Verilator simulator -> cocotb bench, in two calls.

    sim = build_simulator(PacketSum(), "packet_sum", build_dir)      # Verilog + Verilator build
    run_bench(sim, "nqe.cosim.bench_smoke")                          # runs the cocotb tests

Speed (docs/DESIGN.md, "Simulation speed"): a Python callback per clock edge caps a Verilator
bench at about 110,000 cycles/s. Benches built on this module therefore start the clock with
:func:`start_clock` (cocotb's GPI clock: it toggles in C, inside the simulator loop, at
420,000-520,000 cycles/s) and wake Python only on the events they need: stream transfers,
``done``, and a few cycles around reset (see :mod:`nqe.cosim.streams`).

cocotb's Verilator runner always builds with ``--public-flat-rw`` (every signal reachable and
writable through VPI), which keeps Verilator from optimizing and costs about 4x on the network
designs. :func:`verilator_build` with ``visible=False`` leaves it out; a control file from
:func:`write_ports_control_file` then makes the top's ports public, all that cocotb's drivers,
monitors and clock need (``nqe.cosim.network`` uses it for speed runs).
"""

import dataclasses
import functools
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from amaranth.back import verilog
from amaranth.lib import wiring

from nqe.rtl.generate import verilog_ports

from .toolchain import Toolchain, find_verilator

__all__ = ["CLOCK_PERIOD_NS", "SIM_BUILD", "TIMESCALE", "VERILATOR_WAIVERS", "SimBuild", "build_simulator",
           "component_ports", "fst_supported", "port_declarations", "run_bench", "start_clock",
           "verilator_build", "write_ports_control_file", "write_verilog"]

#: Warnings waived for Amaranth's Verilog (Yosys' `write_verilog`), and only these; every other
#: warning stays fatal. Each is a rendering habit of the generator, not a design fault: Amaranth
#: has already fixed every width and every default value before Verilog is written.
VERILATOR_WAIVERS = (
    # Operands of different widths are written as-is (`acc + payload[7:0]`) and the result
    # sliced; Amaranth's width rules already hold, extending or truncating is intended.
    "-Wno-WIDTHEXPAND",
    "-Wno-WIDTHTRUNC",
    # A `with m.Switch` without a default becomes a `casez` without one, but the target is
    # assigned its default just before the `casez`, so uncovered values keep it (no latch).
    "-Wno-CASEINCOMPLETE",
    # Zero-width signals (e.g. an empty field of a payload layout) are written `wire [-1:0] x;`
    # and never read; Verilator reads that as an ascending range.
    "-Wno-ASCRANGE",
)

#: Root of the Verilator build folders (ignored by git): kept between runs so that an unchanged
#: design is not recompiled.
SIM_BUILD = Path(__file__).resolve().parent.parent / "sim_build"

#: Amaranth emits no `timescale; 1 ns units with 1 ps precision suit a 10 ns bench clock.
TIMESCALE = ("1ns", "1ps")
CLOCK_PERIOD_NS = 10

# The one simulator this harness supports: the versions and flags above are Verilator's.
_SIMULATOR = "verilator"


@dataclasses.dataclass(frozen=True)
class SimBuild:
    """A built simulator: what :func:`run_bench` needs to run tests against it.

    Members
    -------
    toplevel: the Verilog module name.
    verilog: the generated Verilog file.
    build_dir: Verilator's output folder (also where tests run and ``dump.fst`` lands).
    toolchain: the Verilator it was built with.
    waves: the waveform format it was built to write, ``"fst"`` or ``"vcd"``, or ``None``.
    """
    toplevel: str
    verilog: Path
    build_dir: Path
    toolchain: Toolchain
    waves: str | None

    @property
    def waves_file(self):
        """Where :func:`run_bench` (``waves=True``) writes the waveforms: cocotb's Verilator
        main names the file after the format."""
        return self.build_dir / f"dump.{self.waves}" if self.waves else None


@functools.lru_cache(maxsize=None)
def fst_supported(compiler=None):
    """Whether ``compiler`` (default: ``$CXX``, else ``c++``, as Verilator's make does) can build
    Verilator's FST writer.

    Verilator >= 5.046 compresses FST with LZ4: it needs ``lz4.h`` and ``-llz4`` (Debian/Ubuntu
    ``liblz4-dev``, Fedora ``lz4-devel``); VCD needs nothing beyond the compiler.
    """
    compiler = compiler or os.environ.get("CXX") or shutil.which("c++") or "c++"
    probe = "#include <lz4.h>\nint main() { return LZ4_versionNumber() == 0; }\n"
    with tempfile.TemporaryDirectory() as folder:
        try:
            result = subprocess.run(
                [compiler, "-x", "c++", "-", "-llz4", "-o", str(Path(folder) / "probe")],
                input=probe, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return False
    return result.returncode == 0


def _waves_format(waves):
    if not waves:
        return None
    if fst_supported():
        return "fst"
    warnings.warn("waveforms fall back to VCD: this machine cannot build Verilator's FST writer "
                  "(it needs the LZ4 development files: apt install liblz4-dev)", stacklevel=3)
    return "vcd"


# The Verilog ports of a Component (constant always-ready members left out): one definition, in
# the Verilog generator, shared with the benches.
component_ports = verilog_ports


def write_verilog(component, name, path, ports=None):
    """Write ``component`` as Verilog module ``name`` to ``path``; returns ``path``.

    ``component`` is a :class:`amaranth.lib.wiring.Component` (ports from its signature) or an
    Elaboratable with ``ports``. The file is left untouched when its text would not change, so
    Verilator's and make's up-to-date checks skip the rebuild.
    """
    if ports is None and isinstance(getattr(component, "signature", None), wiring.Signature):
        ports = component_ports(component)
    text = verilog.convert(component, name=name, ports=ports)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def _runner(visible=True):
    """cocotb's Verilator runner; ``visible=False``: the same without ``--public-flat-rw``."""
    # Imported late: pytest collection of unrelated tests must not need cocotb.
    from cocotb_tools.runner import get_runner
    return get_runner(_SIMULATOR) if visible else _ports_only_runner_class()()


@functools.cache
def _ports_only_runner_class():
    from cocotb_tools.runner import Verilator

    class PortsOnlyVerilator(Verilator):
        """cocotb's runner passes ``--public-flat-rw`` to every build: every signal of the
        design reachable (and writable) through VPI, which keeps Verilator from optimizing
        them away and costs about 5x in simulation speed on the network designs. This one
        leaves it out; what cocotb needs (the ports) is made public by a control file
        (:func:`write_ports_control_file`)."""

        def _build_command(self):
            commands = super()._build_command()
            verilator = commands[0]
            if "--public-flat-rw" not in verilator:
                raise RuntimeError("cocotb's Verilator build command changed: no "
                                   "--public-flat-rw to leave out; check nqe.cosim.build")
            commands[0] = [arg for arg in verilator if arg != "--public-flat-rw"]
            return commands

    return PortsOnlyVerilator


_PORT_RE = re.compile(r"^\s*(input|output)\s+(?:wire\s+|reg\s+)?(?:\[(\d+):(\d+)\]\s*)?"
                      r"([A-Za-z_][A-Za-z0-9_$]*)\s*;", re.MULTILINE)


def port_declarations(verilog_text, module):
    """``[(name, "input"|"output", width)]`` of ``module``'s ports in Yosys-written Verilog
    (``input [7:0] name;`` lines; names that need escaping are not supported)."""
    match = re.search(rf"^module\s+{re.escape(module)}\s*\((.*?)^endmodule", verilog_text,
                      re.MULTILINE | re.DOTALL)
    if match is None:
        raise ValueError(f"no module {module!r} in the Verilog")
    ports = [(name, direction, int(high) - int(low) + 1 if high else 1)
             for direction, high, low, name in _PORT_RE.findall(match[1])]
    if not ports:
        raise ValueError(f"module {module!r}: no port declarations found")
    return ports


def _write_if_changed(path, text):
    path = Path(path)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def write_ports_control_file(path, module, names):
    """A Verilator control file (``.vlt``) making only ``module``'s signals ``names`` public
    (readable and writable through VPI): what cocotb needs of a design built without
    ``--public-flat-rw``. Left untouched when unchanged."""
    lines = ["`verilator_config", *(f'public_flat_rw -module "{module}" -var "{name}"'
                                    for name in names)]
    return _write_if_changed(path, "\n".join(lines) + "\n")


def verilator_build(sources, toplevel, build_dir, toolchain, *, visible=True, waves_format=None,
                    build_args=(), verbose=False):
    """Verilator build of ``sources`` (Verilog files, ``.vlt`` control files) with cocotb's
    main. ``visible``: cocotb's usual ``--public-flat-rw`` (every signal reachable through the
    hierarchy, e.g. ``dut.engine.act_a``); ``False`` leaves it out (about 5x faster on the network
    designs) and the sources must make the ports public themselves
    (:func:`write_ports_control_file`)."""
    trace_args = {"fst": ["--trace-fst", "--trace-structs"], "vcd": ["--trace-structs"],
                  None: []}[waves_format]
    with toolchain.activated():
        _runner(visible).build(
            sources=[*sources],
            hdl_toplevel=toplevel,
            build_dir=build_dir,
            build_args=[*VERILATOR_WAIVERS, *trace_args, *build_args],
            timescale=TIMESCALE,
            # cocotb's `waves` adds `--trace` (VCD) and make's `VM_TRACE=1`; a `--trace-fst`
            # above overrides the format (Verilator takes FST when both are given). Without
            # `waves`, cocotb forces `VM_TRACE=0` on make's command line and tracing is lost.
            waves=waves_format is not None,
            verbose=verbose,
        )


def build_simulator(component, name, build_dir, *, ports=None, waves=False, build_args=(),
                    toolchain=None, verbose=False):
    """Convert ``component`` to Verilog in ``build_dir`` and build it with Verilator.

    ``waves=True`` builds with waveform tracing (debug: slower build and run; the simulator only
    writes the file when :func:`run_bench` asks): FST (``--trace-fst``), or VCD with a warning
    where the LZ4 headers that FST needs are missing (:func:`fst_supported`). ``build_args`` are
    extra Verilator options. Returns a :class:`SimBuild`. Raises
    :class:`~nqe.cosim.toolchain.ToolchainError` when no usable Verilator is installed.
    """
    toolchain = toolchain or find_verilator()
    build_dir = Path(build_dir).resolve()
    source = write_verilog(component, name, build_dir / f"{name}.v", ports=ports)
    waves_format = _waves_format(waves)
    verilator_build([source], name, build_dir, toolchain, waves_format=waves_format,
                    build_args=build_args, verbose=verbose)
    return SimBuild(name, source, build_dir, toolchain, waves_format)


def run_bench(sim, test_module, *, waves=False, seed=None, testcase=None, extra_env=None):
    """Run the cocotb tests of ``test_module`` (a module name, e.g. ``"nqe.cosim.bench_smoke"``)
    on ``sim``; returns the results file. Under pytest a failing cocotb test fails the caller.

    ``waves=True`` writes ``sim.waves_file`` (the build must have had ``waves=True`` too).
    ``extra_env`` reaches the bench as environment variables (its parameters).
    """
    if waves and not sim.waves:
        raise ValueError("run_bench(waves=True) needs a simulator built with waves=True "
                         "(build_simulator(..., waves=True))")
    runner = _runner()
    with sim.toolchain.activated():
        return runner.test(
            test_module=test_module,
            hdl_toplevel=sim.toplevel,
            hdl_toplevel_lang="verilog",
            build_dir=sim.build_dir,
            test_dir=sim.build_dir,
            # cocotb's Verilator main() takes `--trace` to open the dump; the format is the
            # build's. Passed here rather than as `waves=`, which assumes VCD.
            test_args=["--trace"] if waves else [],
            seed=seed,
            testcase=testcase,
            extra_env={key: str(value) for key, value in (extra_env or {}).items()},
        )


def start_clock(clk, period_ns=CLOCK_PERIOD_NS):
    """Start the bench clock on ``clk`` inside the simulator (cocotb's GPI clock, no Python per
    cycle); returns the :class:`cocotb.clock.Clock`. Call from a cocotb test."""
    from cocotb.clock import Clock
    clock = Clock(clk, period_ns, unit="ns", impl="gpi")
    clock.start()
    return clock


#: Environment variable that replays a bench's random run (read by the benches and wrappers).
SEED_VARIABLE = "NQE_COSIM_SEED"


def draw_seed():
    """The seed of this pytest session's bench runs: ``$NQE_COSIM_SEED`` or a fresh random one."""
    import random

    text = os.environ.get(SEED_VARIABLE)
    return int(text) if text else random.SystemRandom().randrange(1 << 32)


def run_seeded_bench(sim, test_module, testcase, seed, test_file, extra_env=None):
    """Run one cocotb ``testcase`` with ``seed``; a failure names the seed and the replay command.

    Fails too when no test of that name ran (a renamed cocotb test would otherwise pass)."""
    from cocotb_tools.runner import get_results

    print(f"{SEED_VARIABLE}={seed}")
    try:
        results = run_bench(sim, test_module, seed=seed, testcase=testcase,
                            extra_env={SEED_VARIABLE: seed, **(extra_env or {})})
    except SystemExit as error:      # cocotb's runner exits when a cocotb test fails
        raise AssertionError(f"[{SEED_VARIABLE}={seed}] {testcase} failed (log above); replay: "
                             f"{SEED_VARIABLE}={seed} pytest {test_file}") from error
    assert get_results(results)[0] == 1, f"no cocotb test named {testcase!r}"
    return results
