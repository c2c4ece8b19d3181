"""Co-simulate a whole network: weights folder + images -> generated Verilog -> Verilator ->
the cocotb bench :mod:`nqe.cosim.bench_network` -> a report (bit-exactness, cycles, speed).

    from nqe.cosim.network import cosimulate
    report = cosimulate("weights/run-1", images, labels)      # images: uint8 [N, H, W, C]
    assert report["mismatches"] == 0

The Verilog depends only on the spec (weights, biases, shifts and selects are loaded at run time
over the host protocol), so one build serves every weights folder of a spec: the build folder is
``<build_dir>/<spec name>`` and is reused while the generated Verilog is unchanged (the file is
left untouched, so Verilator's and make's up-to-date checks skip the rebuild).

cocotb runs in a subprocess (``cocotb_tools.runner``): images go to it as an ``.npy`` file,
parameters as environment variables, results come back as a JSON file (see
:mod:`nqe.cosim.bench_network`). No cocotb import at module level: importing this module needs
neither cocotb nor Verilator.
"""

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from nqe.model.weights_io import load_weights

from .build import SIM_BUILD

__all__ = ["DEFAULT_BUILD_DIR", "BENCH_MODULE", "CosimError", "VARIANTS",
           "build_folder", "build_network", "cosimulate", "ideal_cycles"]

#: Kept between runs (ignored by git).
DEFAULT_BUILD_DIR = SIM_BUILD / "network"
BENCH_MODULE = "nqe.cosim.bench_network"
MODULE = "nqe_top"


class CosimError(RuntimeError):
    """The bench did not complete (protocol error status, timeout, simulator crash)."""


def ideal_cycles(spec):
    """{layer name: MACs / products a cycle at its weight width} for the layers with weights:
    ``weight_word_bits // weight_bits`` products a cycle (3b: //3, 2b: //2, 1b: //1)."""
    word = spec.hardware.weight_word_bits
    return {layer.name: layer.macs / (word // layer.weight_bits)
            for layer in spec.layers() if layer.has_weights}


def _write_if_changed(path, text):
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
        return True
    return False


#: Build variants (:func:`build_network`): ``"fast"`` for speed runs, ``"visible"`` (cocotb's
#: ``--public-flat-rw``: the layer read-back reaches ``dut.engine.act_a``) for checking runs.
VARIANTS = ("fast", "visible")


def build_folder(spec_name, build_dir=DEFAULT_BUILD_DIR, *, variant="visible", waves=False):
    """Where :func:`build_network` builds a variant: ``<spec>`` (visible), ``<spec>_waves``
    (visible, with tracing), ``<spec>_fast``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: one of {VARIANTS}")
    if variant == "fast" and waves:
        raise ValueError("waveforms need the visible variant (debug builds)")
    suffix = {"visible": "_waves" if waves else "", "fast": "_fast"}[variant]
    return Path(build_dir).resolve() / (spec_name + suffix)


def build_network(weights_dir, build_dir=DEFAULT_BUILD_DIR, *, waves=False, variant="visible",
                  log=print):
    """Generate the Verilog of ``weights_dir``'s spec and build it with Verilator.

    ``variant``: ``"visible"`` is cocotb's usual build (``--public-flat-rw``: every signal
    reachable through the hierarchy; the layer read-back and waveforms need it); ``"fast"`` makes
    only the top's ports public (a Verilator control file, ``ports.vlt``), so Verilator keeps
    its optimizations: several times faster. Each variant has its own folder
    (:func:`build_folder`), each reused while the Verilog is unchanged.

    Returns ``(SimBuild, {"generate_seconds", "build_seconds", "rebuilt", "verilog_lines",
    "build_variant"})``. A build folder whose Verilog is unchanged is reused (``rebuilt`` False,
    a second or so)."""
    from nqe.cosim.build import (SimBuild, _waves_format, port_declarations, verilator_build,
                                 write_ports_control_file)
    from nqe.cosim.toolchain import find_verilator
    from nqe.rtl.generate import generate

    spec = load_weights(weights_dir).spec
    fast = variant == "fast"
    folder = build_folder(spec.name, build_dir, variant=variant, waves=waves)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as staging:
        generate(weights_dir, staging, module=MODULE, log=lambda *_: None)
        text = (Path(staging) / f"{MODULE}.v").read_text()
        (folder / f"{MODULE}.json").write_text((Path(staging) / f"{MODULE}.json").read_text())
    source = folder / f"{MODULE}.v"
    changed = _write_if_changed(source, text)
    sources = [source]
    if fast:
        names = [name for name, _, _ in port_declarations(text, MODULE)]
        sources.append(write_ports_control_file(folder / "ports.vlt", MODULE, names))
    generate_seconds = time.perf_counter() - started

    toolchain = find_verilator()
    waves_format = _waves_format(waves)
    executable = folder / MODULE
    before = executable.stat().st_mtime_ns if executable.exists() else None
    started = time.perf_counter()
    verilator_build(sources, MODULE, folder, toolchain, visible=not fast,
                    waves_format=waves_format)
    build_seconds = time.perf_counter() - started
    lines = text.count("\n")
    log(f"{spec.name} ({variant} build): Verilog {lines} lines "
        f"({'changed' if changed else 'unchanged'}), generated in {generate_seconds:.1f} s, "
        f"Verilator build {build_seconds:.1f} s")
    sim = SimBuild(MODULE, source, folder, toolchain, waves_format)
    return sim, {"generate_seconds": generate_seconds, "build_seconds": build_seconds,
                 "rebuilt": executable.stat().st_mtime_ns != before, "verilog_lines": lines,
                 "build_variant": variant}


def _stalls_text(stalls):
    if not stalls:
        return "0"
    if stalls is True:
        return "0.3,4"
    probability, longest = stalls
    return f"{float(probability)},{int(longest)}"


def cosimulate(weights_dir, images, labels=None, stalls=False, debug=False,
               build_dir=DEFAULT_BUILD_DIR, check_layers=False, seed=0, timeout_cycles=None,
               model_weights_dir=None, variant=None, log=print):
    """Run ``images`` through the accelerator generated for ``weights_dir`` on Verilator and
    compare every result with the integer reference bit for bit.

    Parameters
    ----------
    weights_dir : path of a weights folder (``nqe.model.weights_io``; its manifest holds the spec).
    images : uint8 [N, H, W, C] at the spec's input size.
    labels : optional [N] class labels: ``accuracy`` of the accelerator's class indices.
    stalls : False (off: speed runs), True (probability 0.3, 1-4 cycles) or (probability,
        longest): random valid/ready stalls on both host streams.
    debug : build with waveforms (FST, else VCD) and, on a mismatch, rerun the image reading each
        layer's output bank to name the first mismatching layer/channel/pixel.
    build_dir : parent of the per-spec build folders (reused while the Verilog is unchanged).
    check_layers : also compare every layer's output bank with the reference's activations on
        every RUN (read through the simulator's hierarchy as each layer ends; Python wakes once a
        layer). Random weights often give logits independent of the image: regressions turn it on.
    seed : seed of the stall draws.
    timeout_cycles : cycles one RUN may take before the bench fails (default: from the spec).
    model_weights_dir : run the reference on this folder (same spec) instead of ``weights_dir``;
        only to check the checker (different weights must be reported as mismatches).
    variant : the build (:func:`build_network`): ``"fast"`` (only the ports public: several
        times faster) or ``"visible"`` (``--public-flat-rw``, needed by ``check_layers`` and
        ``debug``). Default: ``"visible"`` when either is on, else ``"fast"``.

    Returns a dict: ``spec``, ``images``, ``mismatches`` (images with any difference),
    ``mismatch_details`` (per mismatching image: what differs and where; with ``debug`` also
    ``first_layer_mismatch``), ``accuracy`` (with ``labels``; else None), ``class_indices``,
    ``cycles_per_image`` (mean engine cycles from the counters), ``cycles`` (per image),
    ``mac_busy_cycles_per_image``, ``layer_cycles`` (mean per layer), ``ideal_cycles_per_image``,
    ``ideal_layer_cycles``, ``mac_utilization`` ({"overall", "layers": {name: ideal/actual}}),
    ``mac_busy_fraction``, ``sim_cycles_per_s`` (during RUN, Python asleep),
    ``sim_cycles_per_s_overall`` (loads and reads included), ``build_variant`` (``"fast"`` or
    ``"visible"``), ``wall_seconds_per_image``,
    ``wall_seconds_run_per_image``, ``load_weights_seconds``, ``build_seconds``,
    ``generate_seconds``, ``rebuilt``, ``verilog_lines``, ``waves`` (file or None),
    ``results_file`` (the bench's raw JSON), ``stalls``, ``seed``.

    Raises :class:`CosimError` when the bench fails to finish (error status, timeout, crash).
    """
    from nqe.cosim.build import run_bench

    images = np.asarray(images)
    net = load_weights(weights_dir)
    spec = net.spec
    expected_shape = (spec.input_height, spec.input_width, spec.input_channels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected_shape:
        raise ValueError(f"images must be uint8 [N, {', '.join(map(str, expected_shape))}] (NHWC) "
                         f"for spec {spec.name!r}, got {images.dtype} {list(images.shape)}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")

    if variant is None:
        variant = "visible" if (check_layers or debug) else "fast"
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: one of {VARIANTS}")
    if variant == "fast" and (check_layers or debug):
        raise ValueError("check_layers and debug read the simulator's hierarchy: they need "
                         "variant='visible'")
    sim, build_info = build_network(weights_dir, build_dir, waves=debug, variant=variant,
                                    log=log)
    run_dir = sim.build_dir / "run"
    run_dir.mkdir(exist_ok=True)
    images_file = run_dir / "images.npy"
    results_file = run_dir / "results.json"
    np.save(images_file, images)
    results_file.unlink(missing_ok=True)
    env = {"NQE_COSIM_WEIGHTS": Path(weights_dir).resolve(), "NQE_COSIM_IMAGES": images_file,
           "NQE_COSIM_RESULTS": results_file, "NQE_COSIM_STALLS": _stalls_text(stalls),
           "NQE_COSIM_DEBUG": int(bool(debug)), "NQE_COSIM_SEED": int(seed),
           "NQE_COSIM_CHECK_LAYERS": int(bool(check_layers))}
    if model_weights_dir is not None:
        env["NQE_COSIM_MODEL_WEIGHTS"] = Path(model_weights_dir).resolve()
    if timeout_cycles is not None:
        env["NQE_COSIM_TIMEOUT_CYCLES"] = int(timeout_cycles)
    started = time.perf_counter()
    run_bench(sim, BENCH_MODULE, waves=bool(debug), seed=int(seed), extra_env=env)
    bench_seconds = time.perf_counter() - started
    if not results_file.is_file():
        raise CosimError(f"{spec.name}: the bench wrote no results ({results_file}); see the "
                         f"log above and {sim.build_dir / 'results.xml'}")
    results = json.loads(results_file.read_text())
    report = summarize(spec, results, labels)
    report.update({k: build_info[k] for k in ("build_seconds", "generate_seconds", "rebuilt",
                                              "verilog_lines", "build_variant")})
    report.update({"bench_seconds": bench_seconds, "results_file": str(results_file),
                   "waves": str(sim.waves_file) if debug else None})
    return report


def summarize(spec, results, labels=None):
    """The report of :func:`cosimulate` from the bench's results JSON (no build fields)."""
    per_image = results["images"]
    count = len(per_image)
    ideal = ideal_cycles(spec)
    ideal_total = sum(ideal.values())
    totals = [entry["counters"]["total"] for entry in per_image]
    macs = [entry["counters"]["mac"] for entry in per_image]
    layer_means = {layer.name: float(np.mean([e["counters"]["layers"][layer.name]
                                              for e in per_image])) if count else 0.0
                   for layer in spec.layers()}
    mean = lambda values: float(np.mean(values)) if len(values) else 0.0   # noqa: E731
    cycles_per_image = mean(totals)
    run_cycles = sum(e["sim_cycles"]["run"] for e in per_image)
    run_wall = sum(e["wall_s"]["run"] for e in per_image)
    all_cycles = sum(e["sim_cycles"]["total"] for e in per_image) + results["load"]["sim_cycles"]
    all_wall = sum(e["wall_s"]["total"] for e in per_image) + results["load"]["wall_s"]
    indices = [e["class_index"] for e in per_image]
    mismatching = [e for e in per_image if e["mismatches"]]
    accuracy = None
    if labels is not None and spec.head is not None and count:
        accuracy = float(np.mean(np.asarray(indices) == np.asarray(labels)))
    return {
        "spec": spec.name,
        "images": count,
        "mismatches": len(mismatching),
        "mismatch_details": [{"image": e["index"], "mismatches": e["mismatches"],
                              **({"first_layer_mismatch": e["first_layer_mismatch"]}
                                 if "first_layer_mismatch" in e else {})}
                             for e in mismatching],
        "accuracy": accuracy,
        "class_indices": indices,
        "cycles": totals,
        "cycles_per_image": cycles_per_image,
        "mac_busy_cycles_per_image": mean(macs),
        "mac_busy_fraction": mean(macs) / cycles_per_image if cycles_per_image else 0.0,
        "layer_cycles": layer_means,
        "ideal_cycles_per_image": ideal_total,
        "ideal_layer_cycles": ideal,
        "mac_utilization": {
            "overall": ideal_total / cycles_per_image if cycles_per_image else 0.0,
            "layers": {name: (value / layer_means[name] if layer_means[name] else 0.0)
                       for name, value in ideal.items()},
        },
        "sim_cycles_per_s": run_cycles / run_wall if run_wall else 0.0,
        "sim_cycles_per_s_overall": all_cycles / all_wall if all_wall else 0.0,
        "wall_seconds_per_image": mean([e["wall_s"]["total"] for e in per_image]),
        "wall_seconds_run_per_image": mean([e["wall_s"]["run"] for e in per_image]),
        "load_weights_seconds": results["load"]["wall_s"],
        "stalls": results["stalls"],
        "check_layers": results["check_layers"],
        "seed": results["seed"],
    }
