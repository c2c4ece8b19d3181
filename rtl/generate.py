"""Verilog generation: the :class:`~nqe.rtl.top.Accelerator` of a weights folder's spec, memory
init images for a ROM-style ASIC build, and a JSON map of ports, banks and counters.

Output folder::

    <module>.v           the Verilog top (Amaranth -> Yosys), module ``<module>``
    <bank>.hex           memory init images, one hex word a line ($readmemh), with --memory-init
    <module>.json        map: field "top" names the Verilog file; ports, banks, counters, protocol

The FPGA target (iCE40UP5K SPRAM) has no initial contents, so the default build loads weights at
run time over the host protocol; the init images are for a ROM-style build.
"""

import json
import time
from pathlib import Path

from amaranth.back import verilog
from amaranth.hdl import Const, Value, ValueCastable
from amaranth.lib import wiring

from nqe.model.memory_map import build_memory_map
from nqe.model.weights_io import load_weights
from nqe.rtl.sram import bank_geometries, bias_image, weight_image
from nqe.rtl.top import Accelerator, Opcode, Status

__all__ = ["LINT_WAIVERS", "generate", "verilog_ports"]

#: Verilator warnings waived for Amaranth's Verilog under ``--lint-only -Wall``, and only these.
#: Each is a habit of Yosys' ``write_verilog``, not a design fault; every other warning is fatal.
LINT_WAIVERS = {
    # Operands of mixed widths are written as-is and sliced; Amaranth's width rules already hold.
    "WIDTHEXPAND": "mixed-width operands are written unextended; Amaranth fixed every width",
    "WIDTHTRUNC": "results are written untruncated into narrower targets, as Amaranth intends",
    # Flattened records and wide buses leave bits that a given spec never reads.
    "UNUSEDSIGNAL": "unread bits of flattened payloads/buses, e.g. a field a spec does not use",
    # Processes assign a default before their case statement: intended, no latch.
    "PROCASSINIT": "processes start from the reset/default value before the case statement",
    "CASEINCOMPLETE": "casez without default: the target got its default just before (no latch)",
    # Yosys writes the whole hierarchy into one file, so submodule names cannot match it.
    "DECLFILENAME": "all submodules are written into the top's single Verilog file",
}


def verilog_ports(component):
    """Verilog ports of a wiring.Component, leaving out constant members (always-ready streams)."""
    from amaranth.hdl import _ir

    ports = {}
    for path, member, value in component.signature.flatten(component):
        if isinstance(value, ValueCastable):
            value = value.as_value()
        if isinstance(value, Value) and not isinstance(value, Const):
            direction = (_ir.PortDirection.Input if member.flow == wiring.In
                         else _ir.PortDirection.Output)
            ports["__".join(map(str, path))] = (value, direction)
    return ports


def _write_hex(path, words, width):
    digits = max(1, -(-width // 4))
    path.write_text("".join(f"{word:0{digits}x}\n" for word in words))


def generate(weights, out_dir, module="nqe_top", memory_init=False, log=print):
    """Write the Verilog of the accelerator for ``weights`` (a folder); returns the map dict."""
    started = time.perf_counter()
    net = load_weights(weights)
    spec = net.spec
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    top = Accelerator(spec)
    ports = verilog_ports(top)
    text = verilog.convert(top, name=module, ports=ports, emit_src=False)
    top_file = out_dir / f"{module}.v"
    top_file.write_text(text)
    seconds = time.perf_counter() - started

    mm = build_memory_map(spec)
    banks = []
    for name, geometry in bank_geometries(spec, mm.act_word_bits).items():
        entry = {"name": name, "width": geometry.width, "depth": geometry.depth,
                 "bits": geometry.bits}
        banks.append(entry)
    if memory_init:
        images = {"weights": (weight_image(net), mm.weight_word_bits),
                  "biases": (bias_image(net), mm.bias_word_bits)}
        for entry in banks:
            if entry["name"] in images:
                words, width = images[entry["name"]]
                path = out_dir / f"{entry['name']}.hex"
                _write_hex(path, words, width)
                entry["init"] = path.name
    layers = [layer.name for layer in spec.layers()]
    memory_map = {
        "top": top_file.name, "module": module, "spec": spec.name,
        "weights": str(weights), "clock": "clk", "reset": "rst",
        "ports": [{"name": name, "direction": "in" if direction.name == "Input" else "out",
                   "width": len(value)} for name, (value, direction) in ports.items()],
        "banks": banks,
        "counters": ["total_cycles", "mac_busy_cycles"] + [f"cycles.{n}" for n in layers],
        "counter_bytes": 4,
        "protocol": {"opcodes": {op.name: op.value for op in Opcode},
                     "status": {s.name: s.value for s in Status},
                     "lengths": {op.name: top.length(op) for op in Opcode}},
        "weight_bases": {p.name: p.weight_base for p in mm.placements if p.weight_words},
        "lint_waivers": LINT_WAIVERS,
        "generation_seconds": round(seconds, 2),
    }
    (out_dir / f"{module}.json").write_text(json.dumps(memory_map, indent=2) + "\n")
    log(f"wrote {top_file} ({len(text.splitlines())} lines) in {seconds:.1f} s")
    return memory_map


def lint(verilog_file, module, verilator="verilator", env=None):
    """``verilator --lint-only -Wall`` with :data:`LINT_WAIVERS`; returns (ok, report text)."""
    import subprocess

    args = [verilator, "--lint-only", "-Wall", *(f"-Wno-{w}" for w in LINT_WAIVERS),
            "--top-module", module, str(verilog_file)]
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    return result.returncode == 0, (result.stdout + result.stderr).strip()
