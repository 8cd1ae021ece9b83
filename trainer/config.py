"""One dataclass holding every knob of a training run; defaults are the notes' baseline."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from trainer.catalogue import DATASETS, train_split_size
from trainer.errors import ConfigError

OPTIMIZERS = ("adamw", "sgdm", "lars", "lamb")
AUGMENTS = ("none", "flip-crop", "adamw", "sgdm", "final")
SCHEDULES = ("cosine", "constant")
LR_SCALINGS = ("none", "linear", "sqrt")
PRECISIONS = ("auto", "fp32", "bf16")
PARTITIONS = ("iid", "noniid")

# The notes' baseline lr per optimiser (AdamW 1e-3, SGDM 1e-2); LARS and LAMB start from the
# values their papers use at batch 64 equivalents.
DEFAULT_LR = {"adamw": 1e-3, "sgdm": 1e-2, "lars": 1.0, "lamb": 2e-3}

# the layout of a checkpoint (trainer.engine writes it, search.study.checkpoints checks it);
# raised whenever the layout changes, so an older file is refused instead of misread
CHECKPOINT_FORMAT = 2
CHECKPOINT_KEYS = ("format", "epoch", "step", "rounds", "history", "params", "optimizer",
                   "generator")


def optimiser_steps(config: TrainConfig) -> int:
    """About how many optimiser steps a run takes (each worker's shard of the training split,
    in local batches, per epoch): enough to tell whether a local method ever averages."""
    shard = train_split_size(config.dataset, config.val_fraction) // config.local_workers
    local_batch = max(1, config.batch_size // config.local_workers)
    return config.epochs * math.ceil(shard / local_batch)


def never_averages(config: TrainConfig) -> int | None:
    """The ~optimiser steps a run takes when its local method's workers would never average
    (H longer than the whole run), else None."""
    steps = optimiser_steps(config)
    return steps if config.local_steps > steps else None


@dataclass
class TrainConfig:
    # optimiser
    optimizer: str = "adamw"
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    momentum: float = 0.9  # SGDM/LARS momentum, AdamW/LAMB beta1
    beta2: float = 0.999
    weight_decay: float = 1e-4
    trust_coefficient: float = 0.001  # LARS eta
    lamb_clamp: float = 10.0  # LAMB upper clamp of ||w||
    # schedule
    epochs: int = 150
    batch_size: int = 64
    schedule: str = "cosine"
    t_max: int | None = None  # cosine period in epochs; None: epochs
    warmup_epochs: int = 0
    lr_scaling: str = "none"  # relative to base_batch_size
    base_batch_size: int = 64
    # data
    dataset: str = "cifar100"
    data_root: str | None = None  # None: default_data_root()
    val_fraction: float = 0.2
    split_seed: int = 0
    augment: str = "final"
    # local methods (K simulated workers, H local steps between averages)
    local_workers: int = 1
    local_steps: int = 1
    local_partition: str = "iid"  # iid (label-stratified shards) or noniid (classes split)
    slowmo_beta: float = 0.0  # SlowMo outer momentum; 0 with slowmo_lr 1 is plain averaging
    slowmo_lr: float = 1.0
    # network: lenet5, torchvision:NAME, PATH.py:FUNCTION or package.module:FUNCTION
    # (trainer.networks), called with num_classes= and model_args
    model: str = "lenet5"
    model_args: dict[str, Any] = field(default_factory=dict)
    # run
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    threads: int | None = None  # CPU threads; None: torch's default
    # a run whose epoch-mean train loss exceeds this many times the chance loss ln(classes)
    # has diverged (weights blown up, even where the loss stays finite)
    diverge_factor: float = 3.0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def base_lr(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

    def validate(self) -> None:
        choices = {
            "optimizer": OPTIMIZERS,
            "dataset": DATASETS,
            "augment": AUGMENTS,
            "schedule": SCHEDULES,
            "lr_scaling": LR_SCALINGS,
            "precision": PRECISIONS,
            "local_partition": PARTITIONS,
        }
        for key, allowed in choices.items():
            if key == "dataset" and str(self.dataset).startswith("folder:"):
                continue  # a folder of the user's images (trainer.folder), scanned below
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"{key}: {getattr(self, key)!r} is not one of {', '.join(allowed)}"
                    + (" or folder:PATH" if key == "dataset" else "")
                )
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(f"model: expected lenet5, torchvision:NAME, PATH.py:FUNCTION or "
                              f"package.module:FUNCTION, got {self.model!r}")
        if not isinstance(self.model_args, dict) or not all(
                isinstance(k, str) and k.isidentifier() for k in self.model_args):
            raise ConfigError(f"model_args: expected a mapping of argument names to values, got "
                              f"{self.model_args!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name}: expected a finite number, got {value}")
        positive = ("epochs", "batch_size", "base_batch_size", "local_workers", "local_steps")
        for key in positive:
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"{key}: expected an integer >= 1, got {getattr(self, key)}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr: expected a positive number, got {self.lr}")
        if self.t_max is not None and self.t_max < 1:
            raise ConfigError(f"t_max: expected an integer >= 1, got {self.t_max}")
        for key in ("weight_decay", "warmup_epochs", "slowmo_beta"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: expected a value >= 0, got {getattr(self, key)}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum: expected 0 <= value < 1, got {self.momentum}")
        if not 0 <= self.beta2 < 1:
            raise ConfigError(f"beta2: expected 0 <= value < 1, got {self.beta2}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction: expected 0 < value < 1, got {self.val_fraction}")
        if self.batch_size % self.local_workers:
            raise ConfigError(
                f"batch_size: {self.batch_size} is not divisible by local_workers "
                f"{self.local_workers} (K x local batch = global batch)"
            )
        split = train_split_size(self.dataset, self.val_fraction)
        if self.batch_size > split:
            raise ConfigError(f"batch_size: {self.batch_size} is larger than the {self.dataset} "
                              f"training split ({split} images)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """From settings by name; `model_args.NAME` keys (a space's searched or fixed model
        arguments, flat as Optuna keeps them) join `model_args`."""
        values = fold_model_args(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown setting; expected one of {', '.join(sorted(known))}")
        return cls(**values)


MODEL_ARGS_PREFIX = "model_args."


def fold_model_args(values: dict[str, Any]) -> dict[str, Any]:
    """`{"model_args.width": 32, ...}` -> `{"model_args": {"width": 32}, ...}` (over any
    `model_args` mapping given whole)."""
    flat = {k[len(MODEL_ARGS_PREFIX):]: v for k, v in values.items() if k.startswith(MODEL_ARGS_PREFIX)}
    if not flat:
        return dict(values)
    out = {k: v for k, v in values.items() if not k.startswith(MODEL_ARGS_PREFIX)}
    out["model_args"] = {**dict(out.get("model_args") or {}), **flat}
    return out


def field_types() -> dict[str, str]:
    """Setting name -> its annotated type as text (`'float | None'`), for schema checks."""
    return {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}


# Settings that may differ between trials of one pack: they live in per-trial tensors (the
# optimiser's hyperparameters, the lr schedule) or per-trial state (the seed). Every other
# setting changes shapes or the step, so trials must agree on it to share a pack.
PER_TRIAL = ("lr", "momentum", "beta2", "weight_decay", "trust_coefficient", "lamb_clamp",
             "schedule", "t_max", "warmup_epochs", "lr_scaling", "base_batch_size", "seed",
             "diverge_factor")


def pack_key(config: TrainConfig) -> tuple:
    """Trials with equal keys can be trained together as one stacked model (the same network
    and `model_args`: the same parameter shapes)."""
    return tuple((k, tuple(sorted(v.items())) if isinstance(v, dict) else v)
                 for k, v in sorted(config.to_dict().items()) if k not in PER_TRIAL)
