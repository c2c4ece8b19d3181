"""Accuracy and throughput of the integer reference (and of the PyTorch model on the same weights)."""

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from . import contract
from .data import CLASSES
from .integer_reference import run_reference
from .weights_io import model_from_integer_network

__all__ = ["evaluate_reference", "predict_model", "benchmark"]


def _batches(count, batch_size, desc, progress):
    return tqdm(range(0, count, batch_size), desc=desc, leave=False, disable=not progress,
                unit="batch")


def reference_workers():
    """Threads for the integer reference: one per core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def predict_reference(net, images, batch_size=250, progress=True, desc="integer reference",
                      workers=None):
    """Logits and predictions, batches spread over ``workers`` threads (default: one per core).

    Each batch's small matrix products run on one BLAS thread; the batches run side by side
    (numpy releases the GIL in them). Multi-threaded BLAS on these products was slower, and
    collapsed when another process (a training run) held the cores: its threads spin-wait for
    each other.
    """
    starts = range(0, len(images), batch_size)
    workers = max(1, min(workers or reference_workers(), len(starts)))
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        batches = pool.map(lambda s: run_reference(net, images[s:s + batch_size]), starts)
        logits = list(tqdm(batches, total=len(starts), desc=desc, leave=False,
                           disable=not progress, unit="batch"))
    logits = np.concatenate(logits)
    return logits, contract.argmax_lowest(logits)


@torch.no_grad()
def predict_model(model, images, batch_size=250, progress=True, desc="pytorch model"):
    model.eval()
    logits = []
    for s in _batches(len(images), batch_size, desc, progress):
        batch = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size].transpose(0, 3, 1, 2)))
        logits.append(model(batch).numpy().astype(np.int64))
    logits = np.concatenate(logits)
    return logits, contract.argmax_lowest(logits)


def evaluate_reference(net, images, labels, compare_model=False, progress=True):
    """Integer-reference accuracy; with ``compare_model`` also the PyTorch model's agreement."""
    started = time.perf_counter()
    logits, preds = predict_reference(net, images, progress=progress)
    seconds = time.perf_counter() - started
    labels = np.asarray(labels).astype(np.int64)
    per_class = {CLASSES[c] if len(CLASSES) > c else str(c):
                 float((preds[labels == c] == c).mean()) for c in np.unique(labels)}
    report = {"weights": net.meta.get("name", net.spec.name), "spec": net.spec.name,
              "images": int(len(labels)), "accuracy": float((preds == labels).mean()),
              "correct": int((preds == labels).sum()), "per_class_accuracy": per_class,
              "reference_seconds": seconds}
    if compare_model:
        model = model_from_integer_network(net)
        model_logits, model_preds = predict_model(model, images, progress=progress)
        report["model_prediction_mismatches"] = int((model_preds != preds).sum())
        report["model_logit_mismatches"] = int((model_logits != logits).any(axis=1).sum())
    return report


def benchmark(net, images, batch_size=250, threads=0, progress=True):
    """images/s of the integer reference and of the PyTorch model, same weights, same images."""
    if threads:
        torch.set_num_threads(threads)
    model = model_from_integer_network(net)
    predict_model(model, images[:batch_size], batch_size, progress=False)     # warm-up
    predict_reference(net, images[:batch_size], batch_size, progress=False)
    t0 = time.perf_counter()
    ref_logits, ref_preds = predict_reference(net, images, batch_size, progress)
    t1 = time.perf_counter()
    model_logits, model_preds = predict_model(model, images, batch_size, progress)
    t2 = time.perf_counter()
    ref_rate, model_rate = len(images) / (t1 - t0), len(images) / (t2 - t1)
    return {"images": int(len(images)), "batch_size": batch_size,
            "torch_threads": torch.get_num_threads(),
            "integer_reference_images_per_s": ref_rate, "pytorch_images_per_s": model_rate,
            "reference_over_pytorch": ref_rate / model_rate,
            "integer_reference_seconds": t1 - t0, "pytorch_seconds": t2 - t1,
            "prediction_mismatches": int((ref_preds != model_preds).sum()),
            "logit_mismatches": int((ref_logits != model_logits).any(axis=1).sum())}
