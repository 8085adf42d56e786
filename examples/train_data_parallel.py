"""Data-parallel training of the digits MLP with fastbn.SyncBatchNorm over MPI.

The network of ``train_mlp.py`` (Linear without bias -> batch norm -> ReLU, three hidden layers
of 128, SGD with momentum) trained on K processes: every rank draws the same minibatch order,
keeps its shard of each minibatch of 64 (``np.array_split``: unequal shards when K does not
divide 64), normalizes with ``SyncBatchNorm`` (the statistics of the whole minibatch), and the
ranks sum their parameter gradients with one ``Allreduce`` per step before the same optimizer
step. The result is the single-process training on the full minibatches, which rank 0 runs too
(with ``fastbn.BatchNorm1d``) and prints next to the data-parallel loss curve.

    mpiexec -n 4 python -m mpi4py examples/train_data_parallel.py
    python examples/train_data_parallel.py          # one process: the same run on 1 rank
    mpiexec -n 2 python -m mpi4py examples/train_data_parallel.py --unsynchronized  # BN per shard

Needs the ``mpi`` and ``examples`` extras: ``pip install -e ".[mpi,examples]"``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # numpy_nn, train_mlp next to this file

import fastbn  # noqa: E402
from fastbn.distributed import SyncBatchNorm, require_mpi  # noqa: E402
from numpy_nn import Sequential, SGDMomentum, softmax_cross_entropy  # noqa: E402
from train_mlp import BATCH_SIZE, HIDDEN, build_mlp, load_data  # noqa: E402


def build_model(d_in: int, seed: int, backend: str, comm=None, sync_bn: bool = True
                ) -> Sequential:
    """train_mlp's BN model; with ``comm`` and ``sync_bn``, its BatchNorm1d layers become
    SyncBatchNorm."""
    model = build_mlp(d_in, 10, "before", False, seed, backend)
    if comm is not None and sync_bn:
        model.layers = [SyncBatchNorm(layer.num_features, dtype=layer.dtype, backend=backend,
                                      comm=comm) if isinstance(layer, fastbn.BatchNorm) else layer
                        for layer in model.layers]
    return model


def allreduce_gradients(comm, parameters: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Sum every gradient over the ranks in place, in one message (a single flat buffer)."""
    MPI = require_mpi()
    flat = np.concatenate([grad.ravel() for _, grad in parameters])
    comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
    offset = 0
    for _, grad in parameters:
        grad[...] = flat[offset:offset + grad.size].reshape(grad.shape)
        offset += grad.size


def train(data, epochs: int, lr: float, seed: int, backend: str, comm=None,
          max_steps: int | None = None, sync_bn: bool = True) -> dict[str, list]:
    """SGD-momentum training; with ``comm`` data-parallel over its ranks, else on one process.

    Returns the loss of every step, the mean loss and test accuracy of every epoch (the same on
    every rank) and a digest of the final parameters.
    """
    X_train, X_test, y_train, y_test = data
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    model = build_model(X_train.shape[1], seed, backend, comm, sync_bn)
    parameters = model.parameters()
    optimizer = SGDMomentum(parameters, lr)
    order_rng = np.random.default_rng(seed + 1)  # the same order on every rank
    history: dict[str, list] = {"step_loss": [], "epoch_loss": [], "test_accuracy": []}
    for _ in range(epochs):
        order = order_rng.permutation(len(X_train))
        epoch_losses = []
        for start in range(0, len(order) - BATCH_SIZE + 1, BATCH_SIZE):
            if len(history["step_loss"]) + len(epoch_losses) == max_steps:
                break
            mine = np.array_split(order[start:start + BATCH_SIZE], size)[rank]
            logits = model.forward(X_train[mine])
            loss, dlogits = softmax_cross_entropy(logits, y_train[mine])
            # the gradient of the mean loss over the whole minibatch, not over this shard
            model.backward(dlogits * np.float32(len(mine) / BATCH_SIZE))
            loss_sum = np.array([loss * len(mine)])
            if comm is not None:
                allreduce_gradients(comm, parameters)
                comm.Allreduce(require_mpi().IN_PLACE, loss_sum)
            optimizer.step()
            epoch_losses.append(float(loss_sum[0]) / BATCH_SIZE)
        if not epoch_losses:
            break
        history["step_loss"] += epoch_losses
        history["epoch_loss"].append(float(np.mean(epoch_losses)))
        model.eval()  # running statistics: identical on every rank, nothing communicated
        history["test_accuracy"].append(float(np.mean(model.forward(X_test).argmax(1)
                                                      == y_test)))
        model.train()
    history["parameter_digest"] = hashlib.sha256(b"".join(p.tobytes() for p, _ in parameters)
                                                 ).hexdigest()
    return history


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=None,
                        help="stop after this many steps (the test runs a few)")
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="cpu", choices=fastbn.available_backends())
    parser.add_argument("--unsynchronized", action="store_true",
                        help="plain BatchNorm1d on each shard (each rank's own statistics), "
                             "to see what SyncBatchNorm changes")
    parser.add_argument("--json", type=Path, default=None,
                        help="rank 0 writes both runs' losses here")
    args = parser.parse_args(argv)
    comm = require_mpi().COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    limit_blas_threads(size)
    data = load_data(args.seed)
    if rank == 0:
        print(f"digits, MLP {HIDDEN}, minibatch {BATCH_SIZE} split over {size} rank(s) "
              f"(shards of {sorted({len(s) for s in np.array_split(range(BATCH_SIZE), size)})} "
              f"samples), SGD-momentum lr {args.lr}, fastbn backend {args.backend!r}")
    warm_up(data[0][:BATCH_SIZE], args.backend)
    t0 = time.perf_counter()
    parallel = train(data, args.epochs, args.lr, args.seed, args.backend, comm, args.steps,
                     sync_bn=not args.unsynchronized)
    parallel_s = time.perf_counter() - t0
    digests = comm.gather(parallel["parameter_digest"], root=0)
    if rank != 0:
        return parallel
    t0 = time.perf_counter()
    single = train(data, args.epochs, args.lr, args.seed, args.backend, None, args.steps)
    single_s = time.perf_counter() - t0
    report(parallel, single, size, parallel_s, single_s, digests,
           "BatchNorm1d per shard" if args.unsynchronized else "SyncBatchNorm")
    summary = {"ranks": size, "data_parallel": parallel, "single_process": single,
               "seconds": {"data_parallel": parallel_s, "single_process": single_s}}
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1))
    return summary


def warm_up(x: np.ndarray, backend: str) -> None:
    """Load fastbn's compiled kernels before the timings (from Numba's cache after a first run)."""
    layer = fastbn.BatchNorm1d(x.shape[1], backend=backend)
    layer.backward(layer.forward(x))


def limit_blas_threads(ranks: int) -> None:
    """Share the cores between the ranks: BLAS threads of several processes spinning on the same
    cores slow every matmul down (see examples/README.md, "Threads")."""
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    threadpool_limits(max(1, (os.cpu_count() or 1) // ranks), user_api="blas")


def report(parallel: dict, single: dict, size: int, parallel_s: float, single_s: float,
           digests: list[str], layer: str) -> None:
    steps = len(parallel["step_loss"])
    difference = np.max(np.abs(np.subtract(parallel["step_loss"], single["step_loss"])),
                        initial=0.0)
    label = f"loss, {size} rank(s) {layer}"
    print(f"\n{'epoch':>5} | {label} | "
          f"{'loss, 1 process full batch':>27} | test acc")
    for epoch, (a, b, accuracy) in enumerate(zip(parallel["epoch_loss"], single["epoch_loss"],
                                                 parallel["test_accuracy"]), 1):
        print(f"{epoch:>5} | {a:>{len(label)}.6f} | {b:>27.6f} | {100 * accuracy:6.1f}%")
    print(f"\n{steps} steps: largest |difference| of a step's loss {difference:.2e}")
    print(f"parameters bitwise identical on every rank: {len(set(digests)) == 1}")
    print(f"time: {parallel_s:.2f} s data-parallel, {single_s:.2f} s single process")


if __name__ == "__main__":
    main()
