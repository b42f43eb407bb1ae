"""Tests for `python -m minilae.train`: flags, end-to-end runs on real MNIST, resume, bad input."""
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import require_data

from minilae import train
from minilae.data import load_dataset
from minilae.hessian import chain
from minilae.posthoc import fit_posthoc
from minilae.training import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.backends("numpy")  # the CLI picks its own backend; tests/test_guard.py runs it on the guard

QUICK = ["--epochs", "2", "--limit-train", "256", "--limit-val", "64", "--samples", "4", "--quiet"]


def data_root():
    return str(require_data())  # skips with the reason without the data, fails under CI=true


def run_cli(args, timeout=240):
    """The command in a fresh process, as a user runs it."""
    env = {**os.environ, "MINILAE_DATA": data_root()}
    return subprocess.run([sys.executable, "-m", "minilae.train", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


# ----------------------------------------------------------------------------------------------
# flags

def test_help_documents_every_flag(capsys):
    parser = train.build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help text"
        for option in action.option_strings:
            assert option in text
    assert "--resume" in text and "minutes" in text  # expected runtime of the default run


def test_no_flags_means_the_online_lae_on_mnist():
    config, explicit, resumed = train.resolve_config([])
    assert (config["method"], config["dataset"], config["model"], config["hessian"]) == ("online", "mnist", "mlp",
                                                                                       "approx")
    assert (config["lr"], config["alpha"], config["prior_precision"], config["samples"]) == (1e-3, 1e-3, 1.0, 100)
    assert (config["lr_patience"], config["stop_patience"]) == (5, 8)
    assert explicit == {} and resumed is None
    assert train._out_dir(config).parent == Path("runs")
    assert train._out_dir(config).name.startswith("mnist-mlp-online-")


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "positive integer"),
    (["--batch-size", "ten"], "positive integer"),
    (["--lr", "-1"], "number > 0"),
    (["--alpha", "2"], "alpha must lie in (0, 1]"),
    (["--prior-precision", "nan"], "number > 0"),
    (["--model", "resnet"], "invalid choice"),
    (["--dataset", "cifar10"], "invalid choice"),
    (["--hessian", "block"], "invalid choice"),
    (["--backend", "jax"], "invalid choice"),
    (["--seed", "-3"], "integer >= 0"),
    (["--ensemble-size", "0"], "positive integer"),
    (["--dropout", "1.0"], "dropout probability p in [0, 1)"),
    (["--dropout", "-0.1"], "dropout probability p in [0, 1)"),
    (["--beta", "-1"], "KL weight beta >= 0"),
    (["--beta", "inf"], "KL weight beta >= 0"),
    (["--method", "gp"], "invalid choice"),
])
def test_wrong_flag_values_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--hessian", "mixed"], "--hessian mixed needs --hessian-threshold"),
    (["--method", "online", "--hessian", "kfac"], "--hessian kfac is post-hoc only"),
    (["--method", "online", "--hessian", "kfac-approx"], "is not sum_t w_t kron(G_t, A_t)"),
    (["--resume"], "--resume needs --out"),
])
def test_impossible_flag_combinations(args, message, capsys):
    assert train.main(args) == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# end to end on real data

@pytest.mark.slow
@pytest.mark.parametrize("method", ["online", "posthoc", "ae"])
def test_end_to_end_on_mnist(method, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MINILAE_DATA", data_root())
    from minilae import plots  # noqa: PLC0415
    real, variance_given = plots.plot_reconstructions, []

    def spy(groups, path, **kw):  # ae: its x_var is 0, and Fig. 8 must not draw it on a 0-to-1 scale
        variance_given.extend(g[3] is not None for g in groups)
        return real(groups, path, **kw)

    monkeypatch.setattr(plots, "plot_reconstructions", spy)
    out = tmp_path / method
    assert train.main(["--method", method, *QUICK, "--out", str(out)]) == 0
    assert variance_given == [method != "ae"] * 2
    printed = capsys.readouterr().out
    assert f"results written to {out}" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["method"] == method and metrics["epochs_trained"] == 2
    assert [r["epoch"] for r in metrics["history"]] == [1, 2]
    for part in ("val", "ood"):
        assert np.isfinite([metrics[part][k] for k in ("mse", "log_px", "x_var", "z_var")]).all()
    assert metrics["ood"]["dataset"] == "fashionmnist" and metrics["val"]["n_images"] == 64
    if method == "ae":
        assert metrics["posterior"] is None and metrics["val"]["x_var"] == 0
    else:
        assert metrics["posterior"]["precision_min"] >= metrics["posterior"]["prior_precision"] > 0
        assert metrics["val"]["x_var"] > 0 and metrics["val"]["n_samples"] == 4
    if method == "posthoc":
        assert np.isfinite(metrics["posthoc"]["log_marginal_likelihood"])
    for name in ("reconstructions.png", "latent.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state, _ = load_checkpoint(out / "checkpoint.npz")
    assert state["stage"] == "done" and state["epoch"] == 2

    predictor = train.load_run(out)  # what a notebook does with a finished run
    np.testing.assert_array_equal(predictor.model.get_params(), state["trainer"]["theta"])
    assert predictor.method == predictor.config["method"] == method
    assert (predictor.posterior is None) == (method == "ae") and predictor.stochastic == (method != "ae")
    if predictor.posterior is not None:
        assert predictor.posterior.prior_precision == metrics["posterior"]["prior_precision"]


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path):
    common = ["--epochs", "6", "--limit-train", "256", "--limit-val", "64", "--samples", "2", "--no-plots",
              "--quiet", "--seed", "5"]
    full = run_cli([*common, "--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr

    cut = tmp_path / "cut"
    env = {**os.environ, "MINILAE_DATA": data_root()}
    proc = subprocess.Popen([sys.executable, "-m", "minilae.train", *common, "--out", str(cut)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while not (cut / "checkpoint.npz").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()  # SIGKILL: no clean-up, possibly in the middle of writing the next checkpoint
    proc.wait()
    state, _ = load_checkpoint(cut / "checkpoint.npz")  # whatever is there must be a whole checkpoint
    assert state["stage"] == "train" and 1 <= state["epoch"] < 6, "the run was not interrupted mid-training"

    resumed = run_cli(["--out", str(cut), "--resume", "--quiet"])  # everything else from the checkpoint
    assert resumed.returncode == 0, resumed.stderr
    a, _ = load_checkpoint(tmp_path / "full" / "checkpoint.npz")
    b, _ = load_checkpoint(cut / "checkpoint.npz")
    assert a["stage"] == b["stage"] == "done" and a["epoch"] == b["epoch"]
    np.testing.assert_array_equal(a["trainer"]["theta"], b["trainer"]["theta"])
    np.testing.assert_array_equal(a["trainer"]["H"], b["trainer"]["H"])
    m_a = json.loads((tmp_path / "full" / "metrics.json").read_text())
    m_b = json.loads((cut / "metrics.json").read_text())
    assert m_a["val"] == m_b["val"]


# ----------------------------------------------------------------------------------------------
# bad input

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A one-epoch MLP run whose checkpoint the resume tests abuse."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = run_cli(["--epochs", "1", "--limit-train", "128", "--limit-val", "32", "--samples", "2",
                      "--no-plots", "--quiet", "--ood-dataset", "none", "--out", str(out)])
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--model", "conv"], "--model: checkpoint 'mlp', given 'conv'"),
    (["--latent-size", "3"], "--latent-size: checkpoint 2, given 3"),
    (["--method", "ae"], "--method: checkpoint 'online', given 'ae'"),
])
def test_resume_with_another_architecture_is_refused(finished_run, flags, message, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run, run_dir)
    result = run_cli(["--out", str(run_dir), "--resume", *flags])
    assert result.returncode == 1
    assert message in result.stderr and "different run" in result.stderr


@pytest.mark.slow
def test_checkpoint_whose_weights_belong_to_another_architecture(finished_run, tmp_path):
    """Flags agree but the stored architecture signature does not: the loader notices."""
    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run, run_dir)
    state, config = load_checkpoint(run_dir / "checkpoint.npz")
    config["signature"]["num_params"] += 1
    config["signature"]["model"] = "conv"
    save_checkpoint(run_dir / "checkpoint.npz", state, config)
    result = run_cli(["--out", str(run_dir), "--resume"])
    assert result.returncode == 1
    assert "different architecture" in result.stderr and "model: checkpoint 'conv', this run 'mlp'" in result.stderr


@pytest.mark.slow
def test_resume_from_a_corrupt_checkpoint(finished_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run, run_dir)
    ckpt = run_dir / "checkpoint.npz"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    result = run_cli(["--out", str(run_dir), "--resume"])
    assert result.returncode == 1 and "unreadable, truncated" in result.stderr


def test_resume_without_a_checkpoint(tmp_path):
    assert train.main(["--out", str(tmp_path), "--resume"]) == 1


def test_missing_data_files(tmp_path, capsys):
    assert train.main([*QUICK, "--data-root", str(tmp_path / "empty"), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "not found" in err and "python datasets.py" in err


@pytest.mark.slow
def test_corrupt_data_file_fails_its_checksum(tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(Path(data_root()) / "MNIST" / "raw", root / "MNIST" / "raw",
                    ignore=shutil.ignore_patterns("*.npz"))
    labels = root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    raw = bytearray(labels.read_bytes())
    raw[-20] ^= 0xFF
    labels.write_bytes(bytes(raw))
    assert train.main([*QUICK, "--data-root", str(root), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "checksum" in err and "train-labels-idx1-ubyte.gz" in err


# ----------------------------------------------------------------------------------------------
# the command under faults: the output folder, signals, memory, resume, divergence, backend

TINY = ["--epochs", "1", "--limit-train", "64", "--limit-val", "16", "--samples", "2", "--no-plots", "--quiet",
        "--ood-dataset", "none"]


def one_line_error(err, *parts):
    """stderr is one 'error: ...' line naming every part, without a traceback."""
    assert "Traceback" not in err and err.startswith("error: ") and err.strip().count("\n") == 0, err
    for part in parts:
        assert part in err, (part, err)


def copy_run(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    return copy


@pytest.fixture(scope="module")
def posthoc_run(tmp_path_factory):
    """A one-epoch post-hoc run (approx GGN) whose posterior the resume tests redo."""
    out = tmp_path_factory.mktemp("posthoc") / "run"
    result = run_cli(["--method", "posthoc", *TINY, "--out", str(out)])
    assert result.returncode == 0, result.stderr
    return out


def test_usage_errors_of_the_output_flags(capsys, tmp_path):
    """Catches --out '' writing into the current folder, and --resume with --overwrite accepted."""
    no_data = ["--data-root", str(tmp_path / "no-data")]  # a run that does start fails at once
    for args, message in [(["--out", ""], "--out needs a folder name"),
                          (["--out", str(tmp_path), "--resume", "--overwrite"], "give only one")]:
        assert train.main([*TINY, *no_data, *args]) == 2
        assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("present", [["checkpoint.npz"], ["metrics.json"]])
def test_a_folder_that_holds_a_run_is_refused(present, tmp_path, capsys, monkeypatch):
    """Catches a new run silently replacing the checkpoint and metrics of an earlier one (exit 0)."""
    monkeypatch.setenv("MINILAE_DATA", data_root())
    for name in present:
        (tmp_path / name).write_bytes(b"an earlier run")
    assert train.main([*TINY, "--out", str(tmp_path)]) == 1
    one_line_error(capsys.readouterr().err, "already holds a run", *present, "--resume", "--overwrite")
    assert all((tmp_path / name).read_bytes() == b"an earlier run" for name in present)


def test_overwrite_replaces_only_the_run_files(finished_run, tmp_path, capsys, monkeypatch):
    """Catches --overwrite leaving the old run's files (a stale figure) or deleting files that are not ours."""
    monkeypatch.setenv("MINILAE_DATA", data_root())
    run_dir = copy_run(finished_run, tmp_path)
    (run_dir / "latent.png").write_bytes(b"old figure")
    (run_dir / "member.npz").write_bytes(b"an ensemble member's epoch checkpoint")
    (run_dir / "notes.txt").write_text("mine")
    assert train.main([*TINY, "--method", "ae", "--out", str(run_dir), "--overwrite"]) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["config"]["method"] == "ae"
    assert load_checkpoint(run_dir / "checkpoint.npz")[1]["args"]["method"] == "ae"
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.npz", "metrics.json", "notes.txt"]


def test_a_run_holds_its_folder_locked_and_a_second_run_fails_at_once(tmp_path, capsys, monkeypatch):
    """Catches two runs into one folder both 'succeeding' (one result lost): the folder must be locked."""
    monkeypatch.setenv("MINILAE_DATA", data_root())
    seen = {}

    def probe(config, resumed=None, log=print, argv=None):  # stands in for the training, inside the lock
        if not seen:  # (without a lock the second run would call probe again)
            seen["second"] = None
            seen["second"] = train.main([*TINY, "--out", config["out"]])
            seen["err"] = capsys.readouterr().err

    monkeypatch.setattr(train, "run", probe)
    assert train.main([*TINY, "--out", str(tmp_path)]) == 0
    assert seen["second"] == 1
    one_line_error(seen["err"], f"{tmp_path} is in use by another run")
    fd = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released at the end of the run
    os.close(fd)


def test_metrics_are_written_like_the_checkpoint(tmp_path, monkeypatch):
    """Catches metrics.json written through one fixed temporary name without fsync: concurrent writers
    then rename each other's file away (FileNotFoundError) and a crash can leave it empty. The writer's
    own concurrency is tested in tests/test_files.py; here: metrics go through it, with an fsync each."""
    fsyncs, writes = [], []
    real_fsync, real_write = os.fsync, train.atomic_write
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    monkeypatch.setattr(train, "atomic_write", lambda path, fill: (writes.append(path), real_write(path, fill))[1])
    path = tmp_path / "metrics.json"
    for k in range(3):
        train._write_json(path, {"k": k, "pad": [0.5] * 2000})
    assert writes == [path] * 3 and len(fsyncs) == 3
    assert json.loads(path.read_text())["k"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_stale_temporary_files_of_a_killed_run_are_removed_on_resume(finished_run, tmp_path, monkeypatch):
    """Catches the temporary checkpoint/metrics files of a killed run (25 MB each here) piling up forever."""
    monkeypatch.setenv("MINILAE_DATA", data_root())
    run_dir = copy_run(finished_run, tmp_path)
    stale = [".checkpoint.npz.4242.0123456789abcdef0123456789abcdef.tmp", ".metrics.json.99.%s.tmp" % ("f" * 32)]
    kept = [".checkpoint.npz.mine.tmp", "notes.tmp"]
    for name in stale + kept:
        (run_dir / name).write_bytes(b"x")
    assert train.main(["--out", str(run_dir), "--resume", "--quiet"]) == 0
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(["checkpoint.npz", "metrics.json", *kept])


@pytest.mark.parametrize("case", ["read-only", "a file", "under a file"])
def test_an_unusable_out_is_refused_before_the_data_are_read(case, tmp_path, capsys):
    """Catches a raw traceback for an unusable --out, and the read-only case refused only after an epoch:
    the data root is empty, so a check made after loading the data would report the data instead."""
    out = {"read-only": tmp_path / "ro", "a file": tmp_path / "file", "under a file": tmp_path / "file" / "run"}[case]
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "ro").mkdir(mode=0o555)
    try:
        assert train.main([*TINY, "--data-root", str(tmp_path / "no-data"), "--out", str(out)]) == 1
    finally:
        (tmp_path / "ro").chmod(0o755)
    message = {"read-only": "is not writable", "a file": "is a file, not a folder",
               "under a file": "cannot create the output folder"}[case]
    one_line_error(capsys.readouterr().err, str(out), message)
    assert not (tmp_path / "no-data").exists() and list((tmp_path / "ro").iterdir()) == []


def test_a_full_disk_mid_run_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    """Catches an OSError (ENOSPC while writing the epoch-2 checkpoint) escaping as a traceback."""
    monkeypatch.setenv("MINILAE_DATA", data_root())
    real_savez, calls = np.savez, []

    def savez(f, **arrays):
        calls.append(".checkpoint.npz." in f.name)  # (a first data load also writes its cache)
        if sum(calls) == 2 and calls[-1]:
            f.write(b"PK half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_savez(f, **arrays)

    monkeypatch.setattr(np, "savez", savez)
    out = tmp_path / "run"
    assert train.main([*TINY, "--epochs", "3", "--out", str(out)]) == 1
    one_line_error(capsys.readouterr().err, str(out / "checkpoint.npz"), "No space left on device")
    state, _ = load_checkpoint(out / "checkpoint.npz")
    assert state["epoch"] == 1 and sorted(p.name for p in out.iterdir()) == ["checkpoint.npz"]


@pytest.mark.parametrize("make_it_fail", ["missing data", "memory", "diverges"])
def test_a_failing_run_leaves_no_empty_folder_it_created(make_it_fail, tmp_path, capsys, monkeypatch):
    """Catches the empty output folder (and its parents) left behind after an early failure; a folder that
    existed before is kept."""
    monkeypatch.setenv("MINILAE_DATA", data_root())
    monkeypatch.setattr(chain, "free_memory", lambda xp: 2 * 2**30)
    flags = {"missing data": ["--data-root", str(tmp_path / "no-data")],
             "memory": ["--model", "conv", "--hessian", "exact"], "diverges": ["--lr", "10"]}[make_it_fail]
    assert train.main([*TINY, *flags, "--out", str(tmp_path / "new" / "run")]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    existing = tmp_path / "existing"
    existing.mkdir()
    assert train.main([*TINY, *flags, "--out", str(existing)]) == 1
    assert existing.is_dir() and list(existing.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, said", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_sigterm_ends_like_ctrl_c(sig, code, said, tmp_path):
    """Catches SIGTERM killing the run without a word (exit -15); both signals keep the checkpoint."""
    out = tmp_path / "run"
    env = {**os.environ, "MINILAE_DATA": data_root()}
    # a suite started in the background (nohup, `&`) hands its children SIGINT ignored, and Python then installs
    # no KeyboardInterrupt handler: give the run the default disposition a terminal would
    proc = subprocess.Popen([sys.executable, "-m", "minilae.train", *TINY, "--epochs", "200", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.npz").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert said in err and f"--out {out} --resume" in err and "Traceback" not in err
    state, _ = load_checkpoint(out / "checkpoint.npz")
    assert state["stage"] == "train" and 1 <= state["epoch"] < 200


@pytest.mark.parametrize("method, hessian, what", [("online", "exact", "the online training step"),
                                                   ("posthoc", "exact", "the post-hoc GGN pass"),
                                                   ("posthoc", "sqrt", "the post-hoc GGN pass"),
                                                   ("posthoc", "kfac", "the post-hoc GGN pass")])
def test_a_hessian_pass_that_cannot_fit_is_refused_before_training(method, hessian, what, tmp_path, capsys,
                                                                   monkeypatch):
    """Catches the post-hoc pass refused only after a whole epoch of training (and at a hidden batch of 256)."""
    monkeypatch.setenv("MINILAE_DATA", data_root())
    monkeypatch.setattr(chain, "free_memory", lambda xp: 2 * 2**30)  # the budget: 80% of 2 GiB
    out = tmp_path / "run"
    assert train.main([*TINY, "--model", "conv", "--method", method, "--hessian", hessian, "--out", str(out)]) == 1
    one_line_error(capsys.readouterr().err, what, f"--hessian {hessian}, batch 64", "refused before starting",
                   "--batch-size")
    assert not out.exists()


def test_the_posthoc_pass_uses_posthoc_batch_size(tmp_path, monkeypatch):
    """Catches the post-hoc GGN pass ignoring the flags (always batches of 256)."""
    monkeypatch.setenv("MINILAE_DATA", data_root())
    seen = []

    def spy(model, x, **kw):
        seen.append(kw["batch_size"])
        return fit_posthoc(model, x, **kw)

    monkeypatch.setattr(train, "fit_posthoc", spy)
    assert train.main(["--method", "posthoc", *TINY, "--batch-size", "32", "--out", str(tmp_path / "a")]) == 0
    assert train.main(["--method", "posthoc", *TINY, "--posthoc-batch-size", "16", "--out", str(tmp_path / "b")]) == 0
    assert seen == [32, 16]


@pytest.mark.slow
@pytest.mark.parametrize("flags, changed", [
    (["--hessian", "mixed", "--hessian-threshold", "256"], {"hessian": "mixed", "threshold": 256}),
    (["--fix-prior"], {"fix_prior": True}),
])
def test_a_finished_posthoc_run_gets_a_new_posterior(posthoc_run, flags, changed, tmp_path, capsys, monkeypatch):
    """Catches a finished post-hoc run refused ('different run') when only its posterior's flags change, or
    resumed without recomputing the posterior; the MAP network and its history stay as they were."""
    monkeypatch.setenv("MINILAE_DATA", data_root())
    run_dir = copy_run(posthoc_run, tmp_path)
    before, _ = load_checkpoint(run_dir / "checkpoint.npz")
    assert train.main(["--out", str(run_dir), "--resume", *flags]) == 0
    after, stored = load_checkpoint(run_dir / "checkpoint.npz")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key, value in changed.items():
        assert stored["args"][key] == value and metrics["config"][key] == value
    assert metrics["posthoc"]["hessian"] == stored["args"]["hessian"]
    np.testing.assert_array_equal(after["trainer"]["theta"], before["trainer"]["theta"])
    assert after["history"] == before["history"]
    if "hessian" in changed:
        assert not np.array_equal(after["posterior"]["ggn"], before["posterior"]["ggn"])
    else:
        np.testing.assert_array_equal(after["posterior"]["ggn"], before["posterior"]["ggn"])
        # the fixed prior is the run's --prior-precision (1), not the evidence's optimum found before
        assert after["posterior"]["prior_precision"] == stored["args"]["prior_precision"] \
            != before["posterior"]["prior_precision"]


@pytest.mark.slow
def test_posthoc_kfac_end_to_end(posthoc_run, tmp_path, capsys, monkeypatch):
    """`--method posthoc --hessian kfac` on real MNIST (the finished MLP post-hoc run given a KFAC posterior,
    one KFAC pass for the suite's time): the checkpoint stores the Kronecker factors, load_run gives back the
    same KroneckerLaplace and its predictive works, the MAP network is unchanged; resumed with --hessian
    approx the run gets its diagonal back. Catches the KFAC posterior saved as a diagonal one (KeyError
    'ggn') or loaded as one, and the KFAC flags counted as defining the MAP network (resume refused)."""
    from minilae.kfac import KroneckerLaplace  # noqa: PLC0415
    monkeypatch.setenv("MINILAE_DATA", data_root())
    run_dir = copy_run(posthoc_run, tmp_path)
    before, _ = load_checkpoint(run_dir / "checkpoint.npz")
    assert train.main(["--out", str(run_dir), "--resume", "--hessian", "kfac"]) == 0
    state, stored = load_checkpoint(run_dir / "checkpoint.npz")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert stored["args"]["hessian"] == metrics["posthoc"]["hessian"] == "kfac"
    assert np.isfinite(metrics["posthoc"]["log_marginal_likelihood"])
    assert metrics["posterior"]["precision_min"] >= metrics["posterior"]["prior_precision"] > 0
    assert np.isfinite([metrics["val"][k] for k in ("mse", "log_px", "x_var")]).all() and metrics["val"]["x_var"] > 0
    assert state["posterior"]["structure"] == "kfac" and "ggn" not in state["posterior"]
    np.testing.assert_array_equal(state["trainer"]["theta"], before["trainer"]["theta"])
    predictor = train.load_run(run_dir)
    q = predictor.posterior
    assert isinstance(q, KroneckerLaplace) and q.prior_precision == metrics["posterior"]["prior_precision"]
    for blk, saved in zip(q.blocks, state["posterior"]["blocks"]):
        np.testing.assert_array_equal(blk.A, saved["A"])
        np.testing.assert_array_equal(blk.G, saved["G"])
    x = load_dataset("mnist", "test", root=data_root())[0][:4]
    pred = predictor.predict(x, n_samples=2, rng=5)
    assert np.isfinite(pred.x_var).all() and (pred.x_var > 0).all()
    assert train.main(["--out", str(run_dir), "--resume", "--hessian", "approx"]) == 0
    again, _ = load_checkpoint(run_dir / "checkpoint.npz")
    np.testing.assert_array_equal(again["posterior"]["ggn"], before["posterior"]["ggn"])


@pytest.mark.slow
def test_the_hessian_of_an_online_run_still_defines_it(finished_run, tmp_path, capsys):
    """Catches the post-hoc exemption (the Hessian does not define the MAP network) applied to the online LAE,
    whose training uses the Hessian."""
    run_dir = copy_run(finished_run, tmp_path)
    assert train.main(["--out", str(run_dir), "--resume", "--hessian", "exact"]) == 1
    assert "--hessian: checkpoint 'approx', given 'exact'" in capsys.readouterr().err


@pytest.mark.slow
def test_the_prior_precision_of_a_posthoc_run_defines_its_map_network(posthoc_run, tmp_path, capsys):
    """Catches --prior-precision exempted like the posterior's flags, although the post-hoc MAP network is
    trained under the prior (weight decay lambda / N), so another lambda would need another network."""
    run_dir = copy_run(posthoc_run, tmp_path)
    assert train.main(["--out", str(run_dir), "--resume", "--prior-precision", "5"]) == 1
    assert "--prior-precision: checkpoint 1.0, given 5.0" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["online", "posthoc"])
def test_resume_epochs_trains_a_finished_run_on_as_one_longer_run(method, tmp_path, capsys, monkeypatch):
    """Catches --resume --epochs N on a finished run silently re-evaluating it and recording N."""
    monkeypatch.setenv("MINILAE_DATA", data_root())
    common = ["--method", method, *TINY, "--seed", "3"]
    assert train.main([*common, "--epochs", "3", "--out", str(tmp_path / "full")]) == 0
    assert train.main([*common, "--epochs", "2", "--out", str(tmp_path / "cut")]) == 0
    assert train.main(["--out", str(tmp_path / "cut"), "--resume", "--epochs", "3", "--quiet"]) == 0
    a, _ = load_checkpoint(tmp_path / "full" / "checkpoint.npz")
    b, _ = load_checkpoint(tmp_path / "cut" / "checkpoint.npz")
    assert a["epoch"] == b["epoch"] == 3 and b["stage"] == "done"
    assert [r["val_mse"] for r in a["history"]] == [r["val_mse"] for r in b["history"]]
    np.testing.assert_array_equal(a["trainer"]["theta"], b["trainer"]["theta"])
    if method == "online":
        np.testing.assert_array_equal(a["trainer"]["H"], b["trainer"]["H"])
    else:  # the posterior is recomputed at the new MAP
        np.testing.assert_array_equal(a["posterior"]["ggn"], b["posterior"]["ggn"])


@pytest.mark.slow
def test_resume_epochs_that_cannot_be_reached_is_refused(tmp_path, capsys, monkeypatch):
    """Catches --resume --epochs N silently accepted (and recorded) below the epochs trained or after early
    stopping ended the run; the N already trained just evaluates again."""
    monkeypatch.setenv("MINILAE_DATA", data_root())
    run_dir = tmp_path / "run"
    assert train.main([*TINY, "--epochs", "2", "--out", str(run_dir)]) == 0
    ckpt = run_dir / "checkpoint.npz"
    assert train.main(["--out", str(run_dir), "--resume", "--epochs", "2", "--quiet"]) == 0
    before = ckpt.read_bytes()
    assert train.main(["--out", str(run_dir), "--resume", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "--epochs 1: the run in" in err and "has already trained 2 epochs" in err
    assert ckpt.read_bytes() == before
    state, config = load_checkpoint(ckpt)
    state["stopper"]["num_bad_epochs"] = state["stopper"]["patience"]  # as if early stopping had fired
    save_checkpoint(ckpt, state, config)
    before = ckpt.read_bytes()
    assert train.main(["--out", str(run_dir), "--resume", "--epochs", "4"]) == 2
    assert "stopped early after epoch 2" in capsys.readouterr().err
    assert ckpt.read_bytes() == before


@pytest.fixture
def no_cupy(tmp_path):
    """An environment in which `import cupy` fails, as on a machine without CuPy (on any machine)."""
    shadow = tmp_path / "shadow" / "cupy"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('CuPy is hidden by the test')\n")
    path = os.pathsep.join([str(tmp_path / "shadow"), os.environ.get("PYTHONPATH", "")])
    env = {k: v for k, v in os.environ.items() if k != "MINILAE_BACKEND"}
    return {**env, "PYTHONPATH": path, "MINILAE_DATA": data_root()}


def cli(args, env):
    return subprocess.run([sys.executable, "-m", "minilae.train", *args], capture_output=True, text=True, env=env,
                          timeout=240)


@pytest.mark.slow
def test_a_gpu_run_resumed_on_a_cpu_machine_is_told_to_use_backend_numpy(finished_run, tmp_path, no_cupy):
    """Catches the advice to set MINILAE_BACKEND, which a resumed run ignores (the checkpoint says cupy)."""
    run_dir = copy_run(finished_run, tmp_path)
    state, config = load_checkpoint(run_dir / "checkpoint.npz")
    config["args"]["backend"] = "cupy"
    save_checkpoint(run_dir / "checkpoint.npz", state, config)
    refused = cli(["--out", str(run_dir), "--resume"], no_cupy)
    assert refused.returncode == 1
    one_line_error(refused.stderr, "cupy backend cannot be used", "CuPy is not installed", "--backend numpy")
    assert "MINILAE_BACKEND" not in refused.stderr
    done = cli(["--out", str(run_dir), "--resume", "--backend", "numpy", "--quiet"], no_cupy)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--help"], [*TINY, "--backend", "numpy"]])
def test_minilae_backend_cupy_without_cupy_does_not_break_help_or_backend_numpy(args, tmp_path, no_cupy):
    """Catches MINILAE_BACKEND=cupy breaking even --help at import time, and --backend numpy not overriding it.
    (Needs backend.py not to raise at import time.)"""
    result = cli([*args, "--out", str(tmp_path / "run")] if "--help" not in args else args,
                 {**no_cupy, "MINILAE_BACKEND": "cupy"})
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout if "--help" in args else (tmp_path / "run" / "metrics.json").is_file()


@pytest.mark.parametrize("method", ["ae", "online", "vae", "mc-dropout", "ensemble", "ae-var"])
def test_an_exploding_loss_stops_with_the_divergence_error(method, tmp_path, capsys, monkeypatch):
    """Catches --lr 10 ending with exit 0 and a validation MSE of ~1e6 marked [best]: only nan/inf counted;
    and (ae-var) a decoded log-variance whose e^s overflows escaping as a traceback."""
    monkeypatch.setenv("MINILAE_DATA", data_root())
    out = tmp_path / "run"
    assert train.main(["--method", method, *TINY, "--ensemble-size", "2", "--lr", "10", "--out", str(out)]) == 1
    said = (["log-variance", "overflows float32"] if method == "ae-var"
            else ["training diverged in epoch 1", "times the untrained model's"])
    one_line_error(capsys.readouterr().err, "training diverged", *said, "smaller learning rate (--lr)")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# the baselines (issue 10): every method from the command, through one Predictor

BASELINES = ("ae-var", "vae", "mc-dropout", "ensemble")
SMALL = ["--epochs", "2", "--limit-train", "256", "--limit-val", "64", "--samples", "4", "--quiet",
         "--ensemble-size", "2", "--seed", "2"]


@pytest.fixture(scope="module")
def baseline_runs(tmp_path_factory):
    """One two-epoch run of every baseline, on the guard backend (every host/device slip of the new code fails
    here), with what each handed the Fig. 1 plot: {method: (run folder, (heat-map given?, note))}."""
    root, runs = tmp_path_factory.mktemp("baselines"), {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINILAE_DATA", data_root())
        mp.setenv("MINILAE_BACKEND", "guard")
        from minilae import plots  # noqa: PLC0415
        real, seen = plots.plot_latent_variance, {}

        def spy(z, labels, xs, ys, variance, path, title="", note=None):
            seen["latent"] = (variance is not None, note)
            return real(z, labels, xs, ys, variance, path, title=title, note=note)

        mp.setattr(plots, "plot_latent_variance", spy)
        for method in BASELINES:
            out = root / method
            assert train.main(["--method", method, *SMALL, "--out", str(out)]) == 0, method
            runs[method] = (out, seen.pop("latent"))
    return runs


def val_images(n=64):
    return load_dataset("mnist", "val", root=data_root())[0][:n]


@pytest.mark.slow
@pytest.mark.parametrize("method", BASELINES)
def test_every_baseline_trains_from_the_command_and_predicts(method, baseline_runs, monkeypatch):
    """Catches a baseline whose loss does not fall, whose metrics or figures are missing, whose prediction has
    other shapes or a negative / non-finite variance, and a load_run that gives back another predictor than the
    run evaluated (other weights, members, masks or codes)."""
    monkeypatch.setenv("MINILAE_DATA", data_root())
    out, (heat_map, note) = baseline_runs[method]
    metrics = json.loads((out / "metrics.json").read_text())
    state, _ = load_checkpoint(out / "checkpoint.npz")
    assert metrics["config"]["method"] == method and state["stage"] == "done"
    histories = ([m["history"] for m in metrics["members"]] if method == "ensemble" else [metrics["history"]])
    untrained = ([m["untrained_val_mse"] for m in state["members"]] if method == "ensemble"
                 else [state["untrained_val_mse"]])
    for history, before in zip(histories, untrained, strict=True):
        assert [r["epoch"] for r in history] == [1, 2]
        assert history[-1]["val_mse"] < before and history[1]["train_nll"] < history[0]["train_nll"]
    for part in ("val", "ood"):
        assert np.isfinite([metrics[part][k] for k in ("mse", "log_px", "x_var", "z_var")]).all()
        assert metrics[part]["x_var"] >= 0 and metrics[part]["z_var"] >= 0
    assert metrics["val"]["n_samples"] == (2 if method == "ensemble" else 1 if method == "ae-var" else 4)
    assert (metrics["val"]["x_var"] > 0) and ((metrics["val"]["z_var"] > 0) == (method != "ae-var"))
    for name in ("reconstructions.png", "latent.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert heat_map == (method != "vae") and (note is None) == heat_map
    if method == "ensemble":
        assert [m["seed"] for m in metrics["members"]] == [train.member_seed(2, m) for m in range(2)]
        assert len({m["seed"] for m in metrics["members"]}) == 2

    predictor = train.load_run(out, method=method)
    x = val_images()
    pred = predictor.predict(x, n_samples=4, rng=train._evaluation_rng(2))
    assert pred.summary() == metrics["val"]  # the same draws as the run's own evaluation
    assert pred.x_mean.shape == pred.x_var.shape == x.shape and pred.z_var.shape == (64, 2)
    assert (pred.x_var >= 0).all() and np.isfinite(pred.x_var).all()
    K = 1 if method == "ae-var" else 3
    assert predictor.sample_codes(x, 3, rng=1).shape == (K, 64, 2)
    assert predictor.sample_reconstructions(x, 3, rng=1).shape == (K, 64, 1, 28, 28)


@pytest.mark.slow
def test_a_run_of_another_method_given_to_the_loader_is_refused(baseline_runs):
    """Catches load_run(DIR, method='ae') quietly handing back a VAE (a downstream table row mislabelled)."""
    out, _ = baseline_runs["vae"]
    with pytest.raises(ValueError, match=r"holds a run of method 'vae', not 'ae'"):
        train.load_run(out, method="ae")
    with pytest.raises(ValueError, match="unknown method 'gp'"):
        train.load_run(out, method="gp")
    assert train.load_run(out).method == "vae"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vae", "mc-dropout"])
def test_a_resumed_run_ends_equal_to_an_uninterrupted_one(method, baseline_runs, tmp_path, monkeypatch):
    """Catches noise (the VAE's codes, the dropout masks) drawn from generators that a resumed run does not
    re-create: the run cut after epoch 1 and resumed would end with other weights."""
    monkeypatch.setenv("MINILAE_DATA", data_root())
    full, _ = baseline_runs[method]
    cut = tmp_path / "cut"
    flags = [f if f != "2" or i != 1 else "1" for i, f in enumerate(SMALL)]  # --epochs 1
    assert train.main(["--method", method, *flags, "--no-plots", "--out", str(cut)]) == 0
    assert train.main(["--out", str(cut), "--resume", "--epochs", "2", "--no-plots", "--quiet"]) == 0
    a, _ = load_checkpoint(full / "checkpoint.npz")
    b, _ = load_checkpoint(cut / "checkpoint.npz")
    np.testing.assert_array_equal(a["trainer"]["theta"], b["trainer"]["theta"])
    assert [r["val_mse"] for r in a["history"]] == [r["val_mse"] for r in b["history"]]
    assert json.loads((full / "metrics.json").read_text())["val"] == json.loads((cut / "metrics.json").read_text())["val"]


@pytest.mark.slow
def test_an_ensemble_interrupted_inside_its_second_member_continues_there(baseline_runs, tmp_path, monkeypatch,
                                                                          capsys):
    """Catches a resumed ensemble retraining a finished member, restarting the member it was in, or ending with
    other members than an uninterrupted run; and load_run of the interrupted run not giving its finished member."""
    monkeypatch.setenv("MINILAE_DATA", data_root())
    full, _ = baseline_runs["ensemble"]
    cut = tmp_path / "cut"
    real_fit, calls = train.fit, []

    def interrupting_fit(trainer, *args, on_epoch_end=None, **kw):
        calls.append((kw["seed"], None if kw["resume"] is None else kw["resume"]["epoch"]))

        def hook(epoch, record):
            on_epoch_end(epoch, record)
            if len(calls) == 2 and epoch == 1:  # inside the second member, after its first epoch
                raise KeyboardInterrupt
        return real_fit(trainer, *args, on_epoch_end=hook, **kw)

    monkeypatch.setattr(train, "fit", interrupting_fit)
    assert train.main(["--method", "ensemble", *SMALL, "--no-plots", "--out", str(cut)]) == 130
    assert "--resume" in capsys.readouterr().err
    state, _ = load_checkpoint(cut / "checkpoint.npz")
    assert len(state["members"]) == 1 and state["current"]["member"] == 1 and state["current"]["state"]["epoch"] == 1
    assert len(train.load_run(cut).thetas) == 1
    calls.clear()
    assert train.main(["--out", str(cut), "--resume", "--no-plots", "--quiet"]) == 0
    assert calls == [(train.member_seed(2, 1), 1)]  # member 0 is not retrained; member 1 continues after epoch 1
    a, _ = load_checkpoint(full / "checkpoint.npz")
    b, _ = load_checkpoint(cut / "checkpoint.npz")
    assert b["stage"] == "done" and b["current"] is None and not (cut / "member.npz").exists()
    for m in range(2):
        np.testing.assert_array_equal(a["members"][m]["trainer"]["theta"], b["members"][m]["trainer"]["theta"])
    assert [(r["member"], r["val_mse"]) for r in a["history"]] == [(r["member"], r["val_mse"]) for r in b["history"]]
    assert json.loads((full / "metrics.json").read_text())["val"] == json.loads((cut / "metrics.json").read_text())["val"]


@pytest.mark.slow
def test_a_finished_ensemble_trains_on_as_one_longer_run(baseline_runs, tmp_path, monkeypatch):
    """Catches --resume --epochs N on a finished ensemble re-evaluating it unchanged, or training its members on
    from their best epoch instead of their last (the result would differ from a 3-epoch ensemble)."""
    monkeypatch.setenv("MINILAE_DATA", data_root())
    run_dir = copy_run(baseline_runs["ensemble"][0], tmp_path)
    flags = [f if f != "2" or i != 1 else "3" for i, f in enumerate(SMALL)]  # --epochs 3
    assert train.main(["--method", "ensemble", *flags, "--no-plots", "--out", str(tmp_path / "full")]) == 0
    assert train.main(["--out", str(run_dir), "--resume", "--epochs", "3", "--no-plots", "--quiet"]) == 0
    a, _ = load_checkpoint(tmp_path / "full" / "checkpoint.npz")
    b, _ = load_checkpoint(run_dir / "checkpoint.npz")
    assert b["epoch"] == 3 and [s["epoch"] for s in b["members"]] == [3, 3]
    for m in range(2):
        np.testing.assert_array_equal(a["members"][m]["trainer"]["theta"], b["members"][m]["trainer"]["theta"])
