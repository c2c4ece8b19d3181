"""The shipped weights on real CIFAR-10 test images: PyTorch model == integer reference."""

import numpy as np
import pytest

from nqe.model.evaluate import predict_model, predict_reference
from nqe.model.weights_io import model_from_integer_network


def _compare(net, images):
    ref_logits, ref_preds = predict_reference(net, images, progress=False)
    model_logits, model_preds = predict_model(model_from_integer_network(net), images,
                                              progress=False)
    mismatched = np.flatnonzero((ref_logits != model_logits).any(axis=1))
    assert mismatched.size == 0, f"logits differ on test images {mismatched[:10].tolist()}"
    assert (ref_preds == model_preds).all()
    return ref_preds


def test_first_1000_real_test_images_identical_logits(shipped_net, cifar_test):
    # test.npz is sorted by class: take a spread over all classes, not the first 1,000.
    index = np.arange(0, 10000, 10)
    preds = _compare(shipped_net, cifar_test.test_x[index])
    assert len(preds) == 1000
    # A trained network, not a constant: it predicts several classes.
    assert len(np.unique(preds)) >= 5


@pytest.mark.slow
def test_all_10000_real_test_images_identical(shipped_net, cifar_test):
    _compare(shipped_net, cifar_test.test_x)


def test_every_layer_identical_on_real_images(shipped_net, cifar_test):
    import torch

    from nqe.model.integer_reference import run_reference

    images = cifar_test.test_x[::500]
    model = model_from_integer_network(shipped_net)
    with torch.no_grad():
        _, fake = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                        return_activations=True)
    _, ref = run_reference(shipped_net, images, return_activations=True)
    for name, value in ref.items():
        assert (fake[name].numpy() == value).all(), name


def test_trained_fake_quant_model_equals_exported_weights(shipped_net, cifar_test):
    """The trained model itself (HEQ real weights, learned biases, frozen shifts), not a model
    rebuilt from the integer weights, against the integer reference on 1,000 real images."""
    from conftest import SHIPPED_WEIGHTS

    from nqe.model.train import load_checkpoint

    model, _ = load_checkpoint(SHIPPED_WEIGHTS / "float_checkpoint.pt")
    images = cifar_test.test_x[5::10]
    model_logits, _ = predict_model(model, images, progress=False)
    ref_logits, _ = predict_reference(shipped_net, images, progress=False)
    assert len(images) == 1000
    mismatched = np.flatnonzero((ref_logits != model_logits).any(axis=1))
    assert mismatched.size == 0, f"logits differ on images {mismatched[:10].tolist()}"


def test_reference_batches_on_threads_keep_order_and_values(shipped_net, cifar_test):
    """Batches spread over threads come back in image order, equal to one serial pass."""
    from nqe.model.integer_reference import run_reference

    images = cifar_test.test_x[::97][:70]
    serial = run_reference(shipped_net, images)
    for workers in (1, 3):
        logits, preds = predict_reference(shipped_net, images, batch_size=8, progress=False,
                                          workers=workers)
        assert (logits == serial).all(), f"{workers} workers"
        assert len(preds) == len(images)
