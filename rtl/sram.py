"""On-chip SRAM banks of the layer-sequential engine, sized from the spec's memory map, and their
initial images built from the exported weights with the contract's one packer."""

import json
import operator
from dataclasses import dataclass
from pathlib import Path

from amaranth import *
from amaranth.lib import memory, wiring
from amaranth.lib.wiring import Out
from amaranth.utils import ceil_log2

from nqe.model import contract
from nqe.model.memory_map import build_memory_map, weight_stream
from nqe.model.weights_io import load_weights

__all__ = ["Bank", "BankGeometry", "bank_geometries", "build_banks", "words_from_bytes",
           "bytes_from_words", "weight_image", "weight_image_from_folder", "bias_image"]


class Bank(wiring.Component):
    """One SRAM bank: ``depth`` words of ``width`` bits, one synchronous read port, one write port.

    Latency: read data appears 1 cycle after the address is presented with ``read.en`` high (and
    holds while ``read.en`` is low); a write takes effect at the clock edge. Throughput: one read
    and one write a cycle. A read of the address being written in the same cycle returns the old
    word: the read port is not transparent, so no bypass logic is needed on any target memory.

    Parameters
    ----------
    width, depth : int
        Word width and word count (see :func:`bank_geometries`).
    init : sequence of int
        Initial words (at most ``depth``; the rest are zero). The iCE40's SPRAM has no initial
        contents, so on that target the same image is written through ``write`` at run time.

    Members
    -------
    read : Out(memory.ReadPort.Signature(addr_width=ceil_log2(depth), shape=unsigned(width)))
        ``en`` and ``addr`` in, ``data`` out.
    write : Out(memory.WritePort.Signature(addr_width=ceil_log2(depth), shape=unsigned(width)))
        ``en``, ``addr`` and ``data`` in.
    """

    def __init__(self, width, depth, init=()):
        width = operator.index(width)
        depth = operator.index(depth)
        if width < 1:
            raise ValueError(f"width must be a positive integer, got {width}")
        if depth < 1:
            raise ValueError(f"depth must be a positive integer, got {depth}")
        init = [operator.index(word) for word in init]
        if len(init) > depth:
            raise ValueError(f"init holds {len(init)} words, more than the depth {depth}")
        for address, word in enumerate(init):
            if not 0 <= word < 1 << width:
                raise ValueError(f"init word {word} at address {address} does not fit "
                                 f"{width} unsigned bits")
        self._width, self._depth, self._init = width, depth, init
        addr_width = ceil_log2(depth)
        super().__init__({
            "read": Out(memory.ReadPort.Signature(addr_width=addr_width, shape=unsigned(width))),
            "write": Out(memory.WritePort.Signature(addr_width=addr_width,
                                                    shape=unsigned(width))),
        })

    @property
    def width(self):
        return self._width

    @property
    def depth(self):
        return self._depth

    @property
    def init(self):
        return tuple(self._init)

    def elaborate(self, platform):
        m = Module()
        m.submodules.memory = storage = memory.Memory(shape=unsigned(self._width),
                                                      depth=self._depth, init=self._init)
        write_port = storage.write_port()
        read_port = storage.read_port()
        wiring.connect(m, wiring.flipped(self.write), write_port)
        wiring.connect(m, wiring.flipped(self.read), read_port)
        return m


@dataclass(frozen=True)
class BankGeometry:
    width: int
    depth: int

    @property
    def bits(self):
        return self.width * self.depth


def bank_geometries(spec, act_word_bits=None):
    """Width and depth of each bank the spec needs, from :func:`build_memory_map`.

    * ``weights``: one packed weight word (``hardware.weight_word_bits``) per address.
    * ``biases``: one bias per address, as wide as the widest layer's bias.
    * ``act_a``, ``act_b`` (ping-pong) and ``residual``: words of ``act_word_bits`` (by default
      the weight word width: one word then holds the 3-bit activations of the MAC array's 3b lanes),
      deep enough for the largest map the memory map places there.

    Banks the spec does not need (no residual block) are left out.
    """
    memory_map = build_memory_map(spec)
    if act_word_bits is None:
        act_word_bits = memory_map.weight_word_bits
    act_word_bits = operator.index(act_word_bits)
    if act_word_bits < 1:
        raise ValueError(f"act_word_bits must be a positive integer, got {act_word_bits}")

    def act_depth(bits):
        return -(-bits // act_word_bits)

    sizes = {
        "weights": BankGeometry(memory_map.weight_word_bits, memory_map.weight_words),
        "biases": BankGeometry(memory_map.bias_word_bits, memory_map.bias_words),
        "act_a": BankGeometry(act_word_bits, act_depth(memory_map.bank_bits[0])),
        "act_b": BankGeometry(act_word_bits, act_depth(memory_map.bank_bits[1])),
        "residual": BankGeometry(act_word_bits, act_depth(memory_map.residual_bits)),
    }
    return {name: size for name, size in sizes.items() if size.depth and size.width}


def build_banks(spec, net=None, act_word_bits=None):
    """A :class:`Bank` per entry of :func:`bank_geometries`; with an
    :class:`~nqe.model.integer_reference.IntegerNetwork`, weights and biases get their images."""
    images = {}
    if net is not None:
        if net.spec.to_dict() != spec.to_dict():
            raise ValueError(f"the network was built for spec {net.spec.name!r}, not for "
                             f"{spec.name!r}")
        images = {"weights": weight_image(net), "biases": bias_image(net)}
    return {name: Bank(size.width, size.depth, images.get(name, ()))
            for name, size in bank_geometries(spec, act_word_bits).items()}


def words_from_bytes(data, word_bits):
    """Packed bytes -> words: each word ``contract.word_bytes(word_bits)`` bytes, little-endian
    (the layout :func:`nqe.model.contract.pack_codes` writes)."""
    nbytes = contract.word_bytes(word_bits)
    if len(data) % nbytes:
        raise ValueError(f"{len(data)} bytes are not a whole number of {word_bits}-bit words "
                         f"({nbytes} bytes each)")
    return [int.from_bytes(data[i:i + nbytes], "little") for i in range(0, len(data), nbytes)]


def bytes_from_words(words, word_bits):
    """Inverse of :func:`words_from_bytes`."""
    nbytes = contract.word_bytes(word_bits)
    return b"".join(int(word).to_bytes(nbytes, "little") for word in words)


def _place(memory_map, layer_words):
    """The whole weight SRAM: each layer's words at its base address, gaps zero."""
    image = [0] * memory_map.weight_words
    for name, words in layer_words.items():
        placement = memory_map.placement(name)
        if len(words) != placement.weight_words:
            raise ValueError(f"layer {name!r}: {len(words)} weight words, the memory map "
                             f"places {placement.weight_words}")
        image[placement.weight_base:placement.weight_base + len(words)] = words
    return image


def weight_image(net):
    """Weight SRAM image (list of words) of an integer network, packed by the contract's packer
    in the memory map's stream order: what the exporter writes, as words."""
    spec = net.spec
    word_bits = spec.hardware.weight_word_bits
    layer_words = {}
    for layer in spec.layers():
        if not layer.has_weights:
            continue
        stream = weight_stream(net.layers[layer.name].codes, layer, spec.hardware)
        packed = contract.pack_codes(stream, layer.weight_bits, word_bits,
                                     where=f"layer {layer.name!r}")
        layer_words[layer.name] = words_from_bytes(packed, word_bits)
    return _place(build_memory_map(spec), layer_words)


def weight_image_from_folder(folder, spec=None):
    """Weight SRAM image from an exported weights folder, byte for byte the exporter's files.

    The folder is first validated in full by :func:`nqe.model.weights_io.load_weights`
    (checksums, shapes, legal codes, padding), so the bytes placed here are known good.
    """
    folder = Path(folder)
    net = load_weights(folder, spec)
    manifest = json.loads((folder / "manifest.json").read_text())
    word_bits = net.spec.hardware.weight_word_bits
    layer_words = {}
    for name, entry in manifest["layers"].items():
        data = (folder / entry["files"]["weights"]["path"]).read_bytes()
        layer_words[name] = words_from_bytes(data, word_bits)
    return _place(build_memory_map(net.spec), layer_words)


def bias_image(net):
    """Bias SRAM image: each layer's biases from its base address, two's complement in the
    memory map's bias word width."""
    memory_map = build_memory_map(net.spec)
    bits = memory_map.bias_word_bits
    mask = (1 << bits) - 1
    image = [0] * memory_map.bias_words
    for layer in net.spec.layers():
        if not layer.has_weights:
            continue
        placement = memory_map.placement(layer.name)
        for channel, bias in enumerate(net.layers[layer.name].bias):
            if not -(1 << (bits - 1)) <= int(bias) < 1 << (bits - 1):
                raise ValueError(f"layer {layer.name!r}: bias {int(bias)} of channel {channel} "
                                 f"does not fit the {bits}-bit bias word")
            image[placement.bias_base + channel] = int(bias) & mask
    return image
