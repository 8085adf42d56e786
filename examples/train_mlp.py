"""Train a NumPy MLP on scikit-learn's digits with and without fastbn batch norm.

Experiments (every run seeded, same initial weights and minibatch order per seed):

1. learning-rate sweep, with vs without batch norm, for SGD with momentum and for Adam:
   training loss per epoch and test accuracy;
2. batch norm before vs after the ReLU;
3. the linear bias before batch norm is redundant: identical outputs, a gradient that is zero up
   to rounding, and the same training run with and without it;
4. folding each Linear -> BatchNorm1d pair into one linear layer for inference
   (``fastbn.fold_linear``) leaves the test predictions unchanged.

Writes ``bn_digits.png`` and ``results.json`` to ``--out`` and prints a table.

    python examples/train_mlp.py                 # the full run (under a minute on 2 cores)
    python examples/train_mlp.py --quick         # a shortened run, used by the tests

Needs the ``examples`` extra: ``pip install fastbn[examples]`` (scikit-learn, matplotlib). The
digits data ships inside scikit-learn; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # numpy_nn next to this file

import fastbn  # noqa: E402
from numpy_nn import (Adam, Linear, ReLU, Sequential, SGDMomentum,  # noqa: E402
                      softmax_cross_entropy)

HIDDEN = (128, 128, 128)
LEARNING_RATES = {"sgd": (0.01, 0.05, 0.2, 1.0), "adam": (3e-4, 3e-3, 3e-2, 1e-1)}
QUICK_LEARNING_RATES = {"sgd": (0.05, 0.2), "adam": (3e-3,)}
BATCH_SIZE = 64
DTYPE = np.float32


@dataclass
class RunResult:
    optimizer: str
    lr: float
    bn: str                      # "none", "before" (Linear-BN-ReLU) or "after" (Linear-ReLU-BN)
    bias_before_bn: bool
    train_loss: list[float] = field(default_factory=list)   # mean minibatch loss per epoch
    test_accuracy: list[float] = field(default_factory=list)  # eval mode, after each epoch
    diverged: bool = False
    seconds: float = 0.0


def load_data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = (digits.data / 16.0).astype(DTYPE)  # pixel intensities 0..16 -> [0, 1], not standardized
    return train_test_split(X, digits.target, test_size=0.25, stratify=digits.target,
                            random_state=seed)


def build_mlp(d_in: int, n_classes: int, bn: str, bias_before_bn: bool, seed: int,
              backend: str) -> Sequential:
    rng = np.random.default_rng(seed)  # the same weights whatever the BN choice
    layers = []
    for width in HIDDEN:
        if bn == "none":
            layers += [Linear(d_in, width, rng), ReLU()]
        elif bn == "before":
            layers += [Linear(d_in, width, rng, bias=bias_before_bn),
                       fastbn.BatchNorm1d(width, backend=backend), ReLU()]
        elif bn == "after":
            layers += [Linear(d_in, width, rng), ReLU(),
                       fastbn.BatchNorm1d(width, backend=backend)]
        else:
            raise ValueError(f"bn must be 'none', 'before' or 'after', got {bn!r}")
        d_in = width
    layers.append(Linear(d_in, n_classes, rng))
    return Sequential(layers)


def accuracy(model: Sequential, X: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    try:
        return float(np.mean(model.forward(X).argmax(axis=1) == y))
    finally:
        model.train()


def train(data, optimizer: str, lr: float, bn: str, epochs: int, seed: int, backend: str,
          bias_before_bn: bool = False, keep_model: list | None = None) -> RunResult:
    X_train, X_test, y_train, y_test = data
    model = build_mlp(X_train.shape[1], 10, bn, bias_before_bn, seed, backend)
    params = model.parameters()
    opt = SGDMomentum(params, lr) if optimizer == "sgd" else Adam(params, lr)
    order_rng = np.random.default_rng(seed + 1)
    result = RunResult(optimizer, lr, bn, bias_before_bn)
    start = time.perf_counter()
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for _ in range(epochs):
            losses = []
            order = order_rng.permutation(len(X_train))
            try:
                for i in range(0, len(order) - BATCH_SIZE + 1, BATCH_SIZE):  # full batches only
                    batch = order[i:i + BATCH_SIZE]
                    loss, dlogits = softmax_cross_entropy(model.forward(X_train[batch]),
                                                          y_train[batch])
                    if not np.isfinite(loss):
                        raise FloatingPointError("loss is not finite")
                    model.backward(dlogits)
                    opt.step()
                    losses.append(loss)
            except FloatingPointError:  # NaN/Inf loss, or fastbn refusing non-finite input
                result.diverged = True
                break
            result.train_loss.append(float(np.mean(losses)))
            result.test_accuracy.append(accuracy(model, X_test, y_test))
    result.seconds = time.perf_counter() - start
    if keep_model is not None:
        keep_model.append(model)
    return result


def fold_for_inference(model: Sequential) -> Sequential:
    """Each Linear -> BatchNorm1d pair becomes one Linear (``fastbn.fold_linear``), for eval."""
    folded, layers, i = [], model.layers, 0
    while i < len(layers):
        layer = layers[i]
        following = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(layer, Linear) and isinstance(following, fastbn.BatchNorm):
            # W is (in, out) here (x @ W); a square W is ambiguous, so say it
            W, b = fastbn.fold_linear(layer.params["W"], layer.params.get("b"), following,
                                      layout="in_out")
            merged = Linear(W.shape[0], W.shape[1], np.random.default_rng(0), dtype=W.dtype)
            merged.params["W"][...] = W
            merged.params["b"][...] = b
            folded.append(merged)
            i += 2
        else:
            folded.append(layer)
            i += 1
    return Sequential(folded)


def bias_redundancy_check(data, seed: int, backend: str) -> dict[str, float]:
    """A linear bias in front of batch norm (training mode) changes nothing and learns nothing."""
    X_train = data[0][:BATCH_SIZE]
    rng = np.random.default_rng(seed)
    with_bias = Linear(X_train.shape[1], HIDDEN[0], rng)
    with_bias.params["b"][...] = rng.standard_normal(HIDDEN[0]).astype(DTYPE)
    without_bias = Linear(X_train.shape[1], HIDDEN[0], rng, bias=False)
    without_bias.params["W"][...] = with_bias.params["W"]
    bn_a = fastbn.BatchNorm1d(HIDDEN[0], backend=backend)
    bn_b = fastbn.BatchNorm1d(HIDDEN[0], backend=backend)
    out_a = bn_a.forward(with_bias.forward(X_train))
    out_b = bn_b.forward(without_bias.forward(X_train))
    dout = rng.standard_normal(out_a.shape).astype(DTYPE)
    with_bias.backward(bn_a.backward(dout))
    return {
        "max_abs_output_difference": float(np.max(np.abs(out_a - out_b))),
        "max_abs_output": float(np.max(np.abs(out_a))),
        "max_abs_bias_gradient": float(np.max(np.abs(with_bias.grads["b"]))),
        "max_abs_weight_gradient": float(np.max(np.abs(with_bias.grads["W"]))),
    }


def fmt_curve(result: RunResult) -> str:
    if result.diverged and not result.train_loss:
        return "diverged"
    tail = " (diverged)" if result.diverged else ""
    return f"{result.train_loss[0]:.3f} -> {result.train_loss[-1]:.4f}{tail}"


def final_accuracy(result: RunResult) -> str:
    return "  --  " if result.diverged or not result.test_accuracy else \
        f"{100 * result.test_accuracy[-1]:5.1f}%"


def print_sweep(results: list[RunResult]) -> None:
    print(f"\n{'optimizer':<9} {'lr':>7} | {'no BN: train loss (first -> last)':<34} "
          f"{'test acc':>8} | {'BN: train loss':<26} {'test acc':>8}")
    for opt in ("sgd", "adam"):
        for lr in sorted({r.lr for r in results if r.optimizer == opt}):
            plain = next(r for r in results if (r.optimizer, r.lr, r.bn) == (opt, lr, "none"))
            bn = next(r for r in results if (r.optimizer, r.lr, r.bn) == (opt, lr, "before"))
            print(f"{opt:<9} {lr:>7g} | {fmt_curve(plain):<34} {final_accuracy(plain):>8} | "
                  f"{fmt_curve(bn):<26} {final_accuracy(bn):>8}")


def plot(sweep: list[RunResult], placement: list[RunResult], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    for ax, opt in zip(axes[0], ("sgd", "adam")):
        lrs = sorted({r.lr for r in sweep if r.optimizer == opt})
        colors = plt.cm.viridis(np.linspace(0, 0.85, len(lrs)))
        for lr, color in zip(lrs, colors):
            for r in sweep:
                if (r.optimizer, r.lr) == (opt, lr) and r.train_loss:
                    style = "-" if r.bn == "before" else "--"
                    label = f"lr={lr:g} {'BN' if r.bn == 'before' else 'no BN'}"
                    label += " (diverged)" if r.diverged else ""
                    ax.plot(range(1, len(r.train_loss) + 1), r.train_loss, style, color=color,
                            label=label)
        ax.set(yscale="log", xlabel="epoch", ylabel="training loss (mean over minibatches)",
               title=f"{'SGD + momentum 0.9' if opt == 'sgd' else 'Adam'}: "
                     "solid = BN, dashed = no BN")
        ax.legend(fontsize=7)
    ax = axes[1, 0]
    for opt, marker in (("sgd", "o"), ("adam", "s")):
        for bn, style in (("before", "-"), ("none", "--")):
            runs = sorted((r for r in sweep if r.optimizer == opt and r.bn == bn),
                          key=lambda r: r.lr)
            acc = [np.nan if r.diverged else 100 * r.test_accuracy[-1] for r in runs]
            ax.plot([r.lr for r in runs], acc, style, marker=marker,
                    label=f"{opt} {'BN' if bn == 'before' else 'no BN'}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="test accuracy after training (%)",
           title="Test accuracy (missing point = diverged)")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    for r in placement:
        style = "-" if r.bn == "before" else ":"
        ax.plot(range(1, len(r.train_loss) + 1), r.train_loss, style,
                label=f"{r.optimizer} lr={r.lr:g} BN {r.bn} ReLU")
    ax.set(yscale="log", xlabel="epoch", ylabel="training loss",
           title="BN before (Linear-BN-ReLU) vs after\n(Linear-ReLU-BN) the activation")
    ax.legend(fontsize=8)
    fig.suptitle(f"NumPy MLP {HIDDEN} on sklearn digits, batch {BATCH_SIZE}, fastbn.BatchNorm1d")
    # the rect keeps room for the suptitle: plain tight_layout lets the panels' titles
    # overlap it and clips it at the top edge
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per run (default 20, or 3 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer learning rates and epochs, for tests")
    parser.add_argument("--out", type=Path, default=Path("examples/output"),
                        help="directory for bn_digits.png and results.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="cpu", choices=fastbn.available_backends())
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    return _run_experiments(args)


def _run_experiments(args: argparse.Namespace) -> dict:
    epochs = args.epochs or (3 if args.quick else 20)
    rates = QUICK_LEARNING_RATES if args.quick else LEARNING_RATES
    t0 = time.perf_counter()
    data = load_data(args.seed)
    print(f"digits: {len(data[0])} train / {len(data[1])} test images, 64 pixels, 10 classes; "
          f"MLP {HIDDEN}, batch {BATCH_SIZE}, {epochs} epochs, fastbn backend {args.backend!r}")

    def run(opt, lr, bn, **kw):
        return train(data, opt, lr, bn, epochs, args.seed, args.backend, **kw)

    sweep = [run(opt, lr, bn) for opt in ("sgd", "adam") for lr in rates[opt]
             for bn in ("none", "before")]
    print_sweep(sweep)

    placement_lrs = {"sgd": rates["sgd"][len(rates["sgd"]) // 2],
                     "adam": rates["adam"][len(rates["adam"]) // 2]}
    placement = []
    for opt, lr in placement_lrs.items():
        placement.append(next(r for r in sweep if (r.optimizer, r.lr, r.bn) == (opt, lr, "before")))
        placement.append(run(opt, lr, "after"))
    print("\nBN placement (final train loss, test accuracy):")
    for r in placement:
        print(f"  {r.optimizer:<4} lr={r.lr:<6g} BN {r.bn:<6} ReLU: {fmt_curve(r):<26} "
              f"{final_accuracy(r)}")

    check = bias_redundancy_check(data, args.seed, args.backend)
    sgd_lr = placement_lrs["sgd"]
    biased = run("sgd", sgd_lr, "before", bias_before_bn=True)
    unbiased = next(r for r in sweep if (r.optimizer, r.lr, r.bn) == ("sgd", sgd_lr, "before"))
    print("\nLinear bias before BN (training mode, one batch):")
    print(f"  outputs with vs without a random bias: max |difference| "
          f"{check['max_abs_output_difference']:.2e} (max |output| {check['max_abs_output']:.2f})")
    print(f"  gradient of that bias: max |db| {check['max_abs_bias_gradient']:.2e} "
          f"vs max |dW| {check['max_abs_weight_gradient']:.2e}")
    print(f"  training sgd lr={sgd_lr:g}: with bias {fmt_curve(biased)}, "
          f"{final_accuracy(biased)}; without {fmt_curve(unbiased)}, {final_accuracy(unbiased)}")

    trained: list[Sequential] = []
    run("sgd", sgd_lr, "before", keep_model=trained)
    X_test, y_test = data[1], data[3]
    model = trained[0].eval()
    folded = fold_for_inference(model)
    fold = {"max_abs_logit_difference": float(np.max(np.abs(folded.forward(X_test)
                                                             - model.forward(X_test)))),
            "max_abs_logit": float(np.max(np.abs(model.forward(X_test)))),
            "accuracy_unfolded": accuracy(model, X_test, y_test),
            "accuracy_folded": accuracy(folded, X_test, y_test),
            "layers_unfolded": len(model.layers), "layers_folded": len(folded.layers)}
    print(f"\nInference folding (fastbn.fold_linear), sgd lr={sgd_lr:g} BN model: "
          f"{fold['layers_unfolded']} -> {fold['layers_folded']} layers, test logits differ by "
          f"at most {fold['max_abs_logit_difference']:.2e} (max |logit| "
          f"{fold['max_abs_logit']:.1f}), accuracy {100 * fold['accuracy_unfolded']:.1f}% -> "
          f"{100 * fold['accuracy_folded']:.1f}%")

    plot(sweep, placement, args.out / "bn_digits.png")
    elapsed = time.perf_counter() - t0
    summary = {"epochs": epochs, "hidden": HIDDEN, "batch_size": BATCH_SIZE,
               "backend": args.backend, "seconds": elapsed,
               "sweep": [asdict(r) for r in sweep],
               "placement": [asdict(r) for r in placement],
               "bias_check": check, "folding": fold,
               "bias_training": [asdict(biased), asdict(unbiased)]}
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"\nwrote {args.out / 'bn_digits.png'} and results.json; total {elapsed:.1f} s")
    return summary


if __name__ == "__main__":
    main()
