"""What the examples share: scikit-learn's bundled handwritten digits (1,797 8x8 images, no
download) with a fixed stratified train/validation split, the command line, and the plot."""

import argparse
import os

import torch

import loopy


def load(shape=(64,)):
    """Return ``(X_train, y_train), (X_val, y_val)``: pixels scaled to [0, 1] and reshaped to
    ``(N, *shape)``, e.g. ``(64,)`` flat, ``(1, 8, 8)`` images, ``(8, 8)`` rows. The split is
    stratified, 80/20, and always the same (1,437 training and 360 validation images)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    images, labels = load_digits(return_X_y=True)
    split = train_test_split(images, labels, test_size=0.2, stratify=labels, random_state=0)
    X_train, X_val, y_train, y_val = (torch.as_tensor(a) for a in split)
    X_train, X_val = ((X / 16.0).float().reshape(-1, *shape) for X in (X_train, X_val))
    return (X_train, y_train), (X_val, y_val)


def arguments(script, description, epochs):
    """Parse the examples' command line: ``--epochs N`` (the tests pass fewer), ``--plot PATH``
    (default: a PNG beside the script, ``examples/fc_digits.png``; ``--plot ''`` skips it) and
    ``--threads N``, which this applies with ``torch.set_num_threads``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=int, default=epochs, help=f"default {epochs}")
    parser.add_argument("--plot", default=os.path.splitext(os.path.abspath(script))[0] + ".png",
                        help="PNG file for the training curves; '' skips the plot")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch's CPU threads; the default, 1, is the fastest for networks "
                             "this small, and gives the same numbers on any machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def plot(history, path, title):
    """Save loss and accuracy per epoch, training vs validation, to ``path`` (a PNG) with
    ``loopy.plot_history``; do nothing when ``path`` is empty or matplotlib is not installed."""
    if not path:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")  # no window: write the file and return
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    figure = loopy.plot_history(history)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
    print(f"plot saved to {path}")


def report(metrics):
    """Print the final validation metrics in one line that the tests read."""
    values = " ".join(f"{name}={value:.4f}" for name, value in metrics.items())
    print(f"final validation: {values}")
