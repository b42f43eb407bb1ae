"""Tests for minilae.training: the MAP step, the epoch loop and schedule, exact resumption, checkpoints."""
import copy
import math

import numpy as np
import pytest

from minilae import training
from minilae.backend import asarray, to_numpy, xp
from minilae.gradcheck import assert_close, fd_roundoff, numerical_gradient
from minilae.losses import Gaussian, HeteroscedasticGaussian
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


@pytest.mark.parametrize("B, lr", [(6, 0.1), (1, 0.05), (11, 0.3)])
def test_map_step_is_sgd_on_the_mean_nll(B, lr, rng):
    """One SGD step: theta_1 = theta_0 - lr * grad_theta mean_b nll_b, with the gradient by central
    differences. Bug caught: the batch gradient summed instead of averaged (B times too large),
    which Adam's first step, ~ lr * sign(g), hides."""
    model = tiny()
    x = asarray(data(rng, B))
    theta0 = model.get_params()

    def mean_nll(th):
        model.set_params(th)
        return Gaussian(1.0).nll(model.forward(x), x).mean().reshape(1)

    g = numerical_gradient(mean_nll, theta0.copy())
    atol = 10 * fd_roundoff(float(mean_nll(theta0)[0]))  # 10x the differences' round-off floor
    model.set_params(theta0)
    trainer = MAPTrainer(model, SGD(lr=lr))
    trainer.step(x)
    assert_close((theta0 - trainer.theta) / lr, g, 1e-6, "SGD update / lr = mean-over-batch gradient", atol=atol)
    np.testing.assert_array_equal(to_numpy(model.get_params()), to_numpy(trainer.theta))


def make_trainer(kind, seed=0):
    if kind in ("ae-var", "mc-dropout"):
        return variant_trainer(kind, seed)
    model = tiny(seed)
    if kind == "ae":
        return MAPTrainer(model, Adam(lr=0.01))
    return OnlineLaplace(model, 40, alpha=0.05, optimizer=Adam(lr=0.01))


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("kind", ["ae", "online", "ae-var", "mc-dropout"])
@pytest.mark.parametrize("stop_after", [1, 3])
def test_interrupted_and_resumed_run_ends_identically(kind, stop_after, rng, tmp_path):
    """Also catches a dropout model drawing its masks from generators of its own, which no checkpoint holds."""
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


def scheduled_trainer(kind, seed=0):
    """A trainer whose run with lr_patience=1, stop_patience=3 halves the lr several times and stops early."""
    model = tiny(seed)
    if kind == "ae":
        return MAPTrainer(model, Adam(lr=0.1))
    return OnlineLaplace(model, 40, alpha=0.05, optimizer=Adam(lr=0.1))


@pytest.mark.parametrize("kind", ["ae", "online"])
def test_resume_keeps_the_lr_schedule_and_the_early_stopping_state(kind, rng, tmp_path):
    """Interrupted where the lr has already been halved, is halved again later, and the stopping
    count is running: the resumed run must repeat the uninterrupted one (lr per epoch, best epoch,
    stop epoch, final weights). Bugs caught: a resume that drops the scheduler's or the early
    stopper's state (both restart from 'best = inf', delaying the next halving and the stop)."""
    x_train, x_val = data(rng, 40), data(rng, 10)
    kw = dict(epochs=40, batch_size=8, seed=3, lr_patience=1, stop_patience=3, log=quiet, progress=False)
    cuts = {}

    def keep_checkpoints(epoch, record):
        cuts[epoch] = load_checkpoint(tmp_path / "full.npz")[0]  # the state a kill after this epoch leaves

    full = scheduled_trainer(kind)
    ref = fit(full, x_train, x_val, checkpoint=tmp_path / "full.npz", on_epoch_end=keep_checkpoints, **kw)
    lrs = [r["lr"] for r in ref["history"]]
    stop = ref["epoch"]
    halved_after = [e for e in range(1, stop) if lrs[e] < lrs[e - 1]]  # lr lowered at the end of epoch e
    # the cut c: a halving at or before c; another at the end of c + 1 (a restarted scheduler would
    # count c + 1 as an improvement and skip it); the best epoch before c, so the count of bad
    # epochs that ends the run spans the cut (a restarted stopper would count from c + 1, stop later)
    candidates = [c for c in range(halved_after[0], stop - 1)
                  if c + 1 in halved_after and ref["best"]["epoch"] <= c]
    assert stop < kw["epochs"] and candidates, (lrs, stop, ref["best"]["epoch"])
    cut = candidates[0]

    resumed = scheduled_trainer(kind, seed=1)  # another init: everything must come from the checkpoint
    state = fit(resumed, x_train, x_val, resume=cuts[cut], **kw)
    assert [r["lr"] for r in state["history"]] == lrs
    assert [r["val_mse"] for r in state["history"]] == [r["val_mse"] for r in ref["history"]]
    assert (state["epoch"], state["best"]["epoch"]) == (stop, ref["best"]["epoch"])
    np.testing.assert_array_equal(to_numpy(resumed.theta), to_numpy(full.theta))
    if kind == "online":
        np.testing.assert_array_equal(to_numpy(resumed.H), to_numpy(full.H))


def image_ids(xb, n):
    """Which images of the training set a batch holds (image i carries i / n in its first pixel)."""
    return np.rint(xb[:, 0, 0, 0] * n).astype(int).tolist()


def recorded_orders(trainer, x_train, x_val, n, **kw):
    """fit's training-image order per epoch, read from the batches the trainer receives."""
    orders, step = {}, trainer.step

    def recording_step(xb, rng=None):
        orders.setdefault(trainer.t // n_steps, []).extend(image_ids(xb, n))
        return step(xb, rng)

    n_steps = -(-n // kw["batch_size"])
    trainer.step = recording_step
    fit(trainer, x_train, x_val, log=quiet, progress=False, **kw)
    return [orders[e] for e in sorted(orders)]


def test_each_epoch_shuffles_anew_and_reproducibly(rng, tmp_path):
    """Every epoch sees every image once, in an order that differs from epoch to epoch and is the
    same for the same (seed, epoch), also after a resume. Bug caught: one shuffle order reused
    for every epoch (e.g. generators derived from the seed alone)."""
    n = 24
    x_train, x_val = data(rng, n), data(rng, 4)
    x_train[:, 0, 0, 0] = np.arange(n) / n
    kw = dict(epochs=4, batch_size=5, seed=7)
    orders = recorded_orders(MAPTrainer(tiny(), SGD(lr=1e-3)), x_train, x_val, n, **kw)
    assert len(orders) == 4 and all(sorted(o) == list(range(n)) for o in orders)
    assert len({tuple(o) for o in orders}) == 4, "an epoch repeated another's order"
    assert recorded_orders(MAPTrainer(tiny(), SGD(lr=1e-3)), x_train, x_val, n, **kw) == orders
    other_seed = recorded_orders(MAPTrainer(tiny(), SGD(lr=1e-3)), x_train, x_val, n, **{**kw, "seed": 8})
    assert all(a != b for a, b in zip(other_seed, orders))
    # resumed after epoch 2: epochs 3 and 4 see the same orders as in the uninterrupted run
    half = fit(MAPTrainer(tiny(), SGD(lr=1e-3)), x_train, x_val, log=quiet, progress=False, **{**kw, "epochs": 2})
    resumed = MAPTrainer(tiny(), SGD(lr=1e-3))
    assert recorded_orders(resumed, x_train, x_val, n, resume=half, **kw) == orders[2:]


@pytest.mark.parametrize("n, batch_size", [(7, 3), (5, 500)])
def test_validation_mse_is_per_pixel(n, batch_size, rng):
    """reconstruction_mse = mean over images and pixels of (f - x)^2, whatever the batching.
    Bug caught: the sum divided by the number of images (a per-image MSE, 6x larger here)."""
    model = tiny()
    x = data(rng, n)  # host images, as reconstruction_mse takes them; the hand computation on the device
    x_dev = asarray(x)
    hand = float(((model.forward(x_dev) - x_dev) ** 2).mean())
    assert reconstruction_mse(model, x, batch_size=batch_size) == pytest.approx(hand, rel=1e-12)


@pytest.mark.parametrize("kind", ["ae", "online"])
def test_fit_records_the_per_pixel_validation_mse_of_the_mean_network(kind, rng):
    """Each epoch's val_mse is the per-pixel MSE of the network at the trainer's mean parameters."""
    x_train, x_val = data(rng, 16), data(rng, 7)
    trainer = make_trainer(kind)
    recorded, hand = [], []
    x_val_dev = asarray(x_val)  # fit takes host images; the hand computation runs on the device

    def check(epoch, record):
        trainer.model.set_params(trainer.theta)
        hand.append(float(((trainer.model.forward(x_val_dev) - x_val_dev) ** 2).mean()))
        recorded.append(record["val_mse"])

    fit(trainer, x_train, x_val, epochs=3, batch_size=4, seed=0, log=quiet, progress=False, on_epoch_end=check)
    assert len(recorded) == 3
    assert_close(np.array(recorded), np.array(hand), 1e-12, "recorded val_mse vs per-pixel hand computation")


@pytest.mark.parametrize("kind", ["ae", "online"])
def test_a_finished_run_continues_from_its_last_epoch_not_its_best(kind, rng, tmp_path):
    """Catches continuing a finished run (fit(resume=done state)) from the restored best epoch's weights:
    the result of fit holds the best epoch, so the last one must be kept beside it."""
    x_train, x_val = data(rng, 40), data(rng, 10)
    kw = dict(batch_size=8, seed=3, log=quiet, progress=False)

    def trainer():
        t = make_trainer(kind)
        t.optimizer.lr = 0.3  # large enough that the last epoch is not the best one
        return t

    full = fit(trainer(), x_train, x_val, epochs=5, **kw)
    first = fit(trainer(), x_train, x_val, epochs=4, **kw)
    assert first["best"]["epoch"] < 4, "precondition: the 4-epoch run's best epoch is not its last"
    save_checkpoint(tmp_path / "done.npz", first, {})
    done, _ = load_checkpoint(tmp_path / "done.npz")
    state = fit(trainer(), x_train, x_val, epochs=5, resume=done, **kw)
    assert [r["val_mse"] for r in state["history"]] == [r["val_mse"] for r in full["history"]]
    assert (state["last"] is None) == (full["last"] is None)
    for key in ("trainer", "best", "last"):  # the result, the best snapshot, the epoch to continue from
        if full[key] is not None:
            np.testing.assert_array_equal(to_numpy(state[key]["theta"]), to_numpy(full[key]["theta"]))


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


@pytest.mark.parametrize("damage, match", [
    ("truncate", "ckpt.npz is unreadable, truncated or not a minilae checkpoint"),
    ("garbage", "ckpt.npz is unreadable, truncated or not a minilae checkpoint"),
    ("missing", "no checkpoint at .*ckpt.npz"),
])
def test_damaged_checkpoints_give_clear_errors(damage, match, tmp_path):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, sample_state(), {})
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    else:
        path.unlink()
    with pytest.raises(CheckpointError, match=match):
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
    with pytest.raises(CheckpointError, match=r"num_params: checkpoint \d+, this run \d+"):
        check_signature(model_signature(a, "mlp"), model_signature(c, "mlp"))


def test_load_state_dict_refuses_another_parameter_count(rng):
    state = copy.deepcopy(MAPTrainer(tiny()).state_dict())
    other = MAPTrainer(mlp_autoencoder(input_shape=IMAGE, latent_size=2, hidden=(6,)))
    with pytest.raises(CheckpointError, match=rf"checkpoint holds {state['theta'].size} parameters, "
                                              rf"the model has {other.theta.size}"):
        other.load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# the MAP trainer with the prior, as post-hoc Laplace assumes (issue 8, item 4)

@pytest.mark.parametrize("prior_precision, n_data", [(1.0, 6), (40.0, 10), (0.3, 1000)])
def test_map_sgd_step_with_the_prior_is_the_gradient_of_the_full_objective(prior_precision, n_data, rng):
    """Catches a MAP trained without the prior (or with weight decay lambda instead of lambda / N) while
    post-hoc Laplace and its evidence assume the mode of mean_b nll_b + lambda / (2N) ||theta||^2."""
    model = tiny()
    x, lr = asarray(data(rng, 6)), 0.1
    theta0 = model.get_params()

    def objective(th):
        model.set_params(th)
        return (Gaussian(1.0).nll(model.forward(x), x).mean() + prior_precision / (2 * n_data) * th @ th).reshape(1)

    g = numerical_gradient(objective, theta0.copy())
    model.set_params(theta0)
    trainer = MAPTrainer(model, SGD(lr=lr), prior_precision=prior_precision, n_data=n_data)
    atol = 10 * fd_roundoff(float(objective(theta0)[0]))  # 10x the differences' round-off floor
    assert_close(trainer.loss_and_grad(x)[2], g, 1e-6, "gradient of the objective with the prior", atol=atol)
    trainer.step(x)
    assert_close(trainer.theta, theta0 - lr * g, 1e-8, "theta after one SGD step with the prior", atol=lr * atol)
    np.testing.assert_array_equal(to_numpy(model.get_params()), to_numpy(trainer.theta))


def test_map_prior_needs_n_data_and_travels_with_the_state(rng):
    """Catches a resumed post-hoc MAP losing its prior, and a prior without N accepted silently."""
    with pytest.raises(ValueError, match="needs n_data"):
        MAPTrainer(tiny(), prior_precision=2.0)
    with pytest.raises(ValueError, match="prior_precision must be a finite number > 0"):
        MAPTrainer(tiny(), prior_precision=-1.0, n_data=4)
    x = asarray(data(rng, 4))
    a = MAPTrainer(tiny(), SGD(lr=0.1), prior_precision=2.0, n_data=4)
    a.step(x)
    b = MAPTrainer(tiny(seed=5), SGD(lr=0.1))  # no prior: everything must come from the state
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert (b.prior_precision, b.n_data) == (2.0, 4)
    a.step(x)
    b.step(x)
    np.testing.assert_array_equal(to_numpy(a.theta), to_numpy(b.theta))
    old = {k: v for k, v in a.state_dict().items() if k not in ("prior_precision", "n_data")}
    c = MAPTrainer(tiny(), SGD(lr=0.1), prior_precision=2.0, n_data=4)
    c.load_state_dict(old)  # a checkpoint from before the prior keeps the constructor's prior
    assert (c.prior_precision, c.n_data) == (2.0, 4)


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


# the baselines' trainers: the AE with learned variance and the MC-dropout AE (MAPTrainer with other models)

def blobs(rng, n, size=8):
    """Images with a 2-D latent: one Gaussian blob per image at a random position."""
    centres = rng.uniform(0.25 * size, 0.75 * size, (n, 2))
    grid = np.arange(size)
    d2 = (grid[None, :, None] - centres[:, 0, None, None]) ** 2 + (grid[None, None, :] - centres[:, 1, None, None]) ** 2
    return np.exp(-d2 / (2 * (size / 6) ** 2))[:, None]


def variant_trainer(kind, seed=0, lr=0.01):
    """'ae-var': mean-and-log-variance decoder under the heteroscedastic Gaussian; 'mc-dropout': dropout 0.2."""
    if kind == "ae-var":
        model = mlp_autoencoder(IMAGE, 2, (4,), seed=seed, output="mean_logvar")
        return MAPTrainer(model, Adam(lr=lr), likelihood=HeteroscedasticGaussian())
    return MAPTrainer(mlp_autoencoder(IMAGE, 2, (4,), seed=seed, dropout=0.2), Adam(lr=lr))


@pytest.mark.parametrize("kind", ["ae-var", "mc-dropout"])
def test_validation_mse_scores_the_mean_reconstruction_in_evaluation_mode(kind, rng):
    """Catches the validation MSE of a 2C-channel output taken against x (a shape error, or mu and s mixed), and a
    dropout model validated with dropout on (a noisy stopping rule); fit must also leave the model's modes as found."""
    x_train, x_val = data(rng, 16), data(rng, 7)
    trainer = variant_trainer(kind)
    recorded, hand = [], []
    x_val_dev = asarray(x_val)

    def check(epoch, record):
        trainer.model.set_params(trainer.theta)
        f = trainer.model.forward(x_val_dev)  # the model is in evaluation mode between steps
        hand.append(float(((f[:, :IMAGE[0]] - x_val_dev) ** 2).mean()))
        recorded.append(record["val_mse"])

    fit(trainer, x_train, x_val, epochs=3, batch_size=4, seed=0, log=quiet, progress=False, on_epoch_end=check)
    assert_close(np.array(recorded), np.array(hand), 1e-12, "val_mse vs the mean channels in evaluation mode")
    assert not trainer.model.training and not any(layer.training for layer in trainer.model)
    stats = trainer.step(asarray(x_train[:4]))
    assert set(stats) == {"nll", "mse"} and math.isfinite(stats["mse"])


def test_training_mode_restores_each_layers_own_flag():
    """Catches training_mode putting a whole chain back with one flag, which would switch on an eval-mode Dropout."""
    model = mlp_autoencoder(IMAGE, 2, (4,), dropout=0.5)
    model.train()
    model.dropout_layers[0].eval()
    with training.training_mode(model, False):
        assert not any(layer.training for layer in model)
    assert [layer.training for layer in model.dropout_layers] == [False, True, True]
    assert model.training


@pytest.mark.parametrize("kind", ["ae-var", "mc-dropout"])
def test_baseline_trainers_learn_synthetic_blobs(kind, rng):
    """300 Adam steps on 128 blob images (8 x 8): the evaluation-mode reconstruction MSE falls below 40% of the
    untrained model's, the training-mode batch MSE (dropout on) below half its first value, and for ae-var the
    mean nll per image falls by more than 64 nats (one per pixel: the learned variance shrinks where the mean
    fits; a fixed unit variance cannot do that). Catches a likelihood or dropout gradient that does not descend."""
    x = blobs(rng, 128)
    model = (mlp_autoencoder((1, 8, 8), 2, (32, 16), seed=0, output="mean_logvar") if kind == "ae-var"
             else mlp_autoencoder((1, 8, 8), 2, (32, 16), seed=0, dropout=0.2))
    lik = HeteroscedasticGaussian() if kind == "ae-var" else None
    trainer = MAPTrainer(model, Adam(lr=3e-3), likelihood=lik)
    before = reconstruction_mse(model, x, likelihood=trainer.likelihood)
    stats = [trainer.step(asarray(x[rng.choice(len(x), 16, replace=False)])) for _ in range(300)]
    after = reconstruction_mse(model, x, likelihood=trainer.likelihood)
    first, last = stats[0], {k: float(np.mean([s[k] for s in stats[-20:]])) for k in stats[0]}
    assert after < 0.4 * before, f"reconstruction MSE only fell from {before:.4f} to {after:.4f}"
    assert last["mse"] < 0.5 * first["mse"], f"training MSE only fell from {first['mse']:.4f} to {last['mse']:.4f}"
    if kind == "ae-var":
        assert last["nll"] < first["nll"] - 64, f"nll only fell from {first['nll']:.2f} to {last['nll']:.2f}"


def test_map_step_on_a_dropout_model_descends_the_masked_network(rng):
    """One SGD step of a dropout model is -lr times the FD gradient of the mean nll of the network its mask
    selects (mask held by reseeding). Catches the step running in evaluation mode (no mask: the gradient of the
    plain network) or the gradient taken with another mask than the forward's."""
    x = asarray(data(rng, 5))
    model = mlp_autoencoder(IMAGE, 2, (4,), seed=0, dropout=0.3)
    theta0 = model.get_params()

    def mean_nll(th):
        model.set_params(th)
        model.reseed_dropout(xp().random.default_rng(4))
        with training.training_mode(model, True):
            return Gaussian(1.0).nll(model.forward(x), x).mean().reshape(1)

    g = numerical_gradient(mean_nll, theta0.copy())
    atol = 10 * fd_roundoff(float(mean_nll(theta0)[0]))  # 10x the differences' round-off floor
    model.set_params(theta0)
    model.reseed_dropout(xp().random.default_rng(4))
    trainer = MAPTrainer(model, SGD(lr=0.1))
    trainer.step(x)
    assert_close((theta0 - trainer.theta) / 0.1, g, 1e-6, "SGD update / lr = gradient with the mask", atol=atol)
