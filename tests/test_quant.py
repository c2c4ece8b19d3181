"""Training-time quantizers: HEQ level equalization, BSN shift groups, straight-through grads."""

import numpy as np
import pytest
import torch

from nqe.model import contract
from nqe.model.integer_reference import run_reference
from nqe.model.network import NQENet
from nqe.model.quant import QuantConv, _FloorAddClamp, _ste, heq_codes, heq_step
from nqe.model.random_spec import random_spec
from nqe.model.spec import Residual, load_spec
from nqe.model.weights_io import integer_network_from_model


def _laplace(u):
    centred = u - 0.5
    return (-torch.sign(centred) * torch.log1p(-2 * centred.abs())).float()


@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("distribution", ["normal", "laplace", "uniform"])
def test_heq_uses_levels_equally(bits, distribution):
    gen = torch.Generator().manual_seed(bits)
    w = {"normal": lambda: torch.randn(40000, generator=gen),
         # Laplace by inverse CDF from the seeded generator (the global RNG made it order-dependent)
         "laplace": lambda: _laplace(torch.rand(40000, generator=gen, dtype=torch.float64)),
         "uniform": lambda: torch.rand(40000, generator=gen) * 2 - 1}[distribution]()
    codes = heq_codes(w, heq_step(w, bits), bits)
    levels = contract.legal_codes(bits)
    assert set(codes.unique().int().tolist()) <= set(levels)
    shares = np.array([(codes == c).float().mean().item() for c in levels])
    # Equal usage is 1/L. One linear step cannot hit every quantile of a heavy-tailed
    # distribution (Laplace: q(0.6)/q(0.2) = 4.1, the 5-level quantizer's thresholds are 1:3), so
    # the least-squares fit leaves up to ~0.056 there; it stays within 0.06 on all three.
    assert np.abs(shares - 1 / len(levels)).max() < 0.06, shares
    # Far closer to equal than a min-max step (max|w| / top code) on the same weights.
    naive = heq_codes(w, w.abs().max() / max(max(levels), 1), bits)
    naive_shares = np.array([(naive == c).float().mean().item() for c in levels])
    assert np.abs(shares - 1 / len(levels)).max() <= np.abs(naive_shares - 1 / len(levels)).max()


def test_straight_through_gradients_reach_every_parameter():
    spec = random_spec(3)
    torch.manual_seed(0)
    model = NQENet(spec)
    images = torch.randint(0, 256, (8, 3, spec.input_height, spec.input_width))
    model.calibrate(images)
    model.train()
    loss = model.scaled_logits(model(images)).logsumexp(1).mean()
    loss.backward()
    for name, p in model.named_parameters():
        if name.endswith("select_gate"):
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n.endswith(".weight"))


@pytest.mark.parametrize("top", [1.0, 3.0, 7.0])
@pytest.mark.parametrize("with_skip", [False, True])
def test_fused_floor_add_clamp_equals_its_definition_bit_for_bit(top, with_skip):
    """Values and gradients of the fused activation equal the straight-through floor followed by
    the clamp it replaces, at the edges too: exact integers, just below and above them, the
    clamp's bounds, negative fractions and large magnitudes."""
    g = torch.Generator().manual_seed(int(top) * 2 + with_skip)
    edges = torch.tensor([-1.0, -0.5, -1e-7, 0.0, 1e-7, 0.5, top - 1e-6, top, top + 1e-6,
                          top + 0.5, top + 1.0, -3e6, 3e6])
    near = torch.cat([edges, torch.arange(-4.0, top + 4.0).repeat_interleave(3) +
                      torch.tensor([-1e-6, 0.0, 1e-6]).repeat(int(top) + 8)])
    real = torch.cat([near, torch.randn(4096 - len(near), generator=g) * (top + 2)])
    real = real.reshape(16, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    skip = torch.randint(0, int(top) + 1, real.shape, generator=g).float() if with_skip else None
    grad = torch.randn(real.shape, generator=g)
    results = []
    for fused in (True, False):
        leaf_real = real.clone().requires_grad_()
        leaf_skip = skip.clone().requires_grad_() if with_skip else None
        if fused:
            out = _FloorAddClamp.apply(leaf_real, leaf_skip, top)
        else:
            y = _ste(leaf_real, torch.floor(leaf_real), True)
            out = torch.clamp(y + leaf_skip if with_skip else y, 0.0, top)
        out.backward(grad)
        results.append([out.detach(), leaf_real.grad] + ([leaf_skip.grad] if with_skip else []))
        assert out.stride() == real.stride()
    for fused, reference in zip(*results):
        assert torch.equal(fused, reference)
        assert torch.equal(fused.view(torch.int32), reference.view(torch.int32))  # signs of 0
    assert 0 < int((results[0][1] == 0).sum()) < real.numel()      # the clamp clipped some


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 13, 23, 29, 33, "nqe-1mb"])
def test_training_step_with_the_fused_activation_equals_the_unfused_one(seed, monkeypatch):
    """Whole networks (random specs, several with residual adds, and the default spec; BatchNorm
    and BSN phases, bf16 autocast as in training): the same logits and the same gradient on every
    parameter, bit for bit."""
    spec = load_spec(seed) if seed == "nqe-1mb" else random_spec(seed)
    seed = 4 if seed == "nqe-1mb" else seed          # BatchNorm phase, bf16: the long run
    images = torch.randint(0, 256, (8, 3, spec.input_height, spec.input_width),
                           generator=torch.Generator().manual_seed(seed)).float()
    results = []
    for fuse in (True, False):
        monkeypatch.setattr(QuantConv, "fuse_activation", fuse)
        torch.manual_seed(seed)
        model = NQENet(spec, batch_norm=seed % 2 == 0)
        model.calibrate(images)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=seed % 4 < 2):
            logits = model(images)
        model.scaled_logits(logits).logsumexp(1).mean().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (fused_logits, fused_grads), (logits, grads) = results
    assert torch.equal(fused_logits, logits)
    assert fused_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert (grad is None) == (fused_grads[name] is None), name
        assert grad is None or torch.equal(fused_grads[name], grad), name
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_frozen_shifts_do_not_move():
    spec = random_spec(5)
    model = NQENet(spec)
    images = torch.randint(0, 256, (8, 3, spec.input_height, spec.input_width))
    model.calibrate(images)
    model.freeze_shifts()
    before = {k: g.shift for k, g in model.shift_groups.items()}
    model.train()
    model(images * 0 + 255)
    assert {k: g.shift for k, g in model.shift_groups.items()} == before


def _random_specs_covering_every_feature(count=60):
    seeds, seen = [], set()
    for seed in range(count):
        spec = random_spec(seed)
        seeds.append(seed)
        for layer in spec.layers():
            seen.add(("residual", layer.residual))
            seen.add(("weight_bits", layer.weight_bits))
            seen.add(("out_bits", layer.out_bits))
        seen.add(("bottleneck", spec.bottleneck is not None))
    required = {("residual", r) for r in Residual} | {("weight_bits", b) for b in (1, 2, 3)} | \
        {("out_bits", b) for b in (1, 2, 3)} | {("bottleneck", True)}
    assert required <= seen, required - seen
    return seeds


@pytest.mark.parametrize("seed", _random_specs_covering_every_feature())
def test_trained_style_model_exports_to_identical_integer_logits(seed):
    """Calibrated fake-quant model (real HEQ weights, BSN biases) vs its exported integer net."""
    spec = random_spec(seed)
    torch.manual_seed(seed)
    model = NQENet(spec)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (32, spec.input_height, spec.input_width, 3), dtype=np.uint8)
    batch = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    model.calibrate(batch)
    with torch.no_grad():           # make MUX gates mixed, as training would
        for conv in model.convs.values():
            if conv.select_gate is not None:
                conv.select_gate.copy_(torch.randn(conv.select_gate.shape))
    net = integer_network_from_model(model)
    with torch.no_grad():
        fake, fake_acts = model(batch, return_activations=True)
    ref, ref_acts = run_reference(net, images, return_activations=True)
    for name in ref_acts:
        assert (fake_acts[name].numpy() == ref_acts[name]).all(), f"seed {seed}, layer {name}"
    assert (fake.numpy() == ref).all(), f"seed {seed}"


def _batchnorm_phase_model(seed):
    """A random spec's model with BatchNorm statistics as a BatchNorm phase would leave them."""
    spec = random_spec(seed)
    torch.manual_seed(seed)
    model = NQENet(spec, batch_norm=True)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (32, spec.input_height, spec.input_width, 3), dtype=np.uint8)
    batch = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    model.calibrate(batch)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(batch)
    return model, images, batch


@pytest.mark.parametrize("seed", range(8))
def test_sequential_fold_measures_each_layer_through_the_folded_layers(seed, monkeypatch):
    """Before a layer folds, its BatchNorm statistics are those of its accumulator on the given
    images with every earlier layer already in its integer (BSN) form."""
    from nqe.model.quant import QuantConv
    model, _, batch = _batchnorm_phase_model(seed)
    layers = list(model.spec.layers())
    checked, original = [], QuantConv.fold_norm

    def checking_fold_norm(conv):
        index = next(i for i, layer in enumerate(layers) if layer is conv.layer)
        with torch.no_grad():
            _, acts = model.eval()(batch, return_activations=True)
            upstream = acts[layers[index - 1].name] if index else batch.float()
            assert not any(model.conv(layer.name).in_norm_phase
                           for layer in layers[:index] if layer.has_bsn)
            acc = conv.accumulate(upstream)
        assert torch.allclose(conv.norm.running_mean, acc.mean(dim=(0, 2, 3)),
                              rtol=1e-5, atol=1e-4), conv.layer.name
        assert torch.allclose(conv.norm.running_var, acc.var(dim=(0, 2, 3)),
                              rtol=1e-4, atol=1e-4), conv.layer.name
        checked.append(conv.layer.name)
        return original(conv)

    monkeypatch.setattr(QuantConv, "fold_norm", checking_fold_norm)
    model.fold_batch_norm(batch, batch_size=len(batch))
    assert checked == [layer.name for layer in layers if layer.has_bsn], f"seed {seed}"
    assert model.shifts_frozen and not model.has_unfolded_norm


def _fold_sequentially_by_definition(model, images, batch_size):
    """The sequential fold as first written: each layer measured through a forward from the
    images up to it (quadratic in the depth); the oracle for the cached version."""
    from nqe.model.network import _key

    model.train()
    for layer in model.spec.layers():
        conv = model.convs[_key(layer.name)] if _key(layer.name) in model.convs else None
        if conv is None or not conv.in_norm_phase:
            continue
        momentum = conv.norm.momentum
        conv.norm.reset_running_stats()
        conv.norm.momentum = None
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                model(images[start:start + batch_size], until=layer.name)
            conv.norm.momentum = momentum
            model._fold_measured(conv)


@pytest.mark.parametrize("seed", _random_specs_covering_every_feature())
def test_sequential_fold_equals_its_layer_by_layer_definition_bit_for_bit(seed):
    """The fold keeps each batch's activations between layers instead of running the network
    again up to every layer: the folded model must be the same, every tensor bit for bit."""
    cached, _, batch = _batchnorm_phase_model(seed)
    oracle, _, _ = _batchnorm_phase_model(seed)
    with torch.no_grad():                   # as an optimizer step would: HEQ steps now stale
        for model in (cached, oracle):
            for conv in model.convs.values():
                conv.weight.mul_(0.9)
    cached.fold_batch_norm(batch, batch_size=12)           # 32 images: batches 12, 12, 8
    _fold_sequentially_by_definition(oracle, batch, batch_size=12)
    assert cached.state_dict().keys() == oracle.state_dict().keys()
    for name, value in oracle.state_dict().items():
        assert torch.equal(cached.state_dict()[name], value), f"seed {seed}, {name}"


@pytest.mark.parametrize("fold", ["at-once", "sequential"])
@pytest.mark.parametrize("seed", _random_specs_covering_every_feature())
def test_folded_batchnorm_model_exports_to_identical_integer_logits(seed, fold):
    """After a BatchNorm phase, fold_batch_norm gives a BSN model: shifts frozen, no BatchNorm
    left in the forward, and its exported integer net computes exactly its eval forward."""
    model, images, batch = _batchnorm_phase_model(seed)
    assert model.has_unfolded_norm
    model.fold_batch_norm(batch if fold == "sequential" else None, batch_size=16)
    assert not model.has_unfolded_norm and model.shifts_frozen
    model.train()
    with torch.no_grad():
        model(batch)                            # a BSN training step leaves the statistics alone
    # At once: the phase's 3 batches plus the calibration one; sequential: measured again on
    # the two halves of the batch.
    assert all(conv.norm is None or conv.norm.num_batches_tracked == (4 if fold == "at-once"
                                                                        else 2)
               for conv in model.convs.values())
    net = integer_network_from_model(model)
    with torch.no_grad():
        fake = model.eval()(batch)
    assert (fake.numpy() == run_reference(net, images)).all(), f"seed {seed}"


@pytest.mark.parametrize("seed", _random_specs_covering_every_feature(12))
def test_folded_model_trains_on_the_exact_integer_forward_under_bf16_autocast(seed):
    """A bf16 convolution keeps 8 significant bits of its accumulator; the BSN phase's training
    forward (``--bf16``) must still be the integer reference's, layer by layer, or it optimizes
    a network that is not the one exported."""
    model, images, batch = _batchnorm_phase_model(seed)
    model.fold_batch_norm(batch, batch_size=16)
    net = integer_network_from_model(model)
    ref, ref_acts = run_reference(net, images, return_activations=True)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            fake, fake_acts = model(batch, return_activations=True)
        for name in ref_acts:
            assert (fake_acts[name].float().numpy() == ref_acts[name]).all(), \
                f"seed {seed}, {mode} mode, layer {name}"
        assert (fake.float().numpy() == ref).all(), f"seed {seed}, {mode} mode"


def _folded_model(seed):
    model, images, batch = _batchnorm_phase_model(seed)
    model.fold_batch_norm(batch, batch_size=16)
    return model.eval(), batch


def _widened(spec):
    """The spec with every activation one bit wider (capped at 3): same layers, same shapes."""
    from nqe.model.spec import spec_from_dict
    data = spec.to_dict()
    data["name"] = spec.name + "-wide"
    data["stem"]["act_bits"] = min(data["stem"]["act_bits"] + 1, 3)
    for block in data["blocks"]:
        block["act_bits"] = [min(b + 1, 3) for b in block["act_bits"]]
    return spec_from_dict(data, source="widened test spec")


def _widenable_seeds(count=6):
    """Random specs whose widened variant differs and is legal (an OR residual stays binary)."""
    from nqe.model.spec import SpecError
    seeds = []
    for seed in range(100):
        try:
            wide = _widened(random_spec(seed))
        except SpecError:
            continue
        if [layer.out_bits for layer in wide.layers()] == \
                [layer.out_bits for layer in random_spec(seed).layers()]:
            continue                            # already 3 bits everywhere
        seeds.append(seed)
        if len(seeds) == count:
            return seeds
    raise AssertionError(f"only {len(seeds)} widenable specs among seeds 0..99")


@pytest.mark.parametrize("seed", _widenable_seeds())
@pytest.mark.parametrize("widen", [False, True])
def test_warm_start_batchnorm_reproduces_the_source_bsn_layers(seed, widen):
    """Fed the source's own input, each warm-started layer's BatchNorm output equals the source's
    BSN pre-activation (acc + b) / 2**k, rescaled to the new output range."""
    source, batch = _folded_model(seed)
    spec = _widened(source.spec) if widen else source.spec
    model = NQENet(spec, batch_norm=True)
    model.warm_start(source, batch, batch_size=len(batch))
    with torch.no_grad():
        _, acts = source(batch, return_activations=True)
        layers = list(source.spec.layers())
        checked = 0
        for index, layer in enumerate(layers):
            if not layer.has_bsn:
                continue
            upstream = acts[layers[index - 1].name] if index else batch.float()
            theirs = source.conv(layer.name)
            acc = theirs.accumulate(upstream)
            expected = (acc + theirs.bias_codes().view(1, -1, 1, 1)) / 2.0 ** theirs.shift
            ratio = ((1 << spec.layer(layer.name).out_bits) - 1) / ((1 << layer.out_bits) - 1)
            if not widen and index == 0:
                assert ratio == 1
            mine = model.conv(layer.name)
            assert torch.equal(mine.weight, theirs.weight)
            norm = mine.norm.train()          # batch statistics: those the warm start measured
            got = norm(mine.accumulate(upstream))
            spread = float(expected.std()) * ratio + 1e-3
            assert torch.allclose(got, expected * ratio, atol=1e-4 * spread, rtol=1e-4), \
                f"seed {seed}, layer {layer.name}"
            checked += 1
    assert checked == sum(layer.has_bsn for layer in layers)
    assert model.has_unfolded_norm and not model.shifts_frozen


def test_warm_start_refuses_other_shapes_and_unfolded_sources():
    source, batch = _folded_model(1)
    other = random_spec(2)
    with pytest.raises(ValueError, match=r"warm start: layer '.*' (has no counterpart|.*shape)"):
        NQENet(other, batch_norm=True).warm_start(source, batch)
    unfolded, _, _ = _batchnorm_phase_model(1)
    with pytest.raises(ValueError, match="still in its BatchNorm phase"):
        NQENet(source.spec, batch_norm=True).warm_start(unfolded, batch)
    with pytest.raises(ValueError, match="batch_norm=True"):
        NQENet(source.spec).warm_start(source, batch)


@pytest.mark.parametrize("layer, bits", [("b1.pw1", 2), ("b1.gw", 3), ("b4.pw2", 1)])
def test_oscillation_penalty_pulls_weights_to_the_middle_of_their_bins(layer, bits):
    """--dampen: zero for weights on their codes; beside a rounding threshold its gradient moves
    a weight toward the code it rounds to; past the top code, and for sign weights, nothing."""
    net = NQENet(load_spec("model/specs/ablations/nqe-1mb-b7-pw2bin.json"))
    conv = net.conv(layer)
    assert conv.bits == bits
    top = max(contract.legal_codes(bits))
    gen = torch.Generator().manual_seed(bits)
    conv.step.fill_(0.25)                   # a power of two: codes * step / step is exact
    with torch.no_grad():
        conv.weight.copy_(torch.randint(-top, top + 1, conv.weight.shape, generator=gen) * 0.25)
    assert conv.oscillation_penalty().item() == 0.0
    if bits == 1:
        with torch.no_grad():
            conv.weight.view(-1)[0] = 0.01
        assert conv.oscillation_penalty().item() == 0.0
        return
    with torch.no_grad():
        flat = conv.weight.view(-1)
        flat[0], flat[1], flat[2] = 0.45 * 0.25, 0.55 * 0.25, (top + 0.7) * 0.25
    penalty = conv.oscillation_penalty()
    assert penalty.item() == pytest.approx(2 * 0.45 ** 2 / conv.weight.numel())
    penalty.backward()
    grad = conv.weight.grad.view(-1)
    assert grad[0] > 0 and grad[1] < 0      # descent: 0.45 toward code 0, 0.55 toward code 1
    assert (grad[2:] == 0).all()            # on a code, or past the top one
