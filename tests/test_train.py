"""Tests for `python -m minilae.train`: flags, end-to-end runs on real MNIST, resume, bad input."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minilae import train
from minilae.training import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.backends("numpy")  # the CLI picks its own backend; tests/test_guard.py runs it on the guard

QUICK = ["--epochs", "2", "--limit-train", "256", "--limit-val", "64", "--samples", "4", "--quiet"]


def data_root():
    root = os.environ.get("MINILAE_DATA")
    if not root:
        pytest.fail("set MINILAE_DATA to the folder with MNIST/ and FashionMNIST/ (CI: ../shared/data)")
    return root


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
    (["--hessian", "kfac"], "invalid choice"),
    (["--backend", "jax"], "invalid choice"),
    (["--seed", "-3"], "integer >= 0"),
])
def test_wrong_flag_values_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--hessian", "mixed"], "--hessian mixed needs --hessian-threshold"),
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
    out = tmp_path / method
    assert train.main(["--method", method, *QUICK, "--out", str(out)]) == 0
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

    model, posterior, args = train.load_run(out)  # what a notebook does with a finished run
    np.testing.assert_array_equal(model.get_params(), state["trainer"]["theta"])
    assert args["method"] == method and (posterior is None) == (method == "ae")
    if posterior is not None:
        assert posterior.prior_precision == metrics["posterior"]["prior_precision"]


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
