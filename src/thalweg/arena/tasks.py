"""The built-in tasks: what is trained, on which data, judged by which validation metric and target.

Every task ships its data offline: scikit-learn's bundled data sets, CPython's ``pydoc_data`` text, or
data generated from a fixed seed. The train/validation split never depends on the run's seed (seed 0
fixes it), so seeds change only initialisation and batch order, and every run is judged on the same
validation set.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .errors import ArenaError
from .tasks_2d import SURFACES

Params = nn.Module | list[torch.Tensor]


@dataclass
class Problem:
    """One freshly initialised instance of a task, ready for an optimizer.

    ``loss(step)`` returns the training loss of batch ``step`` (with its graph); ``evaluate()`` the
    validation metric; ``position()`` the current point for 2-D tasks (else None).
    """

    params: Params
    loss: Callable[[int], torch.Tensor]
    evaluate: Callable[[], float]
    position: Callable[[], tuple[float, float]] | None = None


@dataclass(frozen=True)
class Task:
    """A benchmark task and its protocol settings.

    ``setup(seed, sparse, device)`` builds a :class:`Problem` on ``device``; ``sparse`` asks for sparse embedding gradients
    (only tasks with ``has_sparse_variant`` use it). ``steps``/``quick_steps`` are the step budgets;
    the validation metric is computed every ``eval_every`` steps and compared with ``target``.
    """

    name: str
    description: str
    metric: str
    higher_is_better: bool
    target: float | None
    steps: int
    quick_steps: int
    eval_every: int
    setup: Callable[[int, bool, torch.device], Problem]
    kind: str = "model"  # "model" or "2d"
    has_sparse_variant: bool = False
    # A training loss above diverge_factor x the first loss (or non-finite) ends the run as diverged.
    diverge_factor: float = 20.0
    log_metric: bool = False  # draw the metric on a log axis (2-D function values)

    def budget(self, quick: bool, scale: float = 1.0) -> int:
        """Step budget for a run: quick or full, scaled by ``scale`` (the CLI's ``--budget``)."""
        return max(1, round((self.quick_steps if quick else self.steps) * scale))


# ---------------------------------------------------------------- 2-D functions


def _surface_task(name: str, target: float, steps: int, quick_steps: int) -> Task:
    surface = SURFACES[name]

    def setup(seed: int, sparse: bool, device: torch.device) -> Problem:
        # The start is fixed: a 2-D benchmark compares paths from the same point; seeds do not matter.
        point = torch.tensor(surface.start, dtype=torch.float64, device=device, requires_grad=True)

        def value() -> torch.Tensor:
            return surface.fn(point[0], point[1])

        def evaluate() -> float:
            with torch.no_grad():
                return float(value())

        def position() -> tuple[float, float]:
            return float(point[0].detach()), float(point[1].detach())

        return Problem([point], lambda step: value(), evaluate, position)

    doc = (surface.fn.__doc__ or "").strip()
    return Task(name, f"{doc} Start {surface.start}; float64.", "function value", False, target, steps,
                quick_steps, eval_every=5, setup=setup, kind="2d", diverge_factor=1e3, log_metric=True)


# ---------------------------------------------------------------- data


@functools.lru_cache(maxsize=None)
def _split(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_val, y_val) for a scikit-learn data set; 80/20 split, stratified, seed 0."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    if name == "breast_cancer":
        x, y = datasets.load_breast_cancer(return_X_y=True)
    else:
        x, y = datasets.load_digits(return_X_y=True)
        x = x / 16.0
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    if name == "breast_cancer":
        # Standardise with the training statistics only, so nothing leaks from validation.
        mean, std = x_tr.mean(0), x_tr.std(0)
        x_tr, x_va = (x_tr - mean) / std, (x_va - mean) / std
    t = lambda a, dt=torch.float32: torch.as_tensor(np.asarray(a), dtype=dt)  # noqa: E731
    return t(x_tr), t(y_tr, torch.long), t(x_va), t(y_va, torch.long)


def batch_indices(n: int, batch_size: int, seed: int) -> Callable[[int], torch.Tensor]:
    """Indices of batch ``step``: shuffled epochs without replacement, order fixed by ``seed``."""
    if batch_size >= n:
        full = torch.arange(n)
        return lambda step: full
    gen = torch.Generator().manual_seed(10_000 + seed)
    per_epoch = n // batch_size
    perms: list[torch.Tensor] = []

    def indices(step: int) -> torch.Tensor:
        epoch, k = divmod(step, per_epoch)
        while len(perms) <= epoch:
            perms.append(torch.randperm(n, generator=gen))
        return perms[epoch][k * batch_size:(k + 1) * batch_size]

    return indices


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _classifier(model_fn: Callable[[], nn.Module], data: str, batch_size: int,
                reshape: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable[[int, bool, torch.device], Problem]:
    def setup(seed: int, sparse: bool, device: torch.device) -> Problem:
        x_tr, y_tr, x_va, y_va = (t.to(device) for t in _split(data))
        if reshape is not None:
            x_tr, x_va = reshape(x_tr), reshape(x_va)
        torch.manual_seed(seed)
        model = model_fn().to(device)
        batch = batch_indices(len(x_tr), batch_size, seed)

        def loss(step: int) -> torch.Tensor:
            idx = batch(step)
            return F.cross_entropy(model(x_tr[idx]), y_tr[idx])

        return Problem(model, loss, lambda: _accuracy(model, x_va, y_va))

    return setup


def _logreg_setup(seed: int, sparse: bool, device: torch.device) -> Problem:
    x_tr, y_tr, x_va, y_va = (t.to(device) for t in _split("breast_cancer"))
    torch.manual_seed(seed)
    model = nn.Linear(x_tr.shape[1], 1).to(device)
    batch = batch_indices(len(x_tr), 64, seed)
    bce = F.binary_cross_entropy_with_logits

    def loss(step: int) -> torch.Tensor:
        idx = batch(step)
        return bce(model(x_tr[idx]).squeeze(1), y_tr[idx].float())

    def evaluate() -> float:
        with torch.no_grad():
            return float(bce(model(x_va).squeeze(1), y_va.float()))

    return Problem(model, loss, evaluate)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 10),
    )


# ---------------------------------------------------------------- sparse bag of tokens

_VOCAB, _CLASSES, _DOC_LEN = 5000, 4, 24


@functools.lru_cache(maxsize=None)
def _bag_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generated documents: Zipf-distributed filler tokens plus a few *rare* tokens that give the class.

    Each class owns 200 rare indicative tokens, and a document carries 2 of them among 22 common
    filler tokens. Rare features get few, large gradients: the situation Adagrad's per-coordinate
    accumulators were designed for (Duchi et al. 2011).
    """
    rng = np.random.default_rng(0)
    n = 3000
    ranks = np.arange(1, _VOCAB - _CLASSES * 200 + 1)
    zipf = 1.0 / ranks
    zipf /= zipf.sum()
    labels = rng.integers(0, _CLASSES, n)
    filler = rng.choice(len(ranks), size=(n, _DOC_LEN - 2), p=zipf)
    first_rare = len(ranks)
    signal = first_rare + labels[:, None] * 200 + rng.integers(0, 200, (n, 2))
    docs = np.concatenate([filler, signal], axis=1)
    x, y = torch.as_tensor(docs, dtype=torch.long), torch.as_tensor(labels, dtype=torch.long)
    cut = int(0.8 * n)
    return x[:cut], y[:cut], x[cut:], y[cut:]


class BagClassifier(nn.Module):
    """Mean of token embeddings (EmbeddingBag) followed by a linear layer."""

    def __init__(self, sparse: bool) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(_VOCAB, 16, mode="mean", sparse=sparse)
        self.head = nn.Linear(16, _CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(tokens))


def _bag_setup(seed: int, sparse: bool, device: torch.device) -> Problem:
    x_tr, y_tr, x_va, y_va = (t.to(device) for t in _bag_data())
    torch.manual_seed(seed)
    model = BagClassifier(sparse).to(device)
    batch = batch_indices(len(x_tr), 32, seed)

    def loss(step: int) -> torch.Tensor:
        idx = batch(step)
        return F.cross_entropy(model(x_tr[idx]), y_tr[idx])

    return Problem(model, loss, lambda: _accuracy(model, x_va, y_va))


# ---------------------------------------------------------------- character-level LM

_CONTEXT = 8


@functools.lru_cache(maxsize=None)
def _char_data() -> tuple[torch.Tensor, torch.Tensor, int]:
    """pydoc's help topics as characters; the 63 most frequent are kept, the rest map to one id."""
    from collections import Counter

    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics))[:200_000]
    keep = [c for c, _ in Counter(text).most_common(63)]
    ids = {c: i for i, c in enumerate(keep)}
    codes = torch.tensor([ids.get(c, len(keep)) for c in text], dtype=torch.long)
    cut = int(0.9 * len(codes))
    return codes[:cut], codes[cut:], len(keep) + 1


class CharMLP(nn.Module):
    """Bengio et al. (2003)-style LM: embed the last 8 characters, one hidden layer, predict the next."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 24)
        self.hidden = nn.Linear(_CONTEXT * 24, 192)
        self.out = nn.Linear(192, vocab)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(self.embed(context).flatten(1))))


def _windows(codes: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    starts = starts.to(codes.device)
    offsets = torch.arange(_CONTEXT, device=codes.device)
    return codes[starts[:, None] + offsets], codes[starts + _CONTEXT]


def _char_start(model_class: Callable[[int], nn.Module], seed: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, nn.Module, torch.Generator]:
    """What both character LMs start from: the text on ``device``, a model seeded by ``seed``, and the generator of
    the training windows (fixed by the seed)."""
    train, val, vocab = _char_data()
    torch.manual_seed(seed)
    model = model_class(vocab).to(device)
    return train.to(device), val.to(device), model, torch.Generator().manual_seed(10_000 + seed)


def _char_setup(seed: int, sparse: bool, device: torch.device) -> Problem:
    train, val, model, gen = _char_start(CharMLP, seed, device)
    # A fixed validation sample keeps evaluation cheap and identical for every run.
    val_x, val_y = _windows(val, torch.arange(0, len(val) - _CONTEXT - 1, 5))

    def loss(step: int) -> torch.Tensor:
        x, y = _windows(train, torch.randint(0, len(train) - _CONTEXT - 1, (128,), generator=gen))
        return F.cross_entropy(model(x), y)

    def evaluate() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(val_x), val_y))

    return Problem(model, loss, evaluate)


# ---------------------------------------------------------------- noisy quadratic

_NQM_DIM = 1000
_NQM_NOISE = 1e-2  # gradient-noise variance per unit of curvature


def _nqm_setup(seed: int, sparse: bool, device: torch.device) -> Problem:
    """The noisy quadratic model: curvatures h_i = 1/i (condition number 1000) and gradient noise of variance
    proportional to the curvature, as a mini-batch gradient's is near a minimum (Zhang et al. 2019). The metric is
    the noise-free loss."""
    h = 1.0 / torch.arange(1, _NQM_DIM + 1, dtype=torch.float32, device=device)
    torch.manual_seed(seed)
    x = torch.ones(_NQM_DIM, device=device).requires_grad_()
    gen = torch.Generator(device=device).manual_seed(10_000 + seed)

    def loss(step: int) -> torch.Tensor:
        # a mini-batch loss whose gradient is h*x plus noise of variance _NQM_NOISE * h
        noise = torch.randn(_NQM_DIM, generator=gen, device=device) * (_NQM_NOISE * h).sqrt()
        return 0.5 * (h * x * x).sum() + (noise * x).sum()

    def evaluate() -> float:
        with torch.no_grad():
            return float(0.5 * (h * x * x).sum())

    return Problem([x], loss, evaluate)



# ---------------------------------------------------------------- character-level transformer

_TF_CONTEXT, _TF_WIDTH, _TF_LAYERS, _TF_HEADS, _TF_BATCH = 32, 32, 2, 4, 16


class _Block(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention, then a 4x GELU MLP, each added back."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(_TF_WIDTH), nn.LayerNorm(_TF_WIDTH)
        self.qkv = nn.Linear(_TF_WIDTH, 3 * _TF_WIDTH)
        self.proj = nn.Linear(_TF_WIDTH, _TF_WIDTH)
        self.mlp = nn.Sequential(nn.Linear(_TF_WIDTH, 4 * _TF_WIDTH), nn.GELU(), nn.Linear(4 * _TF_WIDTH, _TF_WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, _TF_HEADS, width // _TF_HEADS).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.norm2(x))


class CharTransformer(nn.Module):
    """A small decoder-only transformer (GPT-style: learned positions, pre-norm blocks, a final norm) predicting
    every next character of its context."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, _TF_WIDTH)
        self.position = nn.Parameter(torch.zeros(_TF_CONTEXT, _TF_WIDTH))
        self.blocks = nn.Sequential(*(_Block() for _ in range(_TF_LAYERS)))
        self.norm = nn.LayerNorm(_TF_WIDTH)
        self.out = nn.Linear(_TF_WIDTH, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.out(self.norm(self.blocks(x)))


def _char_transformer_setup(seed: int, sparse: bool, device: torch.device) -> Problem:
    train, val, model, gen = _char_start(CharTransformer, seed, device)
    offsets = torch.arange(_TF_CONTEXT + 1, device=device)
    # a fixed validation sample: 128 windows spread over the held-out text
    val_windows = val[torch.linspace(0, len(val) - _TF_CONTEXT - 2, 128, device=device).long()[:, None] + offsets]

    def next_char_loss(windows: torch.Tensor) -> torch.Tensor:
        logits = model(windows[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))

    def loss(step: int) -> torch.Tensor:
        starts = torch.randint(0, len(train) - _TF_CONTEXT - 1, (_TF_BATCH,), generator=gen).to(device)
        return next_char_loss(train[starts[:, None] + offsets])

    def evaluate() -> float:
        with torch.no_grad():
            return float(next_char_loss(val_windows))

    return Problem(model, loss, evaluate)


# ---------------------------------------------------------------- registry

_DIGITS_IMG = lambda x: x.view(-1, 1, 8, 8)  # noqa: E731

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        _surface_task("rosenbrock", target=1e-2, steps=2000, quick_steps=1000),
        _surface_task("beale", target=1e-3, steps=2000, quick_steps=1000),
        _surface_task("rastrigin", target=0.5, steps=500, quick_steps=300),
        Task("logreg", "Logistic regression on scikit-learn's breast-cancer data (569 samples, 30 "
             "standardised features; convex). Batch 64.", "validation log-loss", False, 0.10,
             steps=600, quick_steps=300, eval_every=20, setup=_logreg_setup),
        Task("digits-mlp", "MLP 64-128-10 (ReLU) on scikit-learn's 8x8 digits (1437 train / 360 "
             "validation). Batch 64.", "validation accuracy", True, 0.95, steps=1200, quick_steps=300,
             eval_every=25, setup=_classifier(_mlp, "digits", 64)),
        Task("digits-cnn", "Small CNN (two 3x3 conv + pool layers) on the 8x8 digits. Batch 64.",
             "validation accuracy", True, 0.95, steps=600, quick_steps=300, eval_every=25,
             setup=_classifier(_cnn, "digits", 64, _DIGITS_IMG)),
        Task("digits-mlp-fullbatch", "The digits MLP at full batch (1437 samples per step, 22x the "
             "small batch): the large-batch regime LARS and LAMB were designed for.",
             "validation accuracy", True, 0.95, steps=300, quick_steps=150, eval_every=10,
             setup=_classifier(_mlp, "digits", 1_000_000)),
        Task("sparse-bag", "Bag-of-tokens classifier (EmbeddingBag 5000x16, mean, then linear) on "
             "generated Zipf documents whose class is carried by rare tokens. Adagrad gets sparse "
             "embedding gradients; every other optimizer the same model with dense gradients "
             "(they reject sparse ones). Batch 32.", "validation accuracy", True, 0.90, steps=1500,
             quick_steps=450, eval_every=25, setup=_bag_setup, has_sparse_variant=True),
        Task("char-lm", "Character-level LM (8-char context MLP) on CPython's pydoc_data help topics "
             "(first 200k characters, 90/10 split). Batch 128.", "validation cross-entropy (nats)",
             False, 2.1, steps=1000, quick_steps=500, eval_every=50, setup=_char_setup),
        Task("char-transformer", "Decoder-only transformer (2 pre-norm blocks, width 32, 4 heads, 32-character "
             "context, learned positions) predicting every next character of the same pydoc_data text. Batch 16 "
             "windows. Where Adam-like and matrix optimizers are meant to earn their place.",
             "validation cross-entropy (nats)", False, 2.15, steps=400, quick_steps=200, eval_every=40,
             setup=_char_transformer_setup),
        Task("noisy-quadratic", "The noisy quadratic model (Zhang et al. 2019): 1000 coordinates with curvatures "
             "1/i (condition number 1000) and gradient noise whose variance follows the curvature, as a mini-batch "
             "gradient's does near a minimum. The metric is the noise-free loss (3.74 at the start). Per-coordinate "
             "step sizes pay off here; plain SGD is held back by the flat directions and the noise.",
             "loss without noise", False, 0.05, steps=500, quick_steps=250, eval_every=10,
             setup=_nqm_setup, log_metric=True),
    ]
}

QUICK_TASKS = ["rosenbrock", "logreg", "digits-mlp", "sparse-bag"]


def get_task(name: str) -> Task:
    """The built-in task called ``name``; an :class:`ArenaError` listing the valid names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ArenaError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}") from None
