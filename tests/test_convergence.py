"""Convergence: a tiny ViT (patch 2) built from the fused modules learns scikit-learn's 8x8 digits
(vit_kernels.training.DIGITS_RECIPE) to >= 95% test accuracy, and its loss curve follows the eager
model's (same initial weights, same data order).

The curve tolerance, and why. Every run starts from the same weights and sees the same batches:
the fused model (float32), eager PyTorch (the same model on backend "reference", the oracle's plain
PyTorch code, float32), and two references for what rounding alone does:
- the first 20 steps, step by step, against the oracle (eager in float64): before rounding is
  amplified the runs agree to ~1e-6, so the project's output rule applies as it is (at most 2x eager
  float32's distance to the oracle, plus the float32 floor); a wrong forward or gradient shows here;
- then the mean loss of each tenth of the run (132 steps) against eager float32: training is chaotic
  (a change of one ulp in the weights gives another trajectory after ~100 steps), so later single
  steps differ by minibatch noise whatever the kernels do. The yardstick is eager float32 started
  from weights moved by one ulp (a rounding-sized change, cheaper than a float64 run of 1320 steps):
  the fused curve may be at most 2x as far from eager's as that one is, in every tenth, plus a floor
  of 0.02 (4% of the final loss, ~0.5 with label smoothing 0.1; under 1% of the initial ln 10 = 2.3)
  for a tenth where the yardstick happens to be close by chance.

On a CPU the fused ops' Triton kernels run only in Triton's interpreter (about 0.3 s per image per
forward here), so the CI test trains on backend "auto" (on a CPU its torch path; on a GPU the
measured choice) and a short CI test takes three steps on backend "triton"; the full run on
"triton" (the interpreter on a CPU) is the slow test. Every test prints which backend and path ran
each op forward and backward (vit_kernels.record_decisions).
"""

import pytest
import torch

import vit_kernels as vk
from vit_kernels import training
from vit_kernels.testing import assert_close

pytest.importorskip("sklearn", reason="the digits data set ships with scikit-learn (the [test] extra)")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EXACT_STEPS = 20
WINDOWS = 10
CURVE_FLOOR = 0.02


@pytest.fixture(autouse=True)
def _one_thread():
    """The CI budget is for one core; the steps are too small for intra-op threads to help."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run(backend, dtype, data, nudge=False, **overrides):
    recipe = dict(training.DIGITS_RECIPE, **overrides)
    model = training.tiny_vit(backend, seed=recipe["seed"]).to(DEVICE, dtype)
    if nudge:  # every weight one ulp up: a rounding-sized change
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
    return model, training.train(model, data, **recipe)


def _report(name, result):
    print(f"{name}: forward+backward per op: {training.paths(result.decisions)}")
    if result.eval_decisions:
        print(f"{name}: evaluation (no grad) per op: {training.paths(result.eval_decisions)}")


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


def _check_curve(fused, eager, nudged, oracle_start):
    n = EXACT_STEPS
    print(
        assert_close(
            _t(fused[:n]).float(), _t(oracle_start), _t(eager[:n]).float(), name=f"loss of the first {n} steps"
        )
    )
    w = len(fused) // WINDOWS
    f, e, y = (_t(training.smoothed(c, w)) for c in (fused, eager, nudged))
    gap, yard = (f - e).abs(), (y - e).abs()
    bound = 2 * yard.max().item() + CURVE_FLOOR
    print(
        f"mean loss per {w} steps: fused {[round(v, 4) for v in f.tolist()]}\n"
        f"  eager {[round(v, 4) for v in e.tolist()]}\n  eager one ulp off {[round(v, 4) for v in y.tolist()]}\n"
        f"  largest gap fused-eager {gap.max().item():.4f}, yardstick {yard.max().item():.4f}, bound {bound:.4f}"
    )
    assert gap.max().item() <= bound, (
        f"the fused loss curve left eager's: {gap.max().item():.4f} > {bound:.4f} in tenth {int(gap.argmax())}"
    )


def _converges(backend):
    data = training.digits(seed=0)
    _, fused = _run(backend, torch.float32, data)
    _report(f"fused (backend={backend!r})", fused)
    _, eager = _run("reference", torch.float32, data)
    _, nudged = _run("reference", torch.float32, data, nudge=True, evaluate=False)
    _, oracle = _run("reference", torch.float64, data, max_steps=EXACT_STEPS, evaluate=False)
    print(f"test accuracy: fused {fused.accuracy:.4f}, eager {eager.accuracy:.4f}")
    assert fused.accuracy >= 0.95, f"the fused model reached {fused.accuracy:.4f} test accuracy, expected >= 0.95"
    _check_curve(fused.losses, eager.losses, nudged.losses, oracle.losses)
    return fused


def test_digits_converges():
    """CI: the whole recipe on backend "auto" (CPU: the fused modules' torch path)."""
    fused = _converges("auto")
    ops = {d.op for d in fused.decisions}
    assert ops == {"patch_embed", "qkv_attention", "linear", "layernorm_gelu_mlp"}, ops


@pytest.mark.slow
def test_digits_converges_triton():
    """The whole recipe on backend "triton" on a CPU (the interpreter), "auto" on a GPU."""
    backend = "auto" if DEVICE.type == "cuda" else "triton"
    fused = _converges(backend)
    if DEVICE.type == "cpu":  # evaluation has no gradients: the interpreter ran every forward
        assert {d.backend for d in fused.eval_decisions} == {"triton"}, training.paths(fused.eval_decisions)


def _sgd_steps(backend, dtype, batches):
    """Plain SGD (no momentum: a gradient error moves the parameters by as much, where AdamW would
    normalise a uniform scale error away); returns (model, step losses, decisions)."""
    model = training.tiny_vit(backend, seed=0).to(DEVICE, dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.03)
    model.train()
    with vk.record_decisions() as calls:
        losses = [training.train_step(model, opt, x.to(DEVICE, dtype), y.to(DEVICE)).item() for x, y in batches]
    return model, losses, calls


def test_triton_training_steps():
    """CI: three SGD steps on backend "triton" (the interpreter on a CPU) against eager float32 and
    the float64 oracle: the step losses (2x rule) and the parameters after them (they carry every
    gradient: 3x rule); names what ran forward and backward, and checks the evaluation forward ran
    the Triton kernels."""
    data = training.digits(seed=0)
    batches = [(data.train_x[i : i + 8], data.train_y[i : i + 8]) for i in (0, 8, 16)]
    fused_model, fused, calls = _sgd_steps("triton", torch.float32, batches)
    eager_model, eager, _ = _sgd_steps("reference", torch.float32, batches)
    oracle_model, oracle, _ = _sgd_steps("reference", torch.float64, batches)
    print(f"backend='triton': forward+backward per op: {training.paths(calls)}")
    assert_close(_t(fused).float(), _t(oracle), _t(eager).float(), name="step losses")
    eager_p, oracle_p = dict(eager_model.named_parameters()), dict(oracle_model.named_parameters())
    for name, p in fused_model.named_parameters():
        assert_close(p, oracle_p[name], eager_p[name], factor=3.0, name=name)
    for d in calls:  # triton ran, or the decision says why not
        assert d.backend == "triton" or "triton" in d.reasons, d
    acc, evals = training.accuracy(fused_model, data.test_x[:8].to(DEVICE), data.test_y[:8].to(DEVICE))
    print(f"backend='triton': evaluation (no grad) per op: {training.paths(evals)}")
    assert {d.backend for d in evals} == {"triton"}, training.paths(evals)
