"""Population-based training's settings (`--pbt`, a study file's `pbt:` block), their checks,
and its explore step (a donor's values perturbed inside the space).

    pbt:
      population: 8          # members trained together (one pack)
      interval: 4            # epochs between exploit/explore steps
      quantile: 0.25         # the worst quarter copies the best quarter
      resample_probability: 0.25   # explore: resample from the space, else x0.8 or x1.2
      mutate: [lr, weight_decay]   # default: every searched per-trial setting

The defaults are Ray Tune's (PopulationBasedTraining): quantile 0.25, resample probability
0.25, perturbation factors 0.8 / 1.2.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from search.errors import UserError
from search.inputs.space import Space
from search.inputs.values import int_at_least
from trainer.config import MODEL_ARGS_PREFIX, PER_TRIAL

KEYS = ("population", "interval", "quantile", "resample_probability", "mutate")
FACTORS = (0.8, 1.2)  # Ray Tune's perturbation factors
NEVER_MUTATE = ("seed", "diverge_factor")  # per trial, but not hyperparameters to tune
# Shape settings (they fix a pack) that explore may resample: a member's state -- weights,
# optimiser state, generator -- means the same under any of their values. They are never
# perturbed (x0.8 / x1.2 of a batch size is not a choice), only drawn afresh.
RESAMPLED = ("batch_size", "augment", "local_steps", "local_partition")
# Settings a member keeps for its life: a donor's state has another layout under another
# network (and any `model_args.NAME`) or number of local workers, so a member copies only
# members that share them. Every other setting is copied from the donor with its state.
KEPT = ("model", "local_workers")


@dataclass
class Pbt:
    """A PBT study's settings (plain data: it travels with RunSettings to every worker)."""

    population: int = 8
    interval: int = 4
    quantile: float = 0.25
    resample_probability: float = 0.25
    mutate: list[str] = field(default_factory=list)  # filled from the space when empty
    workers: int = 1  # the command's workers (--workers): the population is shared by them

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replaced_per_step(self, ranked: int | None = None) -> int:
        """How many members copy others at each step (of `ranked` members; default the
        population): the quantile of them, at least one, never more than half (a member is
        never both donor and recipient)."""
        n = self.population if ranked is None else ranked
        return max(1, min(n // 2, math.ceil(n * self.quantile)))

    def at_boundary(self, epoch: int, epochs: int) -> bool:
        """Whether a generation ends at `epoch` of an `epochs`-long run (never at its start or
        its end): the one rule for when members exploit and explore."""
        return 0 < epoch < epochs and epoch % self.interval == 0

    def split(self, ranked: list) -> tuple[list, list]:
        """The exploit rule: of members ranked best first, the top quantile (donors) and the
        bottom quantile (losers, who copy a donor of their shape); no loser among fewer than 2."""
        n = self.replaced_per_step(len(ranked))
        return ranked[:n], ranked[-n:] if len(ranked) >= 2 else []


def mutable_names(space: Space) -> list[str]:
    """The space's searched settings explore may change: those the stacked engine holds per
    trial (trainer.config's PER_TRIAL: lr, momentum / betas, weight decay, schedule lengths,
    ...), perturbed or resampled, and the shape settings in RESAMPLED, resampled only."""
    return [p.name for p in space.params
            if (p.name in PER_TRIAL and p.name not in NEVER_MUTATE) or p.name in RESAMPLED]


def keeps(name: str) -> bool:
    """Whether a member keeps setting `name` for its life (KEPT and `model_args.*`)."""
    return name in KEPT or name.startswith(MODEL_ARGS_PREFIX)


def kept(params: dict[str, Any]) -> dict[str, Any]:
    """A member's values it keeps for its life: its donors share them."""
    return {k: v for k, v in params.items() if keeps(k)}


def copy_limits(space: Space, overrides: dict[str, Any]) -> str | None:
    """The line said at the start when members cannot copy every member: the space searches
    a setting a member keeps for its life. None when any member may copy any other."""
    names = [p.name for p in space.params if p.name not in overrides and keeps(p.name)]
    if not names:
        return None
    return (f"PBT: members copy only members of their own {', '.join(names)} (searched by "
            f"{space.path}): another network or number of local workers cannot take a "
            "member's state; a member whose top quantile holds none of its own trains on as "
            "it is")


def parse_block(doc: Any, where: str) -> dict[str, Any]:
    """A study file's `pbt:` mapping, keys checked (values are checked with the flags')."""
    if not isinstance(doc, dict):
        raise UserError(f"{where}pbt: expected a mapping ({', '.join(KEYS)})")
    extra = sorted(set(doc) - set(KEYS), key=str)
    if extra:
        raise UserError(f"{where}pbt.{extra[0]}: unknown key; expected one of {', '.join(KEYS)}")
    return {**doc, **{f"_source_{k}": f"{where}pbt.{k}" for k in doc}}


def resolve_pbt(block: dict[str, Any], space: Space, epochs: int, pruner: str | None,
                objectives: list[str], where: str = "") -> Pbt:
    """Checked PBT settings (`block`: the flags over the study file's `pbt:`). Every bad value is
    one line naming its flag or key. `pruner`: the one asked for explicitly, if any."""
    def name(key: str) -> str:
        return block.get(f"_source_{key}") or f"--pbt-{key.replace('_', '-')}"

    pbt = Pbt(**{k: block[k] for k in KEYS if block.get(k) is not None})
    if isinstance(pbt.mutate, str):  # --pbt-mutate lr,weight_decay
        pbt.mutate = [s.strip() for s in pbt.mutate.split(",") if s.strip()]
    if not int_at_least(pbt.population, 2):
        raise UserError(f"{name('population')}: expected an integer >= 2 (a population "
                        f"copies among its members), got {pbt.population!r}")
    if not int_at_least(pbt.interval, 1) or pbt.interval >= epochs:
        raise UserError(f"{name('interval')}: expected an integer >= 1 and below the trials' "
                        f"{epochs} epochs, got {pbt.interval!r}")
    if isinstance(pbt.quantile, bool) or not isinstance(pbt.quantile, int | float) \
            or not 0 < pbt.quantile <= 0.5:
        raise UserError(f"{name('quantile')}: expected a fraction in (0, 0.5], got {pbt.quantile!r}")
    p = pbt.resample_probability
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1:
        raise UserError(f"{name('resample_probability')}: expected a probability in [0, 1], "
                        f"got {p!r}")
    allowed = mutable_names(space)
    if not isinstance(pbt.mutate, list):
        raise UserError(f"{name('mutate')}: expected a list of settings, got {pbt.mutate!r}")
    for key in pbt.mutate:
        if key not in allowed:
            searched = {q.name for q in space.params}
            why = ("not a searched parameter of the space" if key not in searched else
                   "not explored: a member's state (weights, optimiser state) would not fit "
                   "another value")
            raise UserError(f"{name('mutate')}: {key}: {why}; expected some of "
                            f"{', '.join(allowed) or '(none: the space searches no per-trial setting)'}")
    pbt.mutate = pbt.mutate or allowed
    if not pbt.mutate:
        raise UserError(f"{space.path}: PBT needs a searched per-trial setting to explore "
                        f"(one of {', '.join(p for p in PER_TRIAL if p not in NEVER_MUTATE)})")
    if pruner not in (None, "none"):
        raise UserError(f"--pbt with pruner {pruner}: PBT replaces its worst members itself; "
                        "drop --pruner (or set pruner: none)")
    if len(objectives) > 1:
        raise UserError(f"--pbt with objectives {','.join(objectives)}: PBT ranks members by "
                        "one objective; give one --objective")
    return pbt


def explore(params: dict[str, Any], distributions: dict[str, BaseDistribution],
            mutate: list[str], resample_probability: float, rng: random.Random) -> dict[str, Any]:
    """A donor's values, explored: each mutable one resampled from its distribution with
    `resample_probability`, else multiplied by 0.8 or 1.2 (a categorical moves to a
    neighbouring choice), then clipped and rounded into its distribution (a value never leaves
    the space). A shape setting (RESAMPLED) is only resampled, else kept."""
    sampler = optuna.samplers.RandomSampler(seed=rng.randrange(2**31))
    out = dict(params)
    for name in mutate:
        if name not in params:  # a conditional parameter this member does not have
            continue
        dist = distributions[name]
        if rng.random() < resample_probability:
            out[name] = sampler.sample_independent(None, None, name, dist)  # type: ignore[arg-type]
        elif name in RESAMPLED:
            continue
        elif isinstance(dist, CategoricalDistribution):
            i = dist.choices.index(params[name]) + rng.choice((-1, 1))
            out[name] = dist.choices[min(max(i, 0), len(dist.choices) - 1)]
        else:
            out[name] = clip(params[name] * rng.choice(FACTORS), dist)
    return out


def clip(value: float, dist: BaseDistribution) -> float | int:
    """A perturbed number back inside its distribution: its bounds, its step, its type."""
    assert isinstance(dist, FloatDistribution | IntDistribution)
    value = min(max(value, dist.low), dist.high)
    if dist.step is not None:
        value = dist.low + round((value - dist.low) / dist.step) * dist.step
        value = min(value, dist.high)
    if isinstance(dist, IntDistribution):
        return int(round(value))
    return float(value)
