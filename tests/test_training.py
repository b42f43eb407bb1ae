"""Tests for minilae.training: the MAP step, the epoch loop and schedule, exact resumption, checkpoints."""
import copy
import math

import numpy as np
import pytest

from minilae import training
from minilae.backend import asarray, to_numpy
from minilae.gradcheck import assert_close, numerical_gradient
from minilae.losses import Gaussian
from minilae.models import mlp_autoencoder
from minilae.online import OnlineLaplace
from minilae.optim import SGD, Adam
from minilae.training import (CheckpointError, MAPTrainer, check_signature, epoch_rngs, fit, load_checkpoint,
                              model_signature, reconstruction_mse, save_checkpoint)

IMAGE = (1, 2, 3)


def tiny(seed=0):
    return mlp_autoencoder(input_shape=IMAGE, latent_size=2, hidden=(4,), seed=seed)


def data(rng, n):
    return rng.uniform(0, 1, size=(n,) + IMAGE)


def quiet(*args, **kwargs):
    pass


def test_map_step_is_adam_on_the_mean_nll(rng):
    model = tiny()
    x = asarray(data(rng, 6))
    theta0 = model.get_params()

    def mean_nll(th):
        model.set_params(th)
        return Gaussian(1.0).nll(model.forward(x), x).mean().reshape(1)

    g = numerical_gradient(mean_nll, theta0.copy())
    model.set_params(theta0)
    trainer = MAPTrainer(model, Adam(lr=0.01))
    stats = trainer.step(x)
    assert_close(trainer.theta, theta0 - 0.01 * g / (np.abs(g) + 1e-8), 1e-6, "theta after one Adam step")
    np.testing.assert_array_equal(to_numpy(model.get_params()), to_numpy(trainer.theta))
    assert stats["mse"] == pytest.approx(float(((tiny().forward(x) - x) ** 2).mean()), rel=1e-12)


def make_trainer(kind, seed=0):
    model = tiny(seed)
    if kind == "ae":
        return MAPTrainer(model, Adam(lr=0.01))
    return OnlineLaplace(model, 40, alpha=0.05, optimizer=Adam(lr=0.01))


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("kind", ["ae", "online"])
@pytest.mark.parametrize("stop_after", [1, 3])
def test_interrupted_and_resumed_run_ends_identically(kind, stop_after, rng, tmp_path):
    x_train, x_val = data(rng, 40), data(rng, 10)
    kw = dict(epochs=5, batch_size=8, seed=3, log=quiet, progress=False)
    full = make_trainer(kind)
    fit(full, x_train, x_val, checkpoint=tmp_path / "full.npz", **kw)

    def interrupt(epoch, record):
        if epoch == stop_after:
            raise Interrupt

    first = make_trainer(kind)
    with pytest.raises(Interrupt):
        fit(first, x_train, x_val, checkpoint=tmp_path / "cut.npz", on_epoch_end=interrupt, **kw)
    state, config = load_checkpoint(tmp_path / "cut.npz")
    assert state["epoch"] == stop_after and config == {}
    resumed = make_trainer(kind, seed=1)  # a different init: everything must come from the checkpoint
    fit(resumed, x_train, x_val, checkpoint=tmp_path / "cut.npz", resume=state, **kw)

    np.testing.assert_array_equal(to_numpy(resumed.theta), to_numpy(full.theta))
    if kind == "online":
        np.testing.assert_array_equal(to_numpy(resumed.H), to_numpy(full.H))
    a, b = load_checkpoint(tmp_path / "full.npz")[0], load_checkpoint(tmp_path / "cut.npz")[0]
    assert [r["val_mse"] for r in a["history"]] == [r["val_mse"] for r in b["history"]]


def test_result_is_the_best_validation_epoch(rng):
    x_train, x_val = data(rng, 40), data(rng, 10)
    trainer = make_trainer("online")
    state = fit(trainer, x_train, x_val, epochs=6, batch_size=8, seed=0, log=quiet, progress=False)
    val = [r["val_mse"] for r in state["history"]]
    assert state["best"]["epoch"] == int(np.argmin(val)) + 1
    assert reconstruction_mse(trainer.model, x_val) == pytest.approx(min(val), rel=1e-12)


def test_plateau_halves_the_lr_and_early_stopping_ends_the_run(rng):
    """With a vanishing learning rate the validation loss never improves after epoch 1."""
    trainer = MAPTrainer(tiny(), SGD(lr=1e-300))
    state = fit(trainer, data(rng, 16), data(rng, 8), epochs=50, batch_size=8, seed=0, lr_patience=2,
                stop_patience=5, log=quiet, progress=False)
    assert state["epoch"] == 6  # epoch 1 is the best, then 5 epochs without improvement
    lrs = [r["lr"] for r in state["history"]]
    # the lr in a record is the one used during that epoch; it halves after epochs 3 and 5
    assert lrs == [1e-300] * 3 + [5e-301] * 2 + [2.5e-301]


def test_epoch_generators_depend_only_on_seed_and_epoch():
    a_host, a_dev = epoch_rngs(7, 3)
    b_host, b_dev = epoch_rngs(7, 3)
    np.testing.assert_array_equal(a_host.permutation(20), b_host.permutation(20))
    np.testing.assert_array_equal(to_numpy(a_dev.standard_normal(5)), to_numpy(b_dev.standard_normal(5)))
    c_host, _ = epoch_rngs(7, 4)
    assert not np.array_equal(epoch_rngs(7, 3)[0].permutation(20), c_host.permutation(20))


def test_fit_rejects_empty_data(rng):
    with pytest.raises(ValueError, match="need training and validation images"):
        fit(make_trainer("ae"), data(rng, 0), data(rng, 4), epochs=1, batch_size=2, log=quiet)


# ----------------------------------------------------------------------------------------------
# checkpoints

def sample_state():
    return {"stage": "train", "epoch": 2, "nested": {"theta": np.arange(5.0), "none": None, "best": math.inf,
                                                     "betas": (0.9, 0.999), "t": np.int64(3)},
            "history": [{"val_mse": 0.5}], "flag": True}


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "run" / "ckpt.npz"
    save_checkpoint(path, sample_state(), {"args": {"model": "mlp"}})
    state, config = load_checkpoint(path)
    np.testing.assert_array_equal(state["nested"]["theta"], np.arange(5.0))
    assert state["nested"]["none"] is None and state["nested"]["best"] == math.inf
    assert state["nested"]["betas"] == [0.9, 0.999] and state["nested"]["t"] == 3
    assert state["history"] == [{"val_mse": 0.5}] and state["flag"] is True
    assert config == {"args": {"model": "mlp"}}


def test_failed_write_never_replaces_a_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, sample_state(), {"v": 1})
    good = path.read_bytes()

    def partial_savez(f, **arrays):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(training.np, "savez", partial_savez)
    bad = sample_state()
    bad["epoch"] = 99
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, bad, {"v": 2})
    assert path.read_bytes() == good
    assert load_checkpoint(path)[0]["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz"]  # no temporary file left behind


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_damaged_checkpoints_give_clear_errors(damage, tmp_path):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, sample_state(), {})
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    else:
        path.unlink()
    with pytest.raises(CheckpointError, match="unreadable|no checkpoint"):
        load_checkpoint(path)


def test_checkpoint_of_another_format_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    monkeypatch.setattr(training, "CHECKPOINT_FORMAT", 0)
    save_checkpoint(path, sample_state(), {})
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="format 0"):
        load_checkpoint(path)


def test_signature_mismatch_names_the_differences():
    a = mlp_autoencoder(input_shape=IMAGE, latent_size=2, hidden=(4,))
    b = mlp_autoencoder(input_shape=IMAGE, latent_size=3, hidden=(4,))
    check_signature(model_signature(a, "mlp"), model_signature(a, "mlp"))
    with pytest.raises(CheckpointError, match="latent_size: checkpoint 2, this run 3"):
        check_signature(model_signature(a, "mlp"), model_signature(b, "mlp"))
    c = mlp_autoencoder(input_shape=IMAGE, latent_size=2, hidden=(5,))
    with pytest.raises(CheckpointError, match="num_params"):
        check_signature(model_signature(a, "mlp"), model_signature(c, "mlp"))


def test_load_state_dict_refuses_another_parameter_count(rng):
    state = copy.deepcopy(MAPTrainer(tiny()).state_dict())
    other = MAPTrainer(mlp_autoencoder(input_shape=IMAGE, latent_size=2, hidden=(6,)))
    with pytest.raises(CheckpointError, match="parameters"):
        other.load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# device hygiene, checked on the guard backend

@pytest.mark.backends("guard")
@pytest.mark.parametrize("kind", ["ae", "online"])
def test_a_training_step_moves_no_arrays_and_syncs_only_scalars(kind, rng):
    """Bug caught: a host copy inside the training loop (to_numpy of an array, a float() per sample or per
    parameter): a step moves no array either way, and its device syncs (logged scalars, finiteness checks)
    do not grow with the batch."""
    from minilae import _guard  # noqa: PLC0415
    from minilae.backend import xp  # noqa: PLC0415
    trainer, noise = make_trainer(kind), xp().random.default_rng(0)
    counts = []
    for B in (4, 16):
        x = asarray(data(rng, B))
        trainer.step(x, noise)  # the online trainer's first step also sets H_0
        with _guard.watch() as seen:
            trainer.step(x, noise)
        counts.append(seen)
    assert all(c["to_host"] == 0 and c["to_device"] == 0 for c in counts), counts
    assert counts[0]["syncs"] == counts[1]["syncs"], counts


@pytest.mark.backends("guard")
def test_fit_never_holds_the_data_set_on_the_device(rng):
    """Bug caught: the training set moved to the device at once (asarray(x_train)), which fails on a GPU
    smaller than the data: the largest device array of a fit over 200 images is far below their size."""
    from minilae import _guard  # noqa: PLC0415
    x_train, x_val = data(rng, 200), data(rng, 50)
    with _guard.watch() as seen:
        fit(make_trainer("online"), x_train, x_val, epochs=1, batch_size=8, seed=0, log=quiet, progress=False)
    assert seen["largest"] < x_train.size // 2, seen
