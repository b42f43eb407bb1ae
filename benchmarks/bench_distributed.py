#!/usr/bin/env python
"""Data-parallel online LAE over MPI: steps per second with 1 and R ranks, bytes all-reduced per step, and the
difference to one process, measured in one run.

The script starts ``mpiexec -n R`` of itself for every R in --ranks (1 first); each job trains the online LAE
(MLP, approximate diagonal GGN) for --steps minibatches of the global batch --batch-size on real MNIST, every rank
stepping on its shard of each batch, after --warmup untimed steps, with cores / R BLAS threads per rank. Rank 0 reports the steps per second, the bytes
of the all-reduced arrays per step (the gradient and the GGN diagonal: 2 P numbers; the scalars of the batch size
and of the statistics are not counted) and the final theta and H, compared here with the one-rank job's.

Ranks share the machine's cores: on a 2-core machine two ranks can at best double the speed, and every other
process running at the time takes from it.

    python benchmarks/bench_distributed.py                          # 1 and 2 ranks, B = 64, 30 steps
    python benchmarks/bench_distributed.py --threads 1                # one BLAS thread per rank
    python benchmarks/bench_distributed.py --ranks 1 2 4 --steps 50 --dtype float64

Needs MNIST under $MINILAE_DATA and MPI (pip install 'minilae[mpi]').
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="numbers of MPI ranks to time")
    p.add_argument("--steps", type=int, default=30, help="timed minibatch steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (split over the ranks)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--threads", type=int, help="BLAS threads per rank (default: cores / ranks)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # a rank of one job: rank 0 writes here
    return p.parse_args(argv)


def worker(args):
    """One rank: train, time, and (rank 0) save the figures and the final theta, H."""
    from minilae import backend, distributed  # noqa: PLC0415
    from minilae.data import batches, load_dataset  # noqa: PLC0415
    from minilae.models import build_model  # noqa: PLC0415
    from minilae.online import OnlineLaplace  # noqa: PLC0415
    from minilae.optim import Adam  # noqa: PLC0415
    from minilae.training import epoch_rngs  # noqa: PLC0415

    comm = distributed.init("mpi")
    backend.set_default_dtype(np.dtype(args.dtype))
    n = (args.steps + args.warmup) * args.batch_size
    x, _ = load_dataset("mnist", "train")
    model = build_model("mlp", input_shape=x.shape[1:], latent_size=2, seed=0)
    trainer = OnlineLaplace(model, len(x), hessian="approx", optimizer=Adam(lr=1e-3))
    host_rng, backend_rng = epoch_rngs(0, 0)
    parts = [b[comm.shard(len(b))] for b in batches(x[:n], args.batch_size, rng=host_rng)]
    for b in parts[:args.warmup]:
        trainer.step(backend.asarray(b, dtype=trainer.theta.dtype), backend_rng)
    comm.barrier()
    start = time.perf_counter()
    for b in parts[args.warmup:]:
        trainer.step(backend.asarray(b, dtype=trainer.theta.dtype), backend_rng)
    comm.barrier()
    seconds = time.perf_counter() - start
    if comm.is_root:
        P = trainer.theta.size
        np.savez(args.worker, theta=backend.to_numpy(trainer.theta), H=backend.to_numpy(trainer.H),
                 info=json.dumps({"ranks": comm.size, "steps_per_s": args.steps / seconds, "parameters": P,
                                  "bytes_per_step": 2 * P * trainer.theta.dtype.itemsize}))


def mpiexec():
    found = Path(sys.executable).with_name("mpiexec")
    return str(found) if found.exists() else "mpiexec"


def main(argv=None):
    args = parse(argv)
    if args.worker is not None:
        return worker(args)
    ranks = sorted(set(args.ranks) | {1})
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for R in ranks:
            out = Path(tmp) / f"ranks{R}.npz"
            cmd = [mpiexec(), "-n", str(R), sys.executable, __file__, "--worker", str(out), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--dtype", args.dtype]
            # BLAS threads per rank: by default the cores shared out, not oversubscribed
            threads = str(args.threads or max(1, (os.cpu_count() or 1) // R))
            subprocess.run(cmd, check=True, env={**os.environ, "MINILAE_BACKEND": "numpy", "OMP_NUM_THREADS": threads,
                                                 "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
            with np.load(out) as z:
                row, theta, H = json.loads(str(z["info"])), z["theta"], z["H"]
            if reference is None:
                reference = theta, H
            row["theta_rel_diff"] = float(np.abs(theta - reference[0]).max() / np.abs(reference[0]).max())
            row["H_rel_diff"] = float(np.abs(H - reference[1]).max() / np.abs(reference[1]).max())
            rows.append(row)
    base = rows[0]["steps_per_s"]
    print(f"online LAE, MLP, approx GGN, global batch {args.batch_size}, {args.steps} steps, {args.dtype}, "
          f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), BLAS threads per rank "
          f"{args.threads or 'cores / ranks'}, load average {os.getloadavg()[0]:.1f} at the end")
    print("| ranks | steps/s | speed-up | bytes all-reduced per step | max rel. diff theta / H vs 1 rank |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ranks']} | {r['steps_per_s']:.2f} | {r['steps_per_s'] / base:.2f} | "
              f"{r['bytes_per_step']:,} (2 x {r['parameters']:,} x {np.dtype(args.dtype).itemsize} B) | "
              f"{r['theta_rel_diff']:.1e} / {r['H_rel_diff']:.1e} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
