"""Training-curve plot for a run's history (``nqe curve``): accuracy and loss per epoch.

matplotlib is an optional dependency (extra ``plot``); it is imported only here, with the Agg
backend, so the rest of the project never needs it.
"""

__all__ = ["plot_history"]


def plot_history(history, path, title=""):
    """Write a PNG: train / validation accuracy (and the float-BatchNorm validation accuracy
    while a BatchNorm phase lasted), the BatchNorm fold, and the training loss."""
    if not history:
        raise ValueError("the training history is empty: nothing to plot")
    try:
        import matplotlib
    except ImportError as error:
        raise RuntimeError("nqe curve needs matplotlib: pip install 'nqe[plot]'") from error
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    acc_ax.plot(epochs, [100 * r["train_acc"] for r in history], label="train (fake-quant)")
    validated = [(r["epoch"], 100 * r["val_acc"]) for r in history   # see --bn-val-every
                 if r.get("val_acc") is not None]
    if validated:
        acc_ax.plot(*zip(*validated), label="validation (exact integer model)")
    bn = [(r["epoch"], 100 * r["val_acc_batchnorm"]) for r in history
          if r.get("val_acc_batchnorm") is not None]
    if bn:
        acc_ax.plot(*zip(*bn), linestyle="--", label="validation (float BatchNorm)")
    folds = [b["epoch"] for a, b in zip(history, history[1:])
             if a.get("phase") == "batchnorm" and b.get("phase") == "bsn"]
    for ax in (acc_ax, loss_ax):
        for epoch in folds:
            ax.axvline(epoch - 0.5, color="grey", linestyle=":",
                       label="BatchNorm folded into BSN" if ax is acc_ax else None)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    acc_ax.set_ylabel("accuracy (%)")
    acc_ax.set_ylim(0, 100)
    acc_ax.legend(loc="lower right", fontsize=8)
    loss_ax.plot(epochs, [r["train_loss"] for r in history], color="tab:red")
    loss_ax.set_ylabel("training loss")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
