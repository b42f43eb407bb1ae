"""Tests for minilae.optim: update rules vs independent references, resume, schedule and stopping."""
import math

import numpy as np
import pytest

from minilae.backend import asarray, to_numpy, xp
from minilae.optim import SGD, Adam, EarlyStopping, ReduceLROnPlateau

N_PARAMS = 7


def gradient_sequence(n_steps, seed=0):
    """Host gradients; `run` moves each to the backend."""
    return list(np.random.default_rng(seed).standard_normal((n_steps, N_PARAMS)))


def reference_sgd(theta, grads, lr, momentum):
    """Textbook heavy-ball SGD, written out of place: b_t = mu b_{t-1} + g_t (b_1 = g_1), theta -= lr b_t."""
    trajectory, buf = [], None
    for g in grads:
        buf = g if buf is None else momentum * buf + g
        theta = theta - lr * buf
        trajectory.append(theta)
    return trajectory


def reference_adam(theta, grads, lr, beta1, beta2, eps):
    """Algorithm 1 of Kingma & Ba (2015), out of place with explicit bias corrections."""
    trajectory = []
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        theta = theta - lr * m_hat / (np.sqrt(v_hat) + eps)
        trajectory.append(theta)
    return trajectory


def run(optimizer, theta, grads):
    """Step the backend vector theta through the host gradients; the trajectory comes back on the host."""
    trajectory = []
    for g in grads:
        out = optimizer.step(theta, asarray(g))
        assert out is theta  # updated in place and returned
        trajectory.append(to_numpy(theta).copy())  # to_numpy may alias on numpy
    return trajectory


def host(state):
    """A state dict with its arrays on the host, as a checkpoint writes it."""
    return {k: to_numpy(v) if getattr(v, "ndim", 0) else v for k, v in state.items()}


OPTIMISERS = [
    ("sgd", dict(lr=0.1, momentum=0.0)),
    ("sgd", dict(lr=0.05, momentum=0.9)),
    ("adam", dict(lr=1e-3)),
    ("adam", dict(lr=0.03, betas=(0.8, 0.99), eps=1e-6)),
]
OPT_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in OPTIMISERS]


def make(name, kw):
    return SGD(**kw) if name == "sgd" else Adam(**kw)


@pytest.mark.parametrize("name,kw", OPTIMISERS, ids=OPT_IDS)
def test_matches_reference_implementation(name, kw):
    theta0 = np.random.default_rng(1).standard_normal(N_PARAMS)
    grads = gradient_sequence(25)
    ours = run(make(name, kw), asarray(theta0.copy()), grads)  # asarray may alias on numpy
    if name == "sgd":
        ref = reference_sgd(theta0, grads, kw["lr"], kw["momentum"])
    else:
        beta1, beta2 = kw.get("betas", (0.9, 0.999))
        ref = reference_adam(theta0, grads, kw["lr"], beta1, beta2, kw.get("eps", 1e-8))
    np.testing.assert_allclose(np.array(ours), np.array(ref), rtol=1e-13, atol=1e-15)


def test_adam_defaults_are_the_papers():
    opt = Adam()
    assert (opt.lr, opt.betas, opt.eps) == (1e-3, (0.9, 0.999), 1e-8)


@pytest.mark.parametrize("name,kw", [("sgd", dict(lr=0.1)), ("sgd", dict(lr=0.05, momentum=0.9)),
                                     ("adam", dict(lr=0.05))], ids=["sgd", "sgd-momentum", "adam"])
def test_converges_on_quadratic(name, kw):
    """Minimise 0.5 (theta - theta*)^T A (theta - theta*) with A SPD, eigenvalues in [1, 10]."""
    rng = np.random.default_rng(2)
    Q, _ = np.linalg.qr(rng.standard_normal((N_PARAMS, N_PARAMS)))
    A = Q @ np.diag(np.linspace(1, 10, N_PARAMS)) @ Q.T
    theta_star = rng.standard_normal(N_PARAMS)
    theta, opt = xp().zeros(N_PARAMS), make(name, kw)
    A_dev, star_dev = asarray(A), asarray(theta_star)
    for _ in range(600):
        opt.step(theta, A_dev @ (theta - star_dev))
    np.testing.assert_allclose(to_numpy(theta), theta_star, atol=1e-8)


@pytest.mark.parametrize("name,kw", OPTIMISERS, ids=OPT_IDS)
@pytest.mark.parametrize("through_npz", [False, True], ids=["dict", "npz"])
@pytest.mark.parametrize("split", [0, 6])
def test_state_dict_resume_reproduces_trajectory(name, kw, through_npz, split, tmp_path):
    theta = asarray(np.random.default_rng(3).standard_normal(N_PARAMS))
    grads = gradient_sequence(12, seed=4)
    opt = make(name, kw)
    run(opt, theta, grads[:split])
    saved_theta, state = theta.copy(), opt.state_dict()
    uninterrupted = run(opt, theta, grads[split:])
    if through_npz:
        np.savez(tmp_path / "ckpt.npz", **host(state))
        state = dict(np.load(tmp_path / "ckpt.npz", allow_pickle=True))
    # a fresh optimiser with different hyper-parameters must take all of them from the state dict
    resumed_opt = SGD(lr=9.0, momentum=0.5) if name == "sgd" else Adam(lr=9.0, betas=(0.5, 0.5), eps=1.0)
    resumed_opt.load_state_dict(state)
    resumed = run(resumed_opt, saved_theta, grads[split:])
    np.testing.assert_array_equal(np.array(resumed), np.array(uninterrupted))


def test_state_dict_is_a_copy():
    opt, theta = Adam(lr=0.1), xp().zeros(N_PARAMS)
    opt.step(theta, xp().ones(N_PARAMS))
    state = opt.state_dict()
    m_before = to_numpy(state["m"])
    opt.step(theta, xp().ones(N_PARAMS))
    np.testing.assert_array_equal(to_numpy(state["m"]), m_before)
    assert state["t"] == 1


def test_load_state_dict_of_other_type_raises():
    with pytest.raises(ValueError, match="'Adam'.*SGD"):
        SGD(lr=0.1).load_state_dict(Adam().state_dict())


@pytest.mark.parametrize("name,kw", OPTIMISERS, ids=OPT_IDS)
def test_lr_is_settable_and_used(name, kw):
    grads = gradient_sequence(3, seed=5)
    a, b = make(name, kw), make(name, kw)
    theta_a, theta_b = xp().zeros(N_PARAMS), xp().zeros(N_PARAMS)
    a.lr = b.lr = 0.5
    run(a, theta_a, grads)
    b2 = make(name, {**kw, "lr": 0.5})
    run(b2, theta_b, grads)
    np.testing.assert_array_equal(to_numpy(theta_a), to_numpy(theta_b))
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=f"lr must be a finite number > 0, got {bad}"):
            a.lr = bad


@pytest.mark.parametrize("name,kw", OPTIMISERS, ids=OPT_IDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_grad_raises_and_leaves_state_untouched(name, kw, bad):
    opt, theta = make(name, kw), np.zeros(N_PARAMS)
    opt.step(theta, np.ones(N_PARAMS))
    theta_before, state_before = theta.copy(), opt.state_dict()
    grad = np.ones(N_PARAMS)
    grad[3] = bad
    with pytest.raises(FloatingPointError, match="grad has 1 non-finite entry"):
        opt.step(theta, grad)
    np.testing.assert_array_equal(theta, theta_before)
    state_after = opt.state_dict()
    for key, value in state_before.items():
        np.testing.assert_array_equal(state_after[key], value)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="grad must have theta's shape"):
        SGD(lr=0.1).step(np.zeros(3), np.zeros(4))
    with pytest.raises(TypeError, match="1-D floating"):
        Adam().step(np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(TypeError, match="1-D floating"):
        Adam().step(np.zeros(3, dtype=int), np.zeros(3))
    with pytest.raises(ValueError, match="momentum"):
        SGD(lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="beta2"):
        Adam(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="eps"):
        Adam(eps=0.0)
    opt = Adam()
    opt.step(np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="state has shape"):
        opt.step(np.zeros(4), np.ones(4))


# ---------------------------------------------------------------------------------------------
# learning-rate schedule and early stopping

@pytest.mark.parametrize("patience", [1, 3, 5])
def test_plateau_halves_lr_after_exactly_patience_bad_epochs(patience):
    opt = SGD(lr=0.8)
    scheduler = ReduceLROnPlateau(opt, factor=0.5, patience=patience)
    assert not scheduler.step(1.0)  # first epoch sets the best
    for _ in range(patience - 1):
        assert not scheduler.step(1.0)  # equal is not an improvement
        assert opt.lr == 0.8
    assert scheduler.step(1.5)
    assert opt.lr == 0.4
    # an improvement resets the count; a later plateau halves again after `patience` more
    assert not scheduler.step(0.9)
    for _ in range(patience - 1):
        assert not scheduler.step(2.0)
    assert opt.lr == 0.4
    assert scheduler.step(2.0)
    assert opt.lr == 0.2


def test_plateau_defaults_and_min_lr():
    opt = SGD(lr=1.0)
    scheduler = ReduceLROnPlateau(opt)
    assert (scheduler.factor, scheduler.patience) == (0.5, 5)
    scheduler = ReduceLROnPlateau(opt, factor=0.1, patience=1, min_lr=0.05)
    losses = [1.0, 1.0, 1.0, 1.0]
    reduced = [scheduler.step(v) for v in losses]
    assert reduced == [False, True, True, False]
    assert opt.lr == 0.05


def test_plateau_state_dict_resume():
    def schedule(scheduler, losses):
        return [(scheduler.step(v), scheduler.optimizer.lr) for v in losses]

    losses = [3.0, 2.0, 2.5, 2.5, 2.1, 1.0, 1.2, 1.3, 1.1, 1.0, 1.05]
    opt = Adam(lr=0.1)
    scheduler = ReduceLROnPlateau(opt, patience=3)
    schedule(scheduler, losses[:4])
    opt_state, sched_state = opt.state_dict(), scheduler.state_dict()
    uninterrupted = schedule(scheduler, losses[4:])
    opt2 = Adam(lr=1.0)
    opt2.load_state_dict(opt_state)
    scheduler2 = ReduceLROnPlateau(opt2, patience=7)
    scheduler2.load_state_dict(sched_state)
    assert schedule(scheduler2, losses[4:]) == uninterrupted
    assert any(r for r, _ in uninterrupted)  # the resumed segment does contain a reduction


@pytest.mark.parametrize("patience", [8, 2])
def test_early_stopping_after_patience_bad_epochs(patience):
    stopper = EarlyStopping(patience=patience)
    for epoch, loss in enumerate([5.0, 4.0, 3.0]):
        assert not stopper.step(loss)
        assert stopper.improved and stopper.best_epoch == epoch
    assert not stopper.step(3.5)
    assert not stopper.step(2.5)  # an improvement resets the count
    assert stopper.best == 2.5 and stopper.best_epoch == 4
    for _ in range(patience - 1):
        assert not stopper.step(2.5)
        assert not stopper.improved
    assert stopper.step(2.6)
    assert stopper.should_stop
    assert stopper.best_epoch == 4


def test_early_stopping_default_patience_and_min_delta():
    assert EarlyStopping().patience == 8
    stopper = EarlyStopping(patience=2, min_delta=0.1)
    assert not stopper.step(1.0)
    assert not stopper.step(0.95)  # better, but by less than min_delta
    assert stopper.best == 1.0
    assert stopper.step(0.92)


def test_early_stopping_state_dict_resume():
    losses = [1.0, 0.9, 0.95, 0.96, 0.97, 0.85, 0.9, 0.9, 0.9]
    stopper = EarlyStopping(patience=3)
    for v in losses[:3]:
        stopper.step(v)
    state = stopper.state_dict()
    uninterrupted = [(stopper.step(v), stopper.improved, stopper.best_epoch) for v in losses[3:]]
    resumed = EarlyStopping(patience=10)
    resumed.load_state_dict(state)
    assert [(resumed.step(v), resumed.improved, resumed.best_epoch) for v in losses[3:]] == uninterrupted
    assert uninterrupted[-1][0]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_validation_loss_raises(bad):
    with pytest.raises(FloatingPointError, match="validation loss"):
        EarlyStopping().step(bad)
    with pytest.raises(FloatingPointError, match="validation loss"):
        ReduceLROnPlateau(SGD(lr=0.1)).step(bad)


def test_schedule_bad_arguments_raise():
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)
    with pytest.raises(ValueError, match="factor"):
        ReduceLROnPlateau(SGD(lr=0.1), factor=1.0)
    with pytest.raises(TypeError, match="Optimizer"):
        ReduceLROnPlateau(object())
