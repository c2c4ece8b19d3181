"""Whole-network bench: the generated accelerator (``rtl/generate.py``,
:class:`~nqe.rtl.top.Accelerator`) on Verilator, driven over its byte-stream host protocol,
against the integer reference.

Transactions: the host-side model of the protocol (:class:`nqe.rtl.host.HostProtocol`) builds
every command frame (weights folder -> LOAD_WEIGHTS/BIASES/SHIFTS/SELECTS, image -> LOAD_IMAGE,
RUN, READ_RESULT, READ_COUNTERS) and parses every reply. A :class:`~nqe.cosim.streams.StreamDriver`
sends the frames, a :class:`~nqe.cosim.streams.StreamSink` takes the response bytes (both with
optional random valid/ready stalls) and a :class:`~nqe.cosim.streams.StreamMonitor`, which only
observes, hands the response bytes to the checker. The transaction-level model is the integer
reference (:func:`nqe.model.integer_reference.run_reference`); the checker compares class index
and logits (or the bottleneck's code bits) bit for bit.

Speed (docs/DESIGN.md, "Simulation speed"): the clock is cocotb's GPI clock; Python wakes on
stream transfers only. During RUN the driver is done, the sink holds ``ready`` high and the
monitor sleeps until the status byte's ``valid`` rises: the whole inference runs without Python.

Parameters (environment variables; :func:`nqe.cosim.network.cosimulate` sets them):

``NQE_COSIM_WEIGHTS``  weights folder (``nqe.model.weights_io`` format; its manifest has the spec)
``NQE_COSIM_IMAGES``   ``.npy`` file, uint8 [N, H, W, C]
``NQE_COSIM_RESULTS``  JSON file this bench writes: per-image results and timings
``NQE_COSIM_STALLS``   ``"0"`` (off) or ``"probability,longest"`` (``"0.3,4"``) on both streams
``NQE_COSIM_DEBUG``    ``"1"``: on a mismatch, run the image again, read each layer's output bank
                       when the layer ends and name the first mismatching layer/channel/pixel
``NQE_COSIM_CHECK_LAYERS``  ``"1"``: compare every layer's output bank with the reference on every
                       RUN (see below), not only the final map: Python then also wakes once a layer
``NQE_COSIM_SEED``     seed of the stall draws (replay)
``NQE_COSIM_TIMEOUT_CYCLES``  cycles a RUN may take before the bench fails (default: from the spec)
``NQE_COSIM_MODEL_WEIGHTS``   the folder the reference runs on, when not the loaded one (only to
                       check the checker: a deliberately different folder must give mismatches)

Layer read-back: the host protocol returns only the final map (READ_RESULT), so a mismatch found
through it names an output channel/pixel (a logit, or a code bit's channel and pixel). The layer
watcher goes further through the simulator's hierarchy (the ``"visible"`` build, with cocotb's
``--public-flat-rw``; the ``"fast"`` build makes only the ports public): it wakes when the
engine's ``layer`` index changes and reads the ping-pong bank the finished layer wrote (``act_a`` or ``act_b``, from the memory map) before the next layer
overwrites it, naming the first mismatching layer, channel and pixel. It runs on every RUN with
``NQE_COSIM_CHECK_LAYERS=1`` (random weights often make the logits independent of the image, so
the final map alone would miss most early-layer faults), and in debug mode on a rerun of an image
whose final map mismatched.
"""

import json
import os
import random
import time
from pathlib import Path

import cocotb
import numpy as np
from cocotb.triggers import First, RisingEdge, with_timeout

from nqe.model.integer_reference import run_reference
from nqe.model.memory_map import act_slot_bits, stored_bits
from nqe.model.weights_io import load_weights
from nqe.rtl.host import HostProtocol, layer_output_hwc

from .build import CLOCK_PERIOD_NS, start_clock
from .streams import (StreamDriver, StreamMonitor, StreamPorts, StreamSink, random_stalls,
                      reset)

__all__ = ["HostLink", "NetworkChecker", "first_difference", "parse_stalls"]


def parse_stalls(text):
    """``"0"``/``""`` -> None (no stalls); ``"p,longest"`` -> (p, longest)."""
    text = (text or "").strip()
    if text in ("", "0", "off", "none"):
        return None
    probability, longest = text.split(",")
    return float(probability), int(longest)


def first_difference(actual, expected, layout):
    """Where two maps first differ, as a dict, or None when equal.

    ``layout``: ``"chw"`` for [C, H, W] arrays (reported as channel and pixel ``(y, x)``, pixels
    in HWC order, the order the hardware writes them), ``"c"`` for vectors (logits)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        return {"shape": [list(actual.shape), list(expected.shape)]}
    if np.array_equal(actual, expected):
        return None
    if layout == "c":
        channel = int(np.flatnonzero(actual != expected)[0])
        return {"channel": channel, "actual": int(actual[channel]),
                "expected": int(expected[channel]),
                "differing": int(np.count_nonzero(actual != expected))}
    diff = (actual != expected).transpose(1, 2, 0)          # HWC: the hardware's write order
    y, x, channel = (int(v) for v in np.argwhere(diff)[0])
    return {"channel": channel, "pixel": [y, x], "actual": int(actual[channel, y, x]),
            "expected": int(expected[channel, y, x]), "differing": int(np.count_nonzero(diff))}


class HostLink:
    """The host side of the two byte streams: sends a command frame and returns its reply.

    The reply is read from a :class:`StreamMonitor` on the response stream (observing only);
    the :class:`StreamSink` provides the back-pressure. Python sleeps between transfers."""

    def __init__(self, dut, host, stalls=None, rng=random):
        make = (lambda: random_stalls(stalls[0], stalls[1], rng)) if stalls else (lambda: None)
        self.host = host
        self.clk = dut.clk
        command = StreamPorts.of(dut, "command")
        response = StreamPorts.of(dut, "response")
        self.driver = StreamDriver(dut.clk, command, **({"stall": make()} if stalls else {}))
        self.sink = StreamSink(dut.clk, response, **({"stall": make()} if stalls else {}))
        self.replies = StreamMonitor(dut.clk, response)

    def start(self):
        self.sink.start()
        self.replies.start()

    def stop(self):
        self.sink.stop()
        self.replies.stop()

    async def _reply(self, opcode):
        status = await self.replies.values.get()
        length = self.host.reply_length(opcode, status)
        return bytes([status] + [await self.replies.values.get() for _ in range(length - 1)])

    async def command(self, frame, opcode):
        """Send ``frame`` (one command) and return its whole reply (status byte first)."""
        sending = cocotb.start_soon(self.driver.send_all(frame))
        reply = await self._reply(opcode)
        await sending
        return reply

    async def commands(self, frames):
        """Several commands, each with its own status: ``frames`` is [(bytes, opcode)]."""
        return [await self.command(frame, opcode) for frame, opcode in frames]


class NetworkChecker:
    """The model side: the integer reference's outputs and activations for the batch, and the
    comparison of one image's READ_RESULT with them."""

    def __init__(self, net, images):
        self.net = net
        self.spec = net.spec
        self.host = HostProtocol(net.spec)
        self.logits, self.activations = run_reference(net, images, return_activations=True)

    def compare(self, index, class_index, output):
        """Mismatches of image ``index`` (a list of dicts, empty when bit-exact)."""
        expected = self.logits[index]
        found = []
        if self.spec.head is not None:
            where = first_difference(output, expected, "c")
            if where:
                found.append({"what": "logits", **where})
            if class_index != int(np.argmax(expected)):
                found.append({"what": "class_index", "actual": int(class_index),
                              "expected": int(np.argmax(expected))})
        else:
            where = first_difference(output, expected, "chw")
            if where:
                found.append({"what": "code_bits", **where})
        return found

    def layer_difference(self, index, layer, words):
        """First difference of ``layer``'s output (bank ``words``) from the reference, or None."""
        word_bits = self.host.memory_map.act_word_bits
        actual = layer_output_hwc(layer, words, word_bits)
        expected_map = np.asarray(self.activations[layer.name][index], dtype=np.int64)
        if expected_map.ndim == 1:
            return first_difference(actual, expected_map, "c")
        channels, height, width = expected_map.shape
        actual = actual.reshape(height, width, channels).transpose(2, 0, 1)
        return first_difference(actual, expected_map, "chw")


def _read_memory(handle, count):
    return [int(handle[address].value) for address in range(count)]


async def _watch_layers(dut, checker, index):
    """Debug: while a RUN goes, read each layer's output bank when the next layer starts (and the
    last one's when ``busy`` falls); returns the first mismatching layer's report, or None."""
    engine = dut.engine
    banks = {0: engine.act_a.memory, 1: engine.act_b.memory}
    mm = checker.host.memory_map
    layers = checker.spec.layers()
    word_bits = mm.act_word_bits
    await RisingEdge(engine.busy)
    current = 0
    while current < len(layers):
        await First(engine.layer.value_change, engine.busy.value_change)
        finished = layers[current]
        count = finished.out_channels * finished.out_height * finished.out_width
        words = -(-count // (word_bits // act_slot_bits(stored_bits(finished))))
        bank = banks[mm.placement(finished.name).out_bank]
        where = checker.layer_difference(index, finished, _read_memory(bank, words))
        if where:
            return {"layer": finished.name, "layer_index": current, **where}
        current = int(engine.layer.value) if engine.busy.value else len(layers)
    return None


def _timeout_cycles(spec):
    text = os.environ.get("NQE_COSIM_TIMEOUT_CYCLES")
    if text:
        return int(text)
    word = spec.hardware.weight_word_bits
    ideal = sum(layer.macs / (word // layer.weight_bits) for layer in spec.layers()
                if layer.has_weights)
    # Generous: the first engine needs 2.5-6x the ideal (see rtl/engine.py); a hang fails.
    return int(64 * ideal) + 100_000


@cocotb.test()
async def network_matches_integer_reference(dut):
    """Load the weights folder, then per image: LOAD_IMAGE, RUN, READ_RESULT, READ_COUNTERS;
    every result is compared bit for bit with the integer reference."""
    weights = Path(os.environ["NQE_COSIM_WEIGHTS"])
    images = np.load(os.environ["NQE_COSIM_IMAGES"])
    results_file = Path(os.environ["NQE_COSIM_RESULTS"])
    stalls = parse_stalls(os.environ.get("NQE_COSIM_STALLS", "0"))
    debug = os.environ.get("NQE_COSIM_DEBUG", "0") == "1"
    check_layers = os.environ.get("NQE_COSIM_CHECK_LAYERS", "0") == "1"
    seed = int(os.environ.get("NQE_COSIM_SEED", cocotb.RANDOM_SEED))
    rng = random.Random(seed)

    net = load_weights(weights)
    model_weights = os.environ.get("NQE_COSIM_MODEL_WEIGHTS")
    checker = NetworkChecker(load_weights(model_weights, net.spec) if model_weights else net,
                             images)
    host = checker.host
    run_timeout = _timeout_cycles(net.spec) * CLOCK_PERIOD_NS

    start_clock(dut.clk)
    dut.command__valid.value = 0
    dut.response__ready.value = 0
    await reset(dut.clk, dut.rst)
    link = HostLink(dut, host, stalls, rng)
    link.start()

    def now_cycles():
        return cocotb.utils.get_sim_time("ns") / CLOCK_PERIOD_NS

    started, start_cycles = time.perf_counter(), now_cycles()
    load_frames = []
    loads = host.load_folder(weights)
    # host.load_folder gives the frames back to back; split them to read each one's status.
    position = 0
    while position < len(loads):
        length = int.from_bytes(loads[position + 1:position + 4], "little")
        load_frames.append((loads[position:position + 4 + length], loads[position]))
        position += 4 + length
    statuses = await link.commands(load_frames)
    for (frame, opcode), reply in zip(load_frames, statuses):
        host.check_status(reply[0], f"load opcode {opcode:#04x}")
    load_seconds = time.perf_counter() - started
    load_cycles = now_cycles() - start_cycles
    total_bytes = sum(len(frame) for frame, _ in load_frames)
    dut._log.info(f"weights folder {weights} loaded: {total_bytes} bytes in {load_cycles:.0f} "
                  f"cycles, {load_seconds:.2f} s")

    per_image = []
    for index, image in enumerate(images):
        t0, c0 = time.perf_counter(), now_cycles()
        reply = await link.command(host.load_image(image), "LOAD_IMAGE")
        host.check_status(reply[0], f"image {index}: LOAD_IMAGE")
        t1, c1 = time.perf_counter(), now_cycles()
        watcher = cocotb.start_soon(_watch_layers(dut, checker, index)) if check_layers else None
        reply = await with_timeout(link.command(host.run(), "RUN"), run_timeout, "ns")
        host.check_status(reply[0], f"image {index}: RUN")
        layer_mismatch = await watcher if watcher else None
        t2, c2 = time.perf_counter(), now_cycles()
        class_index, output = host.parse_result(await link.command(host.read_result(),
                                                                   "READ_RESULT"))
        counters = host.parse_counters(await link.command(host.read_counters(),
                                                          "READ_COUNTERS"))
        t3, c3 = time.perf_counter(), now_cycles()
        mismatches = checker.compare(index, class_index, output)
        if layer_mismatch:
            mismatches.insert(0, {"what": "layer_output", **layer_mismatch})
        entry = {
            "index": index, "class_index": None if class_index is None else int(class_index),
            "expected_class_index": (int(np.argmax(checker.logits[index]))
                                     if net.spec.head is not None else None),
            "counters": counters, "mismatches": mismatches,
            "wall_s": {"load_image": t1 - t0, "run": t2 - t1, "read": t3 - t2, "total": t3 - t0},
            "sim_cycles": {"load_image": c1 - c0, "run": c2 - c1, "read": c3 - c2,
                           "total": c3 - c0},
        }
        if mismatches:
            dut._log.error(f"image {index}: MISMATCH {mismatches}")
            if layer_mismatch:
                entry["first_layer_mismatch"] = layer_mismatch
            elif debug:
                entry["first_layer_mismatch"] = await _debug_rerun(dut, link, checker, index,
                                                                   image, run_timeout)
                dut._log.error(f"image {index}: first mismatching layer: "
                               f"{entry['first_layer_mismatch']}")
        per_image.append(entry)
        dut._log.info(f"image {index}: {counters['total']} cycles (MAC-busy {counters['mac']}), "
                      f"RUN {c2 - c1:.0f} sim cycles in {t2 - t1:.3f} s "
                      f"({(c2 - c1) / max(t2 - t1, 1e-9):,.0f} cycles/s), "
                      f"{'OK' if not mismatches else 'MISMATCH'}")

    link.stop()
    results = {
        "spec": net.spec.name, "weights": str(weights), "stalls": stalls, "seed": seed,
        "debug": debug, "check_layers": check_layers,
        "load": {"bytes": total_bytes, "sim_cycles": load_cycles, "wall_s": load_seconds},
        "images": per_image,
    }
    results_file.write_text(json.dumps(results, indent=1) + "\n")


async def _debug_rerun(dut, link, checker, index, image, run_timeout):
    """Run image ``index`` again with the layer watcher; the first layer whose output differs."""
    host = checker.host
    reply = await link.command(host.load_image(image), "LOAD_IMAGE")
    host.check_status(reply[0], f"image {index} (debug rerun): LOAD_IMAGE")
    watcher = cocotb.start_soon(_watch_layers(dut, checker, index))
    reply = await with_timeout(link.command(host.run(), "RUN"), run_timeout, "ns")
    host.check_status(reply[0], f"image {index} (debug rerun): RUN")
    found = await watcher
    if found is None:
        return {"layer": None, "note": "every layer's output bank matched the reference on the "
                                       "rerun: the final read-out path (READ_RESULT / class "
                                       "index) differs"}
    return found
