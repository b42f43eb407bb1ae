"""Tests for minilae.distributed: the communicators, data-parallel training / post-hoc / prediction equal to one
process, and `mpiexec -n 2 python -m minilae.train` on real MNIST (equivalence, resume after a kill, abort).

The data-parallel arithmetic is checked in-process on both backends with :class:`ThreadRanks`, R threads acting
as R ranks (a test double of MPI whose all-reduce sums every thread's argument in rank order); the real MPI runs
are subprocesses, marked slow.
"""
import json
import numbers
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import in_ci, require_data

from minilae import distributed
from minilae.backend import asarray, to_numpy
from minilae.data import batches
from minilae.laplace import DiagonalLaplace
from minilae.models import mlp_autoencoder
from minilae.online import OnlineLaplace
from minilae.optim import Adam
from minilae.posthoc import dataset_ggn, dataset_kfac
from minilae.predictive import predict
from minilae.training import MAPTrainer, epoch_rngs, fit, load_checkpoint

IMAGE = (1, 4, 4)
TIGHT = 1e-12  # float64 round-off of a different summation order (the shards' partial sums added at the end)


def tiny_autoencoder():
    return mlp_autoencoder(input_shape=IMAGE, latent_size=2, hidden=(6,), seed=1)


def images(rng, n=23):
    return rng.uniform(0, 1, size=(n,) + IMAGE)


@pytest.fixture(autouse=True)
def one_process_afterwards():
    """Every test ends with the default communicator, whatever it selected."""
    yield
    distributed.use(distributed.SingleProcess())


class ThreadRanks(distributed.SingleProcess):
    """R threads as R ranks: allreduce_sum returns the sum over every thread's argument, added in rank order."""

    kind = "threads"

    def __init__(self, size):
        self.size, self._local, self._slots = size, threading.local(), [None] * size
        self._barrier = threading.Barrier(size)

    @property
    def rank(self):
        return self._local.rank

    def allreduce_sum(self, a):
        number = isinstance(a, numbers.Number)
        self._slots[self.rank] = a if number else to_numpy(a).copy()
        self._barrier.wait()
        total = sum(self._slots[1:], self._slots[0])
        self._barrier.wait()
        return total if number else asarray(total, dtype=a.dtype)

    mean = distributed.MPICommunicator.mean

    def run(self, work):
        """[work() on rank r for r < R], each rank in its own thread with this communicator current."""
        results, errors = [None] * self.size, []

        def rank_main(r):
            self._local.rank = r
            try:
                results[r] = work()
            except BaseException as err:  # noqa: BLE001 - re-raised below, in the test's thread
                errors.append(err)
                self._barrier.abort()

        previous = distributed.current()
        distributed.use(self)
        try:
            threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(self.size)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            distributed.use(previous)
        if errors:
            raise errors[0]
        return results


# ----------------------------------------------------------------------------------------------
# the communicators

@pytest.mark.backends("numpy")  # host-only index arithmetic
@pytest.mark.parametrize("n, size", [(7, 1), (7, 2), (7, 3), (8, 4), (5, 5)])
def test_shards_cover_every_item_once_in_order(n, size):
    """Catches shards that overlap, drop the remainder n mod R or reorder the batch (a different computation)."""
    parts = [distributed.shard(n, r, size) for r in range(size)]
    assert np.concatenate([np.arange(n)[p] for p in parts]).tolist() == list(range(n))
    lengths = [p.stop - p.start for p in parts]
    assert max(lengths) - min(lengths) <= 1 and min(lengths) >= 1


@pytest.mark.backends("numpy")
def test_a_shard_of_nothing_is_refused():
    """Catches an empty shard reaching the layers (which cannot run a batch of 0 images)."""
    with pytest.raises(ValueError, match="3 item.* cannot be split over 4 ranks"):
        distributed.shard(3, 0, 4)


def test_the_single_process_communicator_changes_nothing(rng):
    """Catches a one-process run whose arithmetic changed (a copy, a rescaled sum): every call is the identity."""
    comm = distributed.SingleProcess()
    a = asarray(rng.normal(size=5))
    assert comm.allreduce_sum(a) is a and comm.allreduce_sum(3) == 3
    stats = {"mse": 0.25, "nll": 7.0}
    assert comm.mean(stats, 4) == stats and comm.broadcast(stats) is stats
    assert (comm.rank, comm.size, comm.is_root, comm.shard(6)) == (0, 1, True, slice(0, 6))
    comm.barrier(), comm.check_identical(a, "a"), comm.abort(1)  # no-ops


@pytest.mark.backends("numpy")
def test_outside_mpiexec_the_default_is_one_process(monkeypatch):
    """Catches a plain `python -m minilae.train` that would try to start MPI (and fail without mpi4py)."""
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.launched_ranks() == 1
    assert isinstance(distributed.init(None), distributed.SingleProcess) and distributed.current().size == 1
    monkeypatch.setenv("PMI_SIZE", "2")
    assert distributed.launched_ranks() == 2
    with pytest.raises(ValueError, match="unknown communicator 'gloo'"):
        distributed.init("gloo")


@pytest.mark.backends("numpy")
def test_mpiexec_without_mpi4py_names_the_install_command(monkeypatch):
    """Catches a run under mpiexec that silently trains R independent copies when mpi4py is missing."""
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py now raises ImportError
    with pytest.raises(distributed.DistributedError, match=r"2 ranks.*pip install 'minilae\[mpi\]'"):
        distributed.init(None)
    assert isinstance(distributed.current(), distributed.SingleProcess)


def test_thread_ranks_add_up_like_mpi(rng):
    """The test double itself: the all-reduce is the sum over ranks, the mean weights by the ranks' counts."""
    comm = ThreadRanks(3)
    out = comm.run(lambda: (to_numpy(comm.allreduce_sum(asarray(np.full(2, comm.rank + 1.0)))),
                            comm.allreduce_sum(comm.rank), comm.mean({"v": float(comm.rank)}, comm.rank + 1)))
    for total, count, mean in out:
        np.testing.assert_array_equal(total, [6.0, 6.0])
        assert count == 3 and mean == {"v": (0 * 1 + 1 * 2 + 2 * 3) / 6}


# ----------------------------------------------------------------------------------------------
# data parallel = one process (in-process ranks, both backends)

def train_steps(trainer_of, x, comm, steps=3, batch_size=8):
    """theta (and H) after `steps` minibatches of x, this rank stepping on its shard of each batch."""
    trainer = trainer_of(tiny_autoencoder())
    host_rng, backend_rng = epoch_rngs(4, 0)
    for xb in list(batches(x, batch_size, rng=host_rng))[:steps]:
        trainer.step(asarray(xb[comm.shard(len(xb))]), backend_rng)
    return [to_numpy(a) for a in (trainer.theta, getattr(trainer, "H", trainer.theta))]


TRAINERS = {
    "online": lambda m: OnlineLaplace(m, 23, alpha=0.1, prior_precision=2.0, hessian="exact", n_samples=2,
                                      optimizer=Adam(lr=1e-2)),
    "map": lambda m: MAPTrainer(m, Adam(lr=1e-2), prior_precision=2.0, n_data=23),
}


@pytest.mark.parametrize("method", TRAINERS)
@pytest.mark.parametrize("size", [2, 3])
def test_data_parallel_steps_equal_one_process(method, size, rng):
    """Catches a sharded step that is not the full-batch one: the mean's 1/B taken over the shard (an R times
    larger gradient), N/B of the GGN with the shard's B, a missing all-reduce, or ranks drawing other theta_s.
    Batches of 8 and 7 images split over 2 or 3 ranks (unequal shards)."""
    x = images(rng)
    one = train_steps(TRAINERS[method], x, distributed.SingleProcess())
    comm = ThreadRanks(size)
    for ranks in comm.run(lambda: train_steps(TRAINERS[method], x, comm)):
        for a, b in zip(ranks, one):
            np.testing.assert_allclose(a, b, rtol=TIGHT, atol=TIGHT * np.abs(b).max())


def test_posthoc_ggn_over_shards_equals_one_process(rng):
    """Catches a post-hoc GGN or log-likelihood of one shard only (no all-reduce) or of every shard twice."""
    x = images(rng)
    model = tiny_autoencoder()
    G1, log_lik1 = dataset_ggn(model, x, method="exact", batch_size=5)
    comm = ThreadRanks(2)
    for G, log_lik in comm.run(lambda: dataset_ggn(tiny_autoencoder(), x, method="exact", batch_size=5)):
        np.testing.assert_allclose(to_numpy(G), to_numpy(G1), rtol=TIGHT)
        assert log_lik == pytest.approx(log_lik1, rel=TIGHT)


def test_posthoc_kfac_over_shards_equals_one_process(rng):
    """Catches KFAC factors (A, G or their count n) or the log-likelihood of one shard only, or of the whole data
    on every rank (each rank would then add the full sums)."""
    x = images(rng)
    one, log_lik1 = dataset_kfac(tiny_autoencoder(), x, method="kfac", batch_size=5)
    comm = ThreadRanks(2)
    for blocks, log_lik in comm.run(lambda: dataset_kfac(tiny_autoencoder(), x, method="kfac", batch_size=5)):
        for b, b1 in zip(blocks, one, strict=True):
            assert b.n == b1.n
            np.testing.assert_allclose(to_numpy(b.A), to_numpy(b1.A), rtol=TIGHT, atol=TIGHT * float(abs(b1.A).max()))
            np.testing.assert_allclose(to_numpy(b.G), to_numpy(b1.G), rtol=TIGHT, atol=TIGHT * float(abs(b1.G).max()))
        assert log_lik == pytest.approx(log_lik1, rel=TIGHT)


@pytest.mark.parametrize("K", [1, 5])
def test_the_networks_split_over_ranks_give_the_one_process_prediction(K, rng):
    """Catches a wrong merge of the ranks' Welford moments (averaging the ranks' variances drops the spread
    between their means), ranks drawing the same networks instead of a share of the K, or a rank without a
    network (K = 1 on 2 ranks) breaking the prediction."""
    x = images(rng, 6)
    ggn = rng.uniform(1, 50, tiny_autoencoder().num_params)

    def prediction():
        model = tiny_autoencoder()
        p = predict(model, x, DiagonalLaplace(model.get_params(), asarray(ggn), 1.0), n_samples=K, rng=11,
                    batch_size=4)
        return [to_numpy(getattr(p, k)) for k in ("z_mean", "z_var", "x_mean", "x_var", "log_px", "mse")], p.n_samples

    one, K1 = prediction()
    comm = ThreadRanks(2)
    for parts, K2 in comm.run(prediction):
        assert K1 == K2 == K
        for a, b in zip(parts, one):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_fit_over_ranks_equals_one_process_and_only_rank_0_writes(rng, tmp_path, monkeypatch):
    """Catches a rank other than 0 writing the checkpoint (two writers of one file), a validation MSE of one
    shard only (another early-stopping decision), or per-rank statistics in the history."""
    from minilae import training  # noqa: PLC0415

    writers = []
    save = training.save_checkpoint
    monkeypatch.setattr(training, "save_checkpoint",
                        lambda *a, **k: (writers.append(distributed.current().rank), save(*a, **k))[1])
    x, x_val = images(rng, 20), images(rng, 7)

    def run(out):
        trainer = TRAINERS["online"](tiny_autoencoder())
        state = fit(trainer, x, x_val, epochs=2, batch_size=6, seed=2, checkpoint=out / "ckpt.npz",
                    progress=False, log=lambda *a: None)
        return to_numpy(trainer.theta), to_numpy(trainer.H), state["history"]

    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    theta1, H1, history1 = run(tmp_path / "one")
    comm = ThreadRanks(2)
    writers.clear()
    for theta, H, history in comm.run(lambda: run(tmp_path / "two")):
        np.testing.assert_allclose(theta, theta1, rtol=TIGHT, atol=TIGHT * np.abs(theta1).max())
        np.testing.assert_allclose(H, H1, rtol=TIGHT)
        for a, b in zip(history, history1):
            for k in ("train_mse", "train_nll", "val_mse"):
                assert a[k] == pytest.approx(b[k], rel=TIGHT)
    assert writers == [0, 0]  # one checkpoint per epoch, by rank 0
    state, _ = load_checkpoint(tmp_path / "two" / "ckpt.npz")
    np.testing.assert_array_equal(state["trainer"]["theta"], theta)


@pytest.mark.backends("numpy")
@pytest.mark.parametrize("n_train, batch_size, n_val, message", [
    (64, 1, 10, "too few in --batch-size (1)"),
    (65, 32, 10, "too few in the last batch of an epoch (1)"),
    (64, 32, 2, "too few in the validation images (2)"),
])
def test_a_run_that_leaves_a_rank_without_images_is_refused(n_train, batch_size, n_val, message):
    """Catches a data-parallel run that starts and then fails (or hangs) at the first batch a rank gets no
    image of; on one process the same sizes are fine."""
    from minilae import train  # noqa: PLC0415

    config = {**train.DEFAULTS, "batch_size": batch_size}
    with pytest.raises(train.UsageError, match=re.escape(f"3 ranks need at least 3 images in every batch; {message}")):
        train._check_ranks(config, type("Three", (distributed.SingleProcess,), {"size": 3})(), n_train, n_val)
    train._check_ranks(config, distributed.SingleProcess(), n_train, n_val)


# ----------------------------------------------------------------------------------------------
# MPI: real ranks under mpiexec (subprocesses)

def mpiexec():
    """The mpiexec beside this Python (the MPICH wheel's) or on PATH; skips (fails under CI=true) without MPI."""
    found = Path(sys.executable).with_name("mpiexec")
    found = str(found) if found.exists() else shutil.which("mpiexec")
    try:
        import mpi4py  # noqa: F401, PLC0415
    except ImportError:
        found = None
    if found is None:
        reason = f"MPI test: mpi4py or mpiexec is missing; install them with {distributed.INSTALL}"
        if in_ci():
            pytest.fail(f"{reason} - CI=true, so missing MPI is an error", pytrace=False)
        pytest.skip(reason)
    return found


def run_ranks(args, ranks=2, timeout=180, **kw):
    """`mpiexec -n ranks python ARGS` in its own session (so a kill reaches every rank); CompletedProcess."""
    env = {**os.environ, "MINILAE_DATA": str(require_data()), "MPLBACKEND": "Agg"}
    return subprocess.run([mpiexec(), "-n", str(ranks), sys.executable, *args], capture_output=True, text=True,
                          env=env, timeout=timeout, start_new_session=True, **kw)


COMM_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np
    from pathlib import Path
    from minilae import backend, distributed
    comm = distributed.init("mpi")
    host = np.full(3, comm.rank + 1.0)
    total = comm.allreduce_sum(host)
    backend.set_backend("guard")  # a backend array goes through the host explicitly and comes back as one
    guard = comm.allreduce_sum(backend.asarray(np.arange(2.0) * (comm.rank + 1)))
    try:
        comm.check_identical(np.array([float(comm.rank)]), "the probe")
        differs = None
    except distributed.DistributedError as err:
        differs = str(err)
    comm.check_identical(np.arange(4.0), "theta")
    # one file per rank: the ranks' stdout lines can interleave in mpiexec's output
    Path(sys.argv[1], f"rank{comm.rank}.json").write_text(json.dumps({"rank": comm.rank, "size": comm.size, "total": total.tolist(), "in_place": total is host,
                      "guard": backend.to_numpy(guard).tolist(), "guard_type": type(guard).__module__,
                      "count": comm.allreduce_sum(comm.rank + 1), "mean": comm.mean({"v": comm.rank * 1.0}, comm.rank + 1),
                      "root": comm.broadcast(f"from {comm.rank}"), "differs": differs}))
""")


@pytest.mark.slow
@pytest.mark.backends("numpy")
def test_the_mpi_communicator_on_two_ranks(tmp_path):
    """Catches an MPI all-reduce that is not the sum (or not in place on host buffers), a backend array that
    comes back as a host array, a broadcast from the wrong rank and a divergence check that cannot fail."""
    done = run_ranks(["-c", COMM_SCRIPT, str(tmp_path)], timeout=60)
    assert done.returncode == 0, done.stderr
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in out] == [0, 1]
    for r in out:
        assert r["size"] == 2 and r["total"] == [3.0] * 3 and r["in_place"] and r["count"] == 3
        assert r["guard"] == [0.0, 3.0] and r["guard_type"] == "minilae._guard"
        assert r["mean"] == {"v": 2 / 3} and r["root"] == "from 0"
        assert "the probe differs between the 2 ranks" in r["differs"]


TINY = ["--limit-train", "96", "--batch-size", "32", "--limit-val", "32", "--samples", "2", "--ood-dataset", "none",
        "--no-plots", "--quiet", "--dtype", "float64", "--seed", "3"]
EPOCHS = 3
RUNS = {"online": ["--method", "online", "--epochs", str(EPOCHS), *TINY],
        "posthoc": ["--method", "posthoc", "--epochs", "1", "--posthoc-batch-size", "20", *TINY]}
EQUAL = 1e-9  # float64 after a few Adam steps: the ranks' partial sums added in another order than one process's


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{method: (one-process run folder, 2-rank run folder)} of the same command."""
    from minilae import train  # noqa: PLC0415

    folders = {}
    for method, args in RUNS.items():
        base = tmp_path_factory.mktemp(method)
        os.environ.setdefault("MINILAE_DATA", str(require_data()))
        assert train.main([*args, "--out", str(base / "one")]) == 0
        two = run_ranks(["-m", "minilae.train", *args, "--out", str(base / "two")])
        assert two.returncode == 0, two.stderr
        folders[method] = (base / "one", base / "two")
    return folders


def close(a, b, what):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    error = float(np.abs(a - b).max() / np.abs(b).max())
    assert error <= EQUAL, f"{what}: relative difference {error:.2e} > {EQUAL:g}"


@pytest.mark.slow
@pytest.mark.backends("numpy")
@pytest.mark.parametrize("method", list(RUNS))
def test_two_ranks_end_where_one_process_ends(method, runs):
    """Catches a 2-rank run on real MNIST that is another computation than one process with the same global batch
    (a shard's gradient, its own weight samples, a GGN not summed) and a rank other than 0 writing files."""
    one, two = runs[method]
    (a, _), (b, _) = load_checkpoint(one / "checkpoint.npz"), load_checkpoint(two / "checkpoint.npz")
    assert a["epoch"] == b["epoch"] and a["trainer"]["t"] == b["trainer"]["t"]
    close(b["trainer"]["theta"], a["trainer"]["theta"], "theta")
    if method == "online":
        close(b["trainer"]["H"], a["trainer"]["H"], "H")
    else:
        close(b["posterior"]["ggn"], a["posterior"]["ggn"], "the post-hoc GGN")
        close(b["posterior"]["prior_precision"], a["posterior"]["prior_precision"], "the prior precision")
    m_a, m_b = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m_b["distributed"] == {"kind": "mpi", "ranks": 2} and "distributed" not in m_a
    for k in ("mse", "log_px", "x_var", "z_var"):  # the K = 2 networks split 1 + 1 over the ranks
        close(m_b["val"][k], m_a["val"][k], f"validation {k}")
    assert sorted(p.name for p in two.iterdir()) == ["checkpoint.npz", "metrics.json"]


@pytest.mark.slow
@pytest.mark.backends("numpy")
def test_a_killed_two_rank_run_resumes_to_the_uninterrupted_result(runs, tmp_path):
    """Catches a 2-rank resume that is not exact: ranks reading different checkpoints, a rank that starts afresh,
    or a kill that leaves a partial checkpoint."""
    cut = tmp_path / "cut"
    env = {**os.environ, "MINILAE_DATA": str(require_data())}
    proc = subprocess.Popen([mpiexec(), "-n", "2", sys.executable, "-m", "minilae.train", *RUNS["online"],
                             "--out", str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not (cut / "checkpoint.npz").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # mpiexec and both ranks, possibly mid-write
    proc.wait()
    state, _ = load_checkpoint(cut / "checkpoint.npz")
    assert state["stage"] == "train" and 1 <= state["epoch"] < EPOCHS, "the run was not interrupted mid-training"

    resumed = run_ranks(["-m", "minilae.train", "--out", str(cut), "--resume", "--quiet"])
    assert resumed.returncode == 0, resumed.stderr
    (a, _), (b, _) = load_checkpoint(runs["online"][1] / "checkpoint.npz"), load_checkpoint(cut / "checkpoint.npz")
    assert a["epoch"] == b["epoch"] == EPOCHS
    np.testing.assert_array_equal(b["trainer"]["theta"], a["trainer"]["theta"])
    np.testing.assert_array_equal(b["trainer"]["H"], a["trainer"]["H"])


@pytest.mark.slow
@pytest.mark.backends("numpy")
@pytest.mark.parametrize("args, status, message", [
    (["--out", "{run}"], 1, "already holds a run"),  # rank 0 alone fails; rank 1 waits for it
    (["--method", "vae", "--out", "{new}"], 2, "--method vae does not run on 2 ranks"),
])
def test_a_failing_rank_ends_the_whole_job(args, status, message, runs, tmp_path):
    """Catches a job that hangs when one rank stops (the other waits forever in a collective) or a method that
    cannot run data parallel silently training something else."""
    args = [a.format(run=runs["online"][1], new=tmp_path / "new") for a in args]
    done = run_ranks(["-m", "minilae.train", *TINY, "--epochs", "1", *args], timeout=60)  # a hang times out
    assert done.returncode == status and message in done.stderr, done.stderr
    assert not (tmp_path / "new" / "checkpoint.npz").exists()
