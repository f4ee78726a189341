"""Training with the fused modules: one plain loop, shared by the convergence test, the DDP test and
``bench --mode train``.

- :func:`train_step`: forward, cross-entropy, backward, optimizer step (what bench times);
- :func:`digits`: scikit-learn's 8x8 handwritten digits (shipped with scikit-learn, nothing is
  downloaded) as images (N, 1, 8, 8) and labels, split into train and test sets;
- :func:`tiny_vit`: a small reference ViT for them (patch 2: 16 patches + class token);
- :func:`train`: SGD over the training set in a fixed order (a seeded permutation per epoch), the
  loss of every step, test accuracy at the end, and every backend decision the ops made
  (:func:`vit_kernels.record_decisions`), summarised per op by :func:`paths`;
- :func:`ddp_train`: the same steps in one process of a ``torch.distributed`` group, the model under
  DistributedDataParallel, each rank on its slice of the global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends import Decision, record_decisions


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    *,
    amp_dtype: Optional[torch.dtype] = None,
    logits: Callable = lambda out: out,
    context: Callable = contextlib.nullcontext,
    label_smoothing: float = 0.0,
) -> Tensor:
    """One training step: forward, cross-entropy (in float32), backward, ``opt.step()``, gradients
    set to None. images: (batch, chans, H, W); labels: (batch,) class indices. amp_dtype: run the
    forward under ``torch.autocast`` at that dtype; logits(out): the logits of the model's output
    (transformers' output objects); context(): the context the forward runs in. Returns the loss
    (detached)."""
    amp = torch.autocast(images.device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with context(), amp:
        loss = F.cross_entropy(logits(model(images)).float(), labels, label_smoothing=label_smoothing)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


@dataclasses.dataclass
class Digits:
    """train_x: (n_train, 1, 8, 8), train_y: (n_train,), test_x, test_y likewise; pixels scaled to
    zero mean and unit variance over the training set."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


def digits(test_fraction: float = 0.2, seed: int = 0, dtype: torch.dtype = torch.float32) -> Digits:
    """scikit-learn's 8x8 digits (1797 images, 10 classes; ``sklearn.datasets.load_digits``, shipped
    with the package), split by a seeded permutation: the last ``test_fraction`` is the test set."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction: expected a fraction in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("digits: needs scikit-learn (pip install scikit-learn, or the [test] extra)") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float64).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    tr, te = perm[:-n_test], perm[-n_test:]
    mean, std = x[tr].mean(), x[tr].std()
    x = ((x - mean) / std).to(dtype)
    return Digits(x[tr], y[tr], x[te], y[te])


def tiny_vit(
    backend: str = "auto",
    *,
    embed_dim: int = 64,
    depth: int = 2,
    num_heads: int = 4,
    mlp_ratio: float = 2.0,
    pool: str = "cls",
    seed: int = 0,
):
    """A small reference ViT for 8x8 one-channel images: patch 2 (16 patches + class token),
    head_dim = embed_dim / num_heads (16 by default, the smallest the fused kernels take)."""
    from .models.vit import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VisionTransformer(
            img_size=8,
            patch_size=2,
            in_chans=1,
            num_classes=10,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            pool=pool,
            backend=backend,
        )


# The recipe the convergence test trains with: tiny_vit() (embed 64, depth 2, 4 heads of 16, class
# token), AdamW lr 3e-3 (20 warm-up steps, then a cosine decay), weight decay 0.05, label smoothing
# 0.1, batch 32, 30 epochs (1320 steps). Eager PyTorch (backend "reference", float32) reached 96.9%
# test accuracy with it from seed 0 and 97.2% from seed 1; without label smoothing and weight decay
# the model memorises the 1438 training images (train loss ~0.01) and lands at 93-96%.
DIGITS_RECIPE = dict(epochs=30, batch_size=32, lr=3e-3, weight_decay=0.05, warmup=20, label_smoothing=0.1, seed=0)


@dataclasses.dataclass
class TrainResult:
    """losses: the training loss of every step, in order; accuracy: on the test set after training
    (None when not evaluated); decisions: every backend decision of the training steps (forward),
    and eval_decisions those of the evaluation."""

    losses: List[float]
    accuracy: Optional[float]
    decisions: List[Decision]
    eval_decisions: List[Decision]


def batches(n: int, batch_size: int, epochs: int, seed: int) -> List[Tensor]:
    """Index batches over ``n`` samples: a seeded permutation per epoch, cut into ``batch_size``
    pieces (the last, shorter one is dropped). The same seed gives the same order everywhere."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        out += [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    return out


def train(
    model: nn.Module,
    data: Digits,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup: int = 20,
    augment: bool = False,
    label_smoothing: float = 0.0,
    seed: int = 0,
    max_steps: Optional[int] = None,
    evaluate: bool = True,
) -> TrainResult:
    """Train ``model`` with AdamW on ``data`` (batches from :func:`batches`, the same for any model
    given the same seed; learning rate ``lr`` after ``warmup`` linear steps, then a cosine decay to 0
    at the last step; augment: each training image moved by up to one pixel (:func:`shift`), the
    offsets drawn from ``seed`` too; max_steps: stop after that many steps, the schedule unchanged);
    the model's parameters set the dtype and device. Returns the loss of every
    step, the test accuracy (eval mode, no grad) and the decisions the fused ops made."""
    p = next(model.parameters())
    dev, dtype = p.device, p.dtype
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    order = batches(len(data.train_y), batch_size, epochs, seed)
    steps = len(order)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cosine(step, steps, warmup))
    if max_steps is not None:  # stop early; the schedule stays that of the whole run
        order = order[:max_steps]
    x, y = data.train_x.to(dev, dtype), data.train_y.to(dev)
    g = torch.Generator().manual_seed(seed + 1)
    losses = []
    model.train()
    with record_decisions() as calls:
        for idx in order:
            images = shift(x[idx], g) if augment else x[idx]
            losses.append(train_step(model, opt, images, y[idx], label_smoothing=label_smoothing).item())
            sched.step()
    acc, eval_calls = None, []
    if evaluate:
        acc, eval_calls = accuracy(model, data.test_x.to(dev, dtype), data.test_y.to(dev))
    return TrainResult(losses, acc, calls, eval_calls)


def shift(images: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Each image moved by its own random whole-pixel offset in [-max_shift, max_shift] along H and W,
    the uncovered border filled with the image's background (its minimum): the augmentation that
    keeps a small ViT from memorising the 1438 training digits. images: (batch, chans, H, W)."""
    B, C, H, W = images.shape
    m = max_shift
    bg = images.amin(dim=(1, 2, 3), keepdim=True)
    padded = bg.expand(B, C, H + 2 * m, W + 2 * m).clone()
    padded[:, :, m : m + H, m : m + W] = images
    dy, dx = torch.randint(0, 2 * m + 1, (2, B), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + H, dx[i] : dx[i] + W] for i in range(B)])


def cosine(step: int, steps: int, warmup: int) -> float:
    """The learning-rate factor at ``step`` of ``steps``: linear warm-up, then half a cosine to 0."""
    import math

    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> tuple:
    """(fraction of ``x`` classified as ``y``, the decisions of the forward calls); eval mode, no grad."""
    model.eval()
    right = 0
    with torch.no_grad(), record_decisions() as calls:
        for i in range(0, len(y), batch_size):
            right += (model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum().item()
    return right / len(y), calls


def paths(decisions: Sequence[Decision]) -> Dict[str, str]:
    """op -> which backend and path ran it in ``decisions`` (all distinct ones, '; '-joined), and why
    the others were not taken: e.g. ``{"qkv_attention": "torch (triton not taken:
    gradients are required ...)"}``. The backward of an op runs where its forward ran: the torch
    path's backward is PyTorch autograd's."""
    out: Dict[str, List[str]] = {}
    for d in decisions:
        s = d.backend + (f" path={d.path}" if d.path else "")
        if d.requested != d.backend and d.reasons:
            s += " (" + "; ".join(f"{b} not taken: {r}" for b, r in d.reasons.items()) + ")"
        lst = out.setdefault(d.op, [])
        if s not in lst:
            lst.append(s)
    return {op: "; ".join(v) for op, v in out.items()}


def smoothed(losses: Sequence[float], window: int) -> List[float]:
    """Means of consecutive, non-overlapping windows of ``window`` steps (a short last one dropped)."""
    return [sum(losses[i : i + window]) / window for i in range(0, len(losses) - window + 1, window)]


def sgd_steps(model: nn.Module, global_batches: Sequence[tuple], lr: float, rank: int = 0, world_size: int = 1) -> None:
    """:func:`train_step` with SGD (momentum 0.9) over ``global_batches`` ((images, labels) pairs),
    taking rank ``rank``'s contiguous slice of each (all of it when ``world_size`` is 1); every
    batch must divide by ``world_size``."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for images, labels in global_batches:
        if len(labels) % world_size:
            raise ValueError(
                f"global_batches: expected batches divisible by world_size={world_size}, got a batch of {len(labels)}"
            )
        per = len(labels) // world_size
        sl = slice(rank * per, (rank + 1) * per)
        train_step(model, opt, images[sl], labels[sl])


def ddp_train(
    rank: int,
    world_size: int,
    init_method: str,
    model_fn: Callable[[], nn.Module],
    global_batches: Sequence[tuple],
    lr: float,
    seed: int,
    out_path: str,
) -> None:
    """One process of a ``world_size``-process gloo group (``torch.multiprocessing.spawn`` calls it
    with ``rank`` first; ``init_method`` as for ``torch.distributed.init_process_group``, e.g.
    ``file:///tmp/x``): builds ``model_fn()`` on the CPU after ``torch.manual_seed(seed)``, wraps it
    in DistributedDataParallel (which averages the gradients over the ranks) and runs
    :func:`sgd_steps` on this rank's slice of every global batch. Rank 0 saves the final
    state_dict to ``out_path``."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        torch.manual_seed(seed)
        model = DistributedDataParallel(model_fn())
        sgd_steps(model, global_batches, lr, rank, world_size)
        if rank == 0:
            torch.save(model.module.state_dict(), out_path)
    finally:
        dist.destroy_process_group()
