"""minilae.experiments: the tasks' building blocks on fakes, then every task end to end on real data at a tiny
size through the command (runs trained once per module and shared), reuse after an interruption, bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import require_data

from minilae import backend
from minilae.backend import asarray, to_numpy, xp
from minilae.experiments import cli, imputation, knn, ood, runs


class FakePredictor:
    """Predictor contract on a linear map: reconstruction r_k(x) = 0.5 x + k-th noise draw; codes_k = (k + 1) x[:, :2] + k."""

    stochastic, latent_size, input_shape = True, 2, (1, 4, 4)

    def __init__(self):
        self.calls = []

    def sample_reconstructions(self, x, n_samples, rng=None, batch_size=500):
        self.calls.append(n_samples)
        x = asarray(x)
        return xp().stack([0.5 * x + rng.random(x.shape) for _ in range(n_samples)])

    def sample_codes(self, x, n_samples, rng=None, batch_size=500):
        flat = asarray(x.reshape(len(x), -1)[:, :2])
        return xp().stack([flat * (k + 1) + k for k in range(n_samples)])  # draws differ in scale and shift


def test_impute_chain_follows_the_schedule():
    """Observed pixels stay exactly the truth; the number of passes is chains x (steps of 1 + one of `refine`);
    with the fake's mean reconstruction 0.5 x + 0.5 the missing pixels follow x <- 0.5 x + U, then the refined
    average. Catches a chain that overwrites observed pixels, skips the refinement or averages the wrong axis."""
    x = np.random.default_rng(0).random((3, 1, 4, 4)).astype(np.float32)
    mask = imputation.lower_half_mask(x.shape[1:])
    assert mask[0, :2].sum() == 0 and mask[0, 2:].sum() == 8
    fake = FakePredictor()
    imp, start = imputation.impute(fake, x, mask, xp().random.default_rng(1), chains=4, steps=3, refine=5)
    assert imp.shape == (4, 3, 1, 4, 4) and fake.calls == [1, 1, 1, 5] * 4
    np.testing.assert_array_equal(imp[..., 2:, :], np.broadcast_to(x[..., 2:, :], imp[..., 2:, :].shape))
    np.testing.assert_array_equal(start[..., 2:, :], x[..., 2:, :])
    # missing pixels: after 3 steps of x <- 0.5 x + u and a mean of 5 passes, they lie in (0, 2)
    assert np.all((imp[..., :2, :] > 0) & (imp[..., :2, :] < 2))
    assert not np.allclose(imp[0], imp[1])  # independent chains


def test_knn_embedding_is_the_averaged_distance():
    """||e_i - e_j||^2 = 1/K sum_k ||z_k(x_i) - z_k(x_j)||^2 for e = concatenated codes / sqrt(K). Catches
    averaging the codes first (a different distance) or pairing draw k of one image with draw k' of another."""
    x = np.random.default_rng(2).random((5, 1, 4, 4))
    fake = FakePredictor()
    e = knn.embed(fake, x, 3, seed=0)
    z = to_numpy(fake.sample_codes(x, 3))
    brute = np.array([[np.mean([((z[k, i] - z[k, j]) ** 2).sum() for k in range(3)]) for j in range(5)]
                      for i in range(5)])
    np.testing.assert_allclose(((e[:, None] - e[None]) ** 2).sum(-1), brute, rtol=1e-12, atol=1e-12)


def test_labelled_draws_and_too_many_labels():
    """n labels of every class, the same draw for every method (seeded), and n >= a class size refused."""
    y = np.repeat(np.arange(10), 6)
    draws = knn.labelled_draws(y, 2, 3, seed=0)
    assert all(np.array_equal(np.bincount(y[d], minlength=10), np.full(10, 2)) for d in draws)
    assert np.array_equal(draws[0], knn.labelled_draws(y, 2, 1, seed=0)[0]) and not np.array_equal(*draws[:2])
    with pytest.raises(ValueError, match=r"labels per class \[6\].*6 images"):
        knn.check_labels(y, [1, 6])


def test_ood_scores_of_a_deterministic_method_are_missing():
    """Zero variances are no score (None, shown '-'), never an AUROC of 0.5; typicality is |nll - typical|."""
    pred = {"z_var": np.zeros((3, 2)), "x_var": np.zeros((3, 1, 2, 2)), "log_px": np.array([-1.0, -2.0, -4.0])}
    s = ood.scores(pred, typical_nll=2.5)
    assert s["latent variance"] is None and s["output variance"] is None
    np.testing.assert_allclose(s["typicality"], [1.5, 0.5, 1.5])
    np.testing.assert_allclose(s["log-likelihood"], [1.0, 2.0, 4.0])


# ----------------------------------------------------------------------------------------------
# end to end on real data, tiny: a few hundred images, one epoch, few samples

TINY = ["--epochs", "1", "--limit-train", "200", "--limit-val", "200", "--samples", "3", "--quiet"]
TASK_FLAGS = {"ood": ["--limit-test", "60"], "imputation": ["--limit-test", "40", "--steps", "2", "--chains", "2",
                                                              "--refine", "2", "--classifier-epochs", "1"],
              "knn": ["--labels", "1,5", "--repetitions", "2"]}


# every method goes through the cheapest task (MLP codes); the conv and chain tasks take a deterministic and
# a stochastic method, to keep the suite's time
TASK_METHODS = {"ood": ["ae", "online"], "imputation": ["ae", "online"], "knn": list(runs.train.METHODS)}


def command(task, runs_dir, out, *extra):
    methods = ["--methods", ",".join(TASK_METHODS[task])] if "--methods" not in extra else []
    return [task, "--runs", str(runs_dir), "--out", str(out), *TINY, *TASK_FLAGS[task], *methods, *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every task run once on numpy (trains all runs); (runs folder, {task: output folder})."""
    require_data()
    root = tmp_path_factory.mktemp("experiments")
    outs = {}
    backend.set_backend("numpy")
    for task in cli.TASKS:
        outs[task] = root / f"out-{task}"
        assert cli.main(command(task, root / "runs", outs[task])) == 0
    return root / "runs", outs


@pytest.mark.slow
@pytest.mark.backends("numpy")
@pytest.mark.parametrize("task", cli.TASKS)
def test_task_writes_table_and_figures(trained, task):
    """Every method asked for (knn: all of train.METHODS) has a row with finite numbers (deterministic
    variances '-'), and the figures exist. Catches a method silently dropped, NaN metrics, a missing file."""
    _, outs = trained
    table = json.loads((outs[task] / "table.json").read_text())
    assert table["methods"] == TASK_METHODS[task]
    for name in table["figures"]:
        assert (outs[task] / name).stat().st_size > 1000
    md = (outs[task] / "table.md").read_text()
    assert all(f"| {m} |" in md for m in table["methods"]) and "nan" not in md.lower()
    if task == "ood":
        assert table["metrics"]["ae"]["latent variance"]["auroc"] is None
        assert all(0 <= v["auroc"] <= 1 for v in table["metrics"]["online"].values())
    if task == "imputation":
        assert set(table["rows"]) == {"classifier", *table["methods"]}
        assert all(0 <= r["accuracy"] <= 1 and r["ece"] >= 0 for r in table["rows"].values())
    if task == "knn":
        for r in table["results"].values():
            assert set(r) == {"1", "5"} and all(len(v["accuracy"]) == 2 for v in r.values())


@pytest.mark.slow
@pytest.mark.backends("guard")
@pytest.mark.parametrize("task", cli.TASKS)
def test_task_on_the_guard_backend(trained, task, array_backend, tmp_path):
    """The evaluation of every task with reused runs on the guard backend (CuPy's host/device rules): catches
    an implicit transfer in the tasks' code; the same numbers come out as on numpy."""
    runs_dir, outs = trained
    assert cli.main(command(task, runs_dir, tmp_path / "out")) == 0
    assert backend.get_backend() == array_backend
    table, ref = (json.loads((o / "table.json").read_text()) for o in (tmp_path / "out", outs[task]))
    key = {"ood": "metrics", "imputation": "rows", "knn": "results"}[task]
    assert json.dumps(table[key]) == json.dumps(ref[key]) or _close(table[key], ref[key])


def _close(a, b):
    """Nested dicts/lists of numbers equal to float32 rounding."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(u, v) for u, v in zip(a, b))
    return a == b or (a is not None and b is not None and abs(a - b) <= 1e-4 * max(1.0, abs(b)))


@pytest.mark.slow
@pytest.mark.backends("numpy")
def test_restarted_task_reuses_finished_runs(trained, tmp_path):
    """After an interruption (one run left with only its checkpoint), the same command resumes that run and
    reuses the finished ones untouched (checkpoint mtimes): catches retraining on every call."""
    runs_dir, _ = trained
    copy = tmp_path / "runs"
    shutil.copytree(runs_dir, copy)
    folder = copy / "knn-mnist-mlp"
    (folder / "online" / "metrics.json").unlink()  # the 'online' run never finished its evaluation
    before = {m: (folder / m / "checkpoint.npz").stat().st_mtime_ns for m in ("ae", "posthoc")}
    assert cli.main(command("knn", copy, tmp_path / "out", "--methods", "ae,posthoc,online")) == 0
    assert {m: (folder / m / "checkpoint.npz").stat().st_mtime_ns for m in ("ae", "posthoc")} == before
    assert (folder / "online" / "metrics.json").is_file()
    assert (tmp_path / "out" / "table.json").is_file()


@pytest.mark.slow
@pytest.mark.backends("numpy")
def test_bad_input(trained, tmp_path, capsys):
    """Unknown task or method (2), n larger than a class (2, before training or writing anything), an occupied
    --out (2), a runs folder of another dataset/model or a method's folder holding another method's run (1)."""
    runs_dir, outs = trained
    assert cli.main(["segmentation"]) == 2
    assert cli.main(command("knn", tmp_path / "r", tmp_path / "o", "--methods", "ae,gan")) == 2
    assert "unknown method(s) gan" in capsys.readouterr().err
    assert cli.main(command("knn", tmp_path / "r", tmp_path / "o", "--labels", "1,30")) == 2
    assert "labels per class [30]" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "o").exists()  # nothing trained or written
    assert cli.main(command("knn", runs_dir, outs["knn"])) == 2
    assert "already holds files" in capsys.readouterr().err
    wrong = tmp_path / "wrong"
    shutil.copytree(runs_dir / "knn-mnist-mlp", wrong / "ood-fashionmnist-conv")
    assert cli.main(command("ood", wrong, tmp_path / "o2", "--methods", "ae")) == 1
    err = capsys.readouterr().err
    assert "holds a run of another experiment" in err and "dataset: stored 'mnist'" in err
    shutil.copytree(runs_dir / "knn-mnist-mlp" / "ae", tmp_path / "swapped" / "knn-mnist-mlp" / "online")
    assert cli.main(command("knn", tmp_path / "swapped", tmp_path / "o3", "--methods", "online")) == 1
    assert "method: stored 'ae'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.backends("numpy")
def test_reverse_ood_trains_on_mnist_and_scores_fashionmnist(tmp_path):
    """--reverse swaps the datasets: the runs are MNIST conv runs and the table names MNIST in, FashionMNIST
    out. Catches the flag being ignored (FashionMNIST runs) or only half applied (a wrong OOD set)."""
    require_data()
    out = tmp_path / "out"
    assert cli.main(command("ood", tmp_path / "runs", out, "--reverse", "--methods", "ae")) == 0
    assert (tmp_path / "runs" / "ood-mnist-conv" / "ae" / "metrics.json").is_file()
    assert not (tmp_path / "runs" / "ood-fashionmnist-conv").exists()
    assert "in mnist (test), out fashionmnist (test)" in (out / "table.md").read_text()


@pytest.mark.backends("numpy")  # builds a command line: host only
@pytest.mark.parametrize("quiet", [False, True])
def test_training_runs_show_progress_unless_the_experiment_is_quiet(quiet):
    """A long experiment's training runs print their epochs (no --quiet) unless --quiet is asked: catches the
    runs being silenced always (hours with no sign of progress) or --quiet not reaching them."""
    spec = runs.RunSpec(task="knn", dataset="mnist", model="mlp", latent_size=2, seed=0, quiet=quiet)
    assert ("--quiet" in spec.train_argv("ae", "runs/x")) is quiet
