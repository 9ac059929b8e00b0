"""The convergence race: every contender trains the same small MLP on a real, bundled data set.

Data: scikit-learn's ``load_digits`` (1,797 8×8 images of handwritten digits, 10 classes), shipped
inside the scikit-learn wheel, so the race needs no download. Pixels are scaled to [0, 1]; a fixed,
seeded split holds out :attr:`RaceConfig.test_fraction` of the images.

Protocol (ecosystem notes §7.2, shrunk to one seed and one learning rate per optimizer): the same
model initialisation, the same sequence of minibatches (seeded epoch permutations) and the same
step budget for every contender; the training-set loss, test loss and test accuracy are evaluated
at evenly spaced steps on the full sets, so the curves are not minibatch noise. A contender whose
loss becomes non-finite stops there and is reported as diverged.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import importlib.util
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .progress import bar
from .registry import Contender, state_bytes
from .timing import synchronize


@dataclass(frozen=True)
class RaceConfig:
    """Size of the race: the step budget, the minibatch, the MLP's hidden width, the seed."""

    steps: int = 400
    batch_size: int = 64
    hidden: int = 128
    seed: int = 0
    test_fraction: float = 0.2
    eval_points: int = 20

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "hidden", "eval_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"Invalid {name}: {getattr(self, name)!r} (must be at least 1)")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"Invalid test_fraction: {self.test_fraction!r} (must be in (0, 1))")

    def eval_steps(self) -> list[int]:
        """Steps after which the model is evaluated: 0, ..., ``steps`` (``eval_points`` + 1 values)."""
        points = min(self.eval_points, self.steps)
        return sorted({round(i * self.steps / points) for i in range(points + 1)})


@dataclass
class Split:
    """Train and test tensors on one device."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def n_classes(self) -> int:
        return int(torch.cat([self.y_train, self.y_test]).max()) + 1


#: How to get scikit-learn when it is missing.
INSTALL_HINT = "pip install 'optimfx[bench]' (or pip install scikit-learn)"


def _digits_file() -> Path | None:
    """``digits.csv.gz`` inside the installed scikit-learn, found without importing it (which takes
    seconds: it imports SciPy)."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def digits_available() -> str | None:
    """Why the race cannot load its data (scikit-learn missing), or ``None``."""
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        spec = None
    return None if spec is not None else "scikit-learn is not installed"


def load_digits_table() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 digits as ``(pixels 0..16 as float32 [n, 64], labels int64 [n])``.

    Read straight from the CSV that scikit-learn bundles (the same numbers ``load_digits`` returns);
    through ``sklearn.datasets.load_digits`` if that file ever moves.
    """
    path = _digits_file()
    if path is None:
        from sklearn.datasets import load_digits

        data = load_digits()
        return torch.tensor(data.data, dtype=torch.float32), torch.tensor(data.target, dtype=torch.int64)
    rows = [[float(v) for v in line.split(",")] for line in gzip.decompress(path.read_bytes()).decode().splitlines()]
    table = torch.tensor(rows, dtype=torch.float32)
    return table[:, :-1].contiguous(), table[:, -1].to(torch.int64)


def load_digits_split(config: RaceConfig, device: torch.device | str = "cpu") -> Split:
    """The digits, pixels scaled to [0, 1], split by a permutation seeded with ``config.seed``."""
    pixels, y = load_digits_table()
    x = pixels / 16.0
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(config.seed))
    n_test = round(config.test_fraction * len(y))
    test, train = order[:n_test], order[n_test:]
    return Split(*(t.to(device) for t in (x[train], y[train], x[test], y[test])))


def make_model(n_features: int, hidden: int, n_classes: int, seed: int) -> nn.Module:
    """``Linear(n_features, hidden) → ReLU → Linear(hidden, n_classes)``, initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))


def batch_schedule(n_train: int, config: RaceConfig) -> list[torch.Tensor]:
    """The minibatch indices of every step: consecutive seeded permutations of the training set."""
    gen = torch.Generator().manual_seed(config.seed + 1)
    per_epoch = max(n_train // config.batch_size, 1)
    batches: list[torch.Tensor] = []
    while len(batches) < config.steps:
        order = torch.randperm(n_train, generator=gen)
        batches += [order[i * config.batch_size:(i + 1) * config.batch_size] for i in range(per_epoch)]
    return batches[:config.steps]


@dataclass
class RaceResult:
    """One contender's run: curves at the evaluation steps and the final figures."""

    name: str
    implementation: str
    settings: str
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    state_bytes_per_param: float | None = None
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.steps)

    @property
    def final_train_loss(self) -> float | None:
        return self.train_loss[-1] if self.ok else None

    @property
    def final_test_accuracy(self) -> float | None:
        return self.test_accuracy[-1] if self.ok else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "final_train_loss": self.final_train_loss,
                "final_test_loss": self.test_loss[-1] if self.ok else None,
                "final_test_accuracy": self.final_test_accuracy}


@torch.no_grad()
def evaluate(model: nn.Module, split: Split) -> tuple[float, float, float]:
    """``(train loss, test loss, test accuracy)`` on the full sets."""
    train_loss = nn.functional.cross_entropy(model(split.x_train), split.y_train)
    logits = model(split.x_test)
    test_loss = nn.functional.cross_entropy(logits, split.y_test)
    accuracy = (logits.argmax(dim=1) == split.y_test).double().mean()
    return float(train_loss), float(test_loss), float(accuracy)


def _record(result: RaceResult, step: int, model: nn.Module, split: Split) -> bool:
    """Append an evaluation; ``False`` (and the error set) when the loss is no longer finite."""
    train_loss, test_loss, accuracy = evaluate(model, split)
    result.steps.append(step)
    result.train_loss.append(train_loss)
    result.test_loss.append(test_loss)
    result.test_accuracy.append(accuracy)
    if not math.isfinite(train_loss):
        result.error = f"diverged by step {step} (training loss {train_loss})"
        return False
    return True


def race_one(contender: Contender, model: nn.Module, split: Split, batches: Sequence[torch.Tensor],
             config: RaceConfig, device: torch.device, on_step: Callable[[], None]) -> RaceResult:
    """Train ``model`` (modified in place) with ``contender`` for ``len(batches)`` steps."""
    result = RaceResult(contender.name, contender.impl_name(device), contender.settings)
    checkpoints = set(config.eval_steps())
    params = list(model.parameters())
    start = time.perf_counter()
    try:
        optimizer = contender.factory(params)
        if not _record(result, 0, model, split):
            return result
        for step, index in enumerate(batches, start=1):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(split.x_train[index]), split.y_train[index]).backward()
            optimizer.step()
            on_step()
            if step in checkpoints and not _record(result, step, model, split):
                break
        result.state_bytes_per_param = state_bytes(optimizer) / sum(p.numel() for p in params)
    except Exception as err:  # report it in the table rather than abort the whole race
        result.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    synchronize(device)
    result.seconds = time.perf_counter() - start
    return result


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread on CPU: the race's tensors are tiny, and on a busy 2-core machine a second
    thread made its steps about 10x slower rather than faster."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_race(contenders: Sequence[Contender], config: RaceConfig, device: torch.device | str = "cpu",
             *, show_progress: bool = False, log: Callable[[str], None] | None = None) -> list[RaceResult]:
    """Race every contender from the same initialisation over the same minibatches."""
    device = torch.device(device)
    log = log or (lambda _msg: None)
    split = load_digits_split(config, device)
    initial = make_model(split.n_features, config.hidden, split.n_classes, config.seed).to(device)
    batches = [b.to(device) for b in batch_schedule(len(split.y_train), config)]
    results = []
    with _one_thread(device), \
            bar(len(contenders) * config.steps, "race", enabled=show_progress, unit="step") as progress:
        for contender in contenders:
            progress.set_postfix_str(contender.name)
            if not show_progress:
                log(f"racing {contender.name} ({config.steps} steps)")
            taken = [0]

            def on_step() -> None:
                taken[0] += 1
                progress.update()

            result = race_one(contender, copy.deepcopy(initial), split, batches, config, device, on_step)
            progress.update(config.steps - taken[0])  # the steps a diverged contender did not take
            if result.error is not None:
                log(f"  {contender.name}: {result.error}")
            results.append(result)
    return results
