"""Seconds per training step on this machine, with and without the two CPU speed-ups training uses.

The speed-ups: the fused activation (:class:`~nqe.model.quant.QuantConv`'s ``fuse_activation``,
the same values and gradients as the unfused operations) and keeping freed memory in the heap
(:func:`~nqe.model.train.keep_freed_memory`). An allocator setting cannot be undone inside a
process, so every measurement runs in a fresh process; the variants take turns, round after round,
so that a slow spell of a shared machine falls on all of them.

The images are random: a step's time does not depend on their content. The network is the real
one, in the phase asked for (the float-BatchNorm phase, or BSN after an at-once fold).
"""

import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

__all__ = ["VARIANTS", "measure_steps", "benchmark_training_step"]

# name: (fuse_activation, keep_freed_memory)
VARIANTS = {"unfused, default allocator": (False, False),
            "fused activation": (True, False),
            "freed memory kept": (False, True),
            "both (what nqe train runs)": (True, True)}
BASELINE, CHOSEN = "unfused, default allocator", "both (what nqe train runs)"
PHASES = ("batchnorm", "bsn")


def measure_steps(spec, batch_size, steps, warmup, phase, bf16, threads, fuse, keep_memory,
                  seed=0):
    """Seconds of each of ``steps`` training steps (forward, loss, backward, AdamW step), after
    ``warmup`` untimed ones. Meant to run in a fresh process."""
    import torch
    import torch.nn.functional as F

    from .network import NQENet
    from .quant import QuantConv
    from .train import keep_freed_memory

    kept = keep_freed_memory() if keep_memory else False
    torch.set_num_threads(threads)
    QuantConv.fuse_activation = fuse
    torch.manual_seed(seed)
    model = NQENet(spec, batch_norm=True).to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, model.spec.input_channels, model.spec.input_height,
             model.spec.input_width)
    images = torch.randint(0, 256, shape, generator=generator).float().contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, model.spec.num_classes, (batch_size,), generator=generator)
    model.calibrate(images)
    if phase == "bsn":
        model.fold_batch_norm()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    seconds = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(images)
        loss = F.cross_entropy(model.scaled_logits(logits.float()), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            seconds.append(time.perf_counter() - started)
    return {"seconds": seconds, "allocator_setting_taken": kept,
            "torch_threads": torch.get_num_threads()}


def benchmark_training_step(spec="nqe-1mb", batch_size=256, steps=5, warmup=3, rounds=2,
                            phase="batchnorm", bf16=True, threads=2, progress=True):
    """Median seconds per step of each variant (see :data:`VARIANTS`) and their ratios to the
    unfused step with the default allocator."""
    from tqdm import tqdm

    from .spec import SpecError, load_spec

    loaded = load_spec(spec)               # a bad spec fails here, not in a child process
    if not loaded.num_classes:
        raise SpecError(f"spec {loaded.name!r}: no classifier head ('head' is null); the "
                        f"training step this benchmark times needs one")
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    times = {name: [] for name in VARIANTS}
    taken = {}
    runs = [(r, name) for r in range(rounds) for name in VARIANTS]
    for _, name in tqdm(runs, desc="training-step variants", unit="process",
                        disable=not progress):
        fuse, keep_memory = VARIANTS[name]
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            result = pool.submit(measure_steps, spec, batch_size, steps, warmup, phase, bf16,
                                 threads, fuse, keep_memory).result()
        times[name] += result["seconds"]
        taken[name] = result["allocator_setting_taken"]
        threads_used = result["torch_threads"]
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"spec": loaded.name, "phase": phase, "batch_size": batch_size, "bf16": bf16,
            "torch_threads": threads_used, "steps_per_process": steps, "warmup_steps": warmup,
            "rounds": rounds,
            "seconds_per_step": medians,
            "speedup_over_baseline": {name: medians[BASELINE] / m for name, m in medians.items()},
            "allocator_setting_taken": taken[CHOSEN],
            "all_seconds": times}
