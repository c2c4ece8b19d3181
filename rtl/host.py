"""Host side of the accelerator, in plain Python: the memory images a run needs (weights, biases,
shifts, mux selects, the image), the activation bank word layout, and the byte protocol of
:mod:`nqe.rtl.top` (command frames out, responses parsed). The cocotb bench and an FPGA serial
bridge reuse it; it imports no Amaranth simulation.

Typical use::

    host = HostProtocol(spec)
    data = host.load_all(net) + host.load_image(image) + host.run() + host.read_result()
    # ... send ``data``, receive ``reply`` (HostProtocol.reply_length(...) bytes) ...
    statuses, result = host.parse_run_reply(reply)

The activation bank layout is defined in :mod:`nqe.model.memory_map` (HWC order, slots of
``act_slot_bits(bits)`` bits, ``act_word_bits`` words); :func:`pack_elements` and
:func:`unpack_elements` are its two directions.
"""

import numpy as np

from nqe.model import contract
from nqe.model.memory_map import act_slot_bits, build_memory_map, stored_bits
from nqe.model.weights_io import load_weights
from nqe.model.spec import Residual
from nqe.rtl.sram import bias_image, weight_image

__all__ = ["HostProtocol", "ProtocolError", "hwc", "pack_elements", "unpack_elements", "shift_image", "select_image",
           "image_elements", "memory_images", "layer_output_hwc"]


def hwc(array):
    """[C, H, W] (or [C]) -> flat HWC element order."""
    array = np.asarray(array, dtype=np.int64)
    if array.ndim == 1:
        return array
    return array.transpose(1, 2, 0).reshape(-1)


def pack_elements(values, bits, word_bits):
    """Elements (HWC order, signed allowed) -> activation bank words, slot-packed."""
    slot = act_slot_bits(bits)
    per = word_bits // slot
    mask = (1 << slot) - 1
    words = []
    values = [int(v) for v in values]
    for start in range(0, len(values), per):
        word = 0
        for i, v in enumerate(values[start:start + per]):
            word |= (v & mask) << (i * slot)
        words.append(word)
    return words


def unpack_elements(words, count, bits, word_bits, signed=False):
    """Inverse of :func:`pack_elements`: ``count`` elements (``signed``: two's complement)."""
    slot = act_slot_bits(bits)
    per = word_bits // slot
    mask = (1 << slot) - 1
    out = []
    for index in range(count):
        v = (int(words[index // per]) >> ((index % per) * slot)) & mask
        if signed and v >> (slot - 1):
            v -= 1 << slot
        out.append(v)
    return np.array(out, dtype=np.int64)


def image_elements(image, spec):
    """One uint8 image, [H, W, C] (NHWC without N) -> HWC elements, checked against the spec."""
    image = np.asarray(image)
    shape = (spec.input_height, spec.input_width, spec.input_channels)
    if image.dtype != np.uint8 or image.shape != shape:
        raise ValueError(f"image must be uint8 {list(shape)} (HWC), got {image.dtype} "
                         f"{list(image.shape)}")
    return image.reshape(-1).astype(np.int64)


def shift_image(net):
    """Shift table: one shift per shift group, in the memory map's order."""
    return [int(net.shifts[group]) for group in net.spec.shift_groups()]


def select_image(net):
    """Mux-select bits, each mux layer's from its ``select_base``."""
    memory_map = build_memory_map(net.spec)
    bits = [0] * memory_map.select_bits
    for layer in net.spec.layers():
        if layer.residual is Residual.MUX:
            base = memory_map.placement(layer.name).select_base
            for channel, sel in enumerate(net.layers[layer.name].select):
                bits[base + channel] = int(bool(sel))
    return bits


def memory_images(net):
    """{'weights', 'biases', 'shifts', 'selects'}: the word lists the host loads."""
    return {"weights": weight_image(net), "biases": bias_image(net),
            "shifts": shift_image(net), "selects": select_image(net)}


def layer_output_hwc(layer, words, word_bits):
    """A layer's output map from its bank words (HWC elements; logits signed)."""
    count = layer.out_channels * layer.out_height * layer.out_width
    return unpack_elements(words, count, stored_bits(layer), word_bits,
                           signed=not layer.out_bits)


class ProtocolError(RuntimeError):
    """The accelerator answered with an error status, or a reply has the wrong length."""


# Kept equal to nqe.rtl.top.Opcode / Status (tested); plain ints so no Amaranth is imported.
OPCODES = {"LOAD_WEIGHTS": 0x01, "LOAD_BIASES": 0x02, "LOAD_SHIFTS": 0x03, "LOAD_SELECTS": 0x04,
           "LOAD_IMAGE": 0x05, "RUN": 0x06, "READ_RESULT": 0x07, "READ_COUNTERS": 0x08,
           "READ_STATUS": 0x09}
STATUSES = {0x00: "OK", 0x01: "UNKNOWN_OPCODE", 0x02: "BAD_LENGTH", 0x03: "NOT_LOADED"}
LENGTH_BYTES = 3
COUNTER_BYTES = 4


def _words_bytes(words, bits):
    nbytes = contract.word_bytes(bits)
    return b"".join((int(w) & ((1 << (8 * nbytes)) - 1)).to_bytes(nbytes, "little")
                    for w in words)


class HostProtocol:
    """Command frames and reply parsing for one spec (see :mod:`nqe.rtl.top`)."""

    def __init__(self, spec):
        self.spec = spec
        self.memory_map = build_memory_map(spec)
        self.layers = spec.layers()

    @staticmethod
    def frame(opcode, payload=b""):
        """One command: opcode, 3-byte little-endian length, payload."""
        opcode = OPCODES[opcode] if isinstance(opcode, str) else int(opcode)
        payload = bytes(payload)
        if len(payload) >= 1 << (8 * LENGTH_BYTES):
            raise ProtocolError(f"payload of {len(payload)} bytes exceeds the length field")
        return bytes([opcode]) + len(payload).to_bytes(LENGTH_BYTES, "little") + payload

    def load_all(self, net):
        """LOAD_WEIGHTS, LOAD_BIASES, LOAD_SHIFTS and LOAD_SELECTS (those the spec has)."""
        if net.spec.to_dict() != self.spec.to_dict():
            raise ProtocolError(f"the network was built for spec {net.spec.name!r}, not "
                                f"{self.spec.name!r}")
        mm = self.memory_map
        images = memory_images(net)
        out = self.frame("LOAD_WEIGHTS", _words_bytes(images["weights"], mm.weight_word_bits))
        out += self.frame("LOAD_BIASES", _words_bytes(images["biases"], mm.bias_word_bits))
        if mm.shift_entries:
            out += self.frame("LOAD_SHIFTS", _words_bytes(images["shifts"],
                                                          max(mm.shift_bits, 1)))
        if mm.select_bits:
            out += self.frame("LOAD_SELECTS", bytes(images["selects"]))
        return out

    def load_folder(self, folder):
        """:meth:`load_all` for an exported weights folder (validated by ``load_weights``)."""
        return self.load_all(load_weights(folder, self.spec))

    def load_image(self, image):
        """LOAD_IMAGE of one uint8 [H, W, C] image."""
        return self.frame("LOAD_IMAGE", bytes(image_elements(image, self.spec).astype(np.uint8)))

    def run(self):
        return self.frame("RUN")

    def read_result(self):
        return self.frame("READ_RESULT")

    def read_counters(self):
        return self.frame("READ_COUNTERS")

    def read_status(self):
        return self.frame("READ_STATUS")

    @property
    def result_word_bits(self):
        return self.memory_map.act_word_bits

    @property
    def result_words(self):
        last = self.layers[-1]
        per = self.result_word_bits // act_slot_bits(stored_bits(last))
        return -(-last.out_channels * last.out_height * last.out_width // per)

    def reply_length(self, opcode, status=0):
        """Bytes the accelerator answers ``opcode`` with (given its status)."""
        opcode = OPCODES[opcode] if isinstance(opcode, str) else int(opcode)
        if status:
            return 1
        if opcode == OPCODES["READ_RESULT"]:
            return (1 + (1 if self.spec.head else 0)
                    + self.result_words * (self.result_word_bits // 8))
        if opcode == OPCODES["READ_COUNTERS"]:
            return 1 + COUNTER_BYTES * (2 + len(self.layers))
        if opcode == OPCODES["READ_STATUS"]:
            return 2
        return 1

    @staticmethod
    def check_status(byte, what):
        if byte:
            raise ProtocolError(f"{what}: accelerator status {STATUSES.get(byte, hex(byte))}")

    def parse_result(self, reply):
        """READ_RESULT reply -> (class index or None, output): the logits (int64 [classes]), or
        the bottleneck's code bits as [C, H, W] (the reference's layout) without a head."""
        if len(reply) != self.reply_length("READ_RESULT", reply[:1] and reply[0]):
            raise ProtocolError(f"READ_RESULT reply of {len(reply)} bytes, expected "
                                f"{self.reply_length('READ_RESULT')}")
        self.check_status(reply[0], "READ_RESULT")
        body = reply[1:]
        index = None
        if self.spec.head:
            index, body = body[0], body[1:]
        nbytes = self.result_word_bits // 8
        words = [int.from_bytes(body[i:i + nbytes], "little") for i in range(0, len(body), nbytes)]
        last = self.layers[-1]
        values = layer_output_hwc(last, words, self.result_word_bits)
        if self.spec.head:
            return index, values
        return None, values.reshape(last.out_height, last.out_width,
                                    last.out_channels).transpose(2, 0, 1)

    def parse_counters(self, reply):
        """READ_COUNTERS reply -> {'total', 'mac', 'layers': {name: cycles}}."""
        if len(reply) != self.reply_length("READ_COUNTERS"):
            raise ProtocolError(f"READ_COUNTERS reply of {len(reply)} bytes, expected "
                                f"{self.reply_length('READ_COUNTERS')}")
        self.check_status(reply[0], "READ_COUNTERS")
        values = [int.from_bytes(reply[1 + 4 * i:5 + 4 * i], "little")
                  for i in range(2 + len(self.layers))]
        return {"total": values[0], "mac": values[1],
                "layers": {layer.name: v for layer, v in zip(self.layers, values[2:])}}
