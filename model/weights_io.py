"""weights/<name>/: the hand-off format between the model and the hardware.

Layout of a weights folder::

    manifest.json            format, the full spec, BSN shifts, per-layer widths, file checksums
    <layer>.weights.bin      weight codes packed exactly as the weight SRAM holds them
                             (contract.pack_codes, OIHW C order, words of hardware.weight_word_bits)
    <layer>.bias.bin         int32 little-endian, one per output channel (contract bias range)
    <layer>.select.bin       mux residual layers only: one byte per output channel, 0 or 1

Loading validates everything against the spec and the contract and fails with one clear error
naming the folder, file, layer and field: a missing file, a checksum mismatch, a wrong shape or
width, an illegal code, a bias or shift out of range.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from . import contract
from .contract import Residual
from .integer_reference import IntegerLayer, IntegerNetwork
from .memory_map import weight_stream, weight_stream_length, weights_from_stream
from .spec import SpecError, load_spec, spec_from_dict

__all__ = ["WeightsError", "FORMAT", "VERSION", "write_weights", "load_weights",
           "export_model", "integer_network_from_model"]

FORMAT = "nqe-weights"
VERSION = 2   # 2: weight files in the tiled stream order (one code per MAC lane, memory_map.weight_stream)


class WeightsError(ValueError):
    """A weights folder does not match the spec or the contract."""


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def write_weights(net, out_dir, meta=None):
    """Write an :class:`IntegerNetwork` to ``out_dir`` (validated first by the contract)."""
    spec = net.spec
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    word_bits = spec.hardware.weight_word_bits
    layers = {}
    for layer in spec.layers():
        if not layer.has_weights:
            continue
        params = net.layers[layer.name]
        where = f"layer {layer.name!r}"
        if tuple(params.codes.shape) != layer.weight_shape:
            raise WeightsError(f"{where}: weight shape {list(params.codes.shape)}, spec expects "
                               f"{list(layer.weight_shape)}")
        lo, hi = layer.bias_bounds(net.shift_of(layer))
        if params.bias.min() < lo or params.bias.max() > hi:
            raise WeightsError(f"{where}: bias outside the contract range [{lo}, {hi}]")
        stream = weight_stream(params.codes, layer, spec.hardware)
        blobs = {"weights": contract.pack_codes(stream, layer.weight_bits, word_bits, where),
                 "bias": params.bias.astype("<i4").tobytes()}
        if layer.residual is Residual.MUX:
            blobs["select"] = np.asarray(params.select, dtype=np.uint8).tobytes()
        files = {}
        for kind, data in blobs.items():
            name = f"{layer.name}.{kind}.bin"
            (out_dir / name).write_bytes(data)
            files[kind] = {"path": name, "bytes": len(data), "sha256": _sha256(data)}
        layers[layer.name] = {
            "kind": layer.kind.value, "weight_bits": layer.weight_bits,
            "weight_shape": list(layer.weight_shape), "shift_group": layer.shift_group,
            "acc_bits": layer.acc_bits, "bias_bits": layer.bias_bits, "files": files,
        }
    manifest = {"format": FORMAT, "version": VERSION, "name": spec.name, "spec": spec.to_dict(),
                "shifts": {g: int(k) for g, k in net.shifts.items()}, "layers": layers,
                "meta": meta or {}}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def _read_file(folder, layer_name, kind, entry, expected_bytes):
    where = f"{folder}: layer {layer_name!r}"
    if not isinstance(entry, dict) or not {"path", "sha256"} <= set(entry):
        raise WeightsError(f"{where}: manifest field 'files.{kind}' must give 'path' and "
                           f"'sha256'")
    path = folder / entry["path"]
    if not path.is_file():
        raise WeightsError(f"{where}: missing file {path.name} (manifest field 'files.{kind}')")
    data = path.read_bytes()
    digest = _sha256(data)
    if digest != entry["sha256"]:
        raise WeightsError(f"{where}: checksum mismatch in {path.name}: sha256 {digest}, "
                           f"manifest says {entry['sha256']}")
    if expected_bytes is not None and len(data) != expected_bytes:
        raise WeightsError(f"{where}: {path.name} holds {len(data)} bytes, the spec needs "
                           f"{expected_bytes}")
    return data


def load_weights(folder, spec=None):
    """Load and validate a weights folder; returns an :class:`IntegerNetwork`.

    ``spec`` (a name, a path or a NetworkSpec), when given, must equal the manifest's spec.
    """
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not folder.is_dir():
        raise WeightsError(f"{folder}: weights folder not found")
    if not manifest_path.is_file():
        raise WeightsError(f"{folder}: missing file manifest.json")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise WeightsError(f"{manifest_path}: not valid JSON: {error}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise WeightsError(f"{manifest_path}: field 'format'/'version' is "
                           f"{manifest.get('format')!r}/{manifest.get('version')!r}, expected "
                           f"{FORMAT!r}/{VERSION}")
    for key in ("spec", "shifts", "layers"):
        if not isinstance(manifest.get(key), dict):
            raise WeightsError(f"{manifest_path}: missing or malformed field {key!r}")
    try:
        file_spec = spec_from_dict(manifest["spec"], source=f"{manifest_path} field 'spec'")
    except SpecError as error:
        raise WeightsError(str(error)) from None
    if spec is not None:
        wanted = load_spec(spec)
        if wanted.to_dict() != file_spec.to_dict():
            raise WeightsError(f"{manifest_path}: the weights were exported for spec "
                               f"{file_spec.name!r}, which differs from the requested spec "
                               f"{wanted.name!r}")
    spec = file_spec

    shifts = {}
    for group, members in spec.shift_groups().items():
        if group not in manifest["shifts"]:
            raise WeightsError(f"{manifest_path}: field 'shifts' has no entry for shift group "
                               f"{group!r} (layers {', '.join(members)})")
        shift = manifest["shifts"][group]
        limit = min(spec.layer(m).max_shift for m in members)
        if not isinstance(shift, int) or isinstance(shift, bool) or not 0 <= shift <= limit:
            raise WeightsError(f"{manifest_path}: field 'shifts.{group}' is {shift!r}, expected "
                               f"an integer in [0, {limit}]")
        shifts[group] = shift
    extra = sorted(set(manifest["shifts"]) - set(shifts))
    if extra:
        raise WeightsError(f"{manifest_path}: field 'shifts' names unknown group(s) "
                           f"{', '.join(extra)}")

    word_bits = spec.hardware.weight_word_bits
    layers = {}
    expected_layers = [layer for layer in spec.layers() if layer.has_weights]
    extra = sorted(set(manifest["layers"]) - {layer.name for layer in expected_layers})
    if extra:
        raise WeightsError(f"{manifest_path}: field 'layers' names unknown layer(s) "
                           f"{', '.join(extra)}")
    for layer in expected_layers:
        where = f"{folder}: layer {layer.name!r}"
        entry = manifest["layers"].get(layer.name)
        if not isinstance(entry, dict):
            raise WeightsError(f"{manifest_path}: field 'layers' has no entry for layer "
                               f"{layer.name!r}")
        shape = entry.get("weight_shape")
        if shape != list(layer.weight_shape):
            raise WeightsError(f"{where}: field 'weight_shape' is {shape}, the spec expects "
                               f"{list(layer.weight_shape)}")
        if entry.get("weight_bits") != layer.weight_bits:
            raise WeightsError(f"{where}: field 'weight_bits' is {entry.get('weight_bits')!r}, "
                               f"the spec expects {layer.weight_bits}")
        files = entry.get("files", {})
        count = weight_stream_length(layer, spec.hardware)
        packed = _read_file(folder, layer.name, "weights", files.get("weights"), None)
        try:
            codes = contract.unpack_codes(packed, layer.weight_bits, word_bits, count,
                                          where=f"{where} ({files['weights']['path']})")
        except contract.ContractError as error:
            raise WeightsError(str(error)) from None
        bias_data = _read_file(folder, layer.name, "bias", files.get("bias"),
                               4 * layer.out_channels)
        bias = np.frombuffer(bias_data, dtype="<i4").astype(np.int64)
        shift = shifts[layer.shift_group] if layer.has_bsn else 0
        lo, hi = layer.bias_bounds(shift)
        bad = np.flatnonzero((bias < lo) | (bias > hi))
        if bad.size:
            raise WeightsError(f"{where}: bias {int(bias[bad[0]])} of channel {int(bad[0])} is "
                               f"outside the contract range [{lo}, {hi}] at shift {shift}")
        select = None
        if layer.residual is Residual.MUX:
            raw = np.frombuffer(_read_file(folder, layer.name, "select", files.get("select"),
                                           layer.out_channels), dtype=np.uint8)
            if (raw > 1).any():
                raise WeightsError(f"{where}: mux select values must be 0 or 1, found "
                                   f"{int(raw.max())}")
            select = raw.astype(bool)
        try:
            weights = weights_from_stream(codes, layer, spec.hardware,
                                          where=f"{where} ({files['weights']['path']})")
        except contract.ContractError as error:
            raise WeightsError(str(error)) from None
        layers[layer.name] = IntegerLayer(layer.name, weights, bias, select)
    return IntegerNetwork(spec, layers, shifts, manifest.get("meta", {}))


def integer_network_from_model(model, meta=None):
    """Read the integer model off a trained fake-quant model (shifts are frozen first)."""
    import torch   # the reference and the loader do not need torch

    model.eval()
    model.freeze_shifts()
    layers = {}
    with torch.no_grad():
        for layer in model.spec.layers():
            if not layer.has_weights:
                continue
            conv = model.conv(layer.name)
            codes = conv.codes().numpy().astype(np.int8)
            bias = conv.bias_codes().numpy().astype(np.int64)
            select = (conv.select_gate > 0).numpy() if conv.select_gate is not None else None
            layers[layer.name] = IntegerLayer(layer.name, codes, bias, select)
    shifts = {group: model.shift_groups[group.replace(".", "_")].shift
              for group in model.spec.shift_groups()}
    return IntegerNetwork(model.spec, layers, shifts, meta or {})


def export_model(model, out_dir, meta=None):
    net = integer_network_from_model(model, meta)
    write_weights(net, out_dir, meta)
    return net


def model_from_integer_network(net):
    """A fake-quant :class:`~nqe.model.network.NQENet` whose eval forward is exactly ``net``.

    Weights are set to the codes with an HEQ step of 1 (so quantizing returns the codes), biases
    to ``b / 2**shift`` (exact in binary floating point) and the shifts are frozen.
    """
    import torch

    from .network import NQENet

    model = NQENet(net.spec)
    with torch.no_grad():
        for group, shift in net.shifts.items():
            model.shift_groups[group.replace(".", "_")].frozen_shift.fill_(shift)
        for layer in net.spec.layers():
            if not layer.has_weights:
                continue
            conv, params = model.conv(layer.name), net.layers[layer.name]
            conv.weight.copy_(torch.from_numpy(params.codes.astype(np.float32)))
            conv.step.fill_(1.0)
            conv.bias_scale_log2.fill_(0)
            conv.bias.copy_(torch.from_numpy(params.bias.astype(np.float64) /
                                             2.0 ** net.shift_of(layer)).float())
            if conv.select_gate is not None:
                conv.select_gate.copy_(torch.from_numpy(np.where(params.select, 1.0, -1.0)))
    return model.eval()
