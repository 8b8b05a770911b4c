"""The search space of a sweep: parsed and checked against the training schema before any
trial starts, then turned into Ray Tune domains.

A space maps key paths of the training config to distributions:
    {choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {randint: [lo, hi]} (inclusive)
or ties one key to another: {ratio_of: method.lora.r, factor: 2} (alpha = 2r). Tied keys are
not searched: each trial computes them from its sampled values.

`rayft compare` adds a third kind that no sweep file writes: named cases, each setting several
keys at once (a method's whole block and its learning rate); trials see the case's name.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass
from typing import Any, Optional

from rayft.config import TrainJobConfig, flatten, parse_config
from rayft.errors import ConfigError

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
# Set by the sweep itself for each trial, or shared by all trials.
NOT_SEARCHABLE = ("name", "output_dir", "tracking.", "distributed.ray_address", "distributed.storage_path")


@dataclass(frozen=True)
class Dimension:
    key: str
    kind: str  # one of DISTRIBUTIONS, "ratio_of", or "case"
    values: tuple = ()  # choice: the values; uniform/loguniform/randint: (low, high); case: the names
    ref: Optional[str] = None  # ratio_of: the key this one follows
    factor: float = 1.0
    settings: tuple = ()  # case: (name, {key path: value}) for each name in values

    def candidates(self) -> tuple:
        """The values a check must accept: every choice, or the bounds of a range."""
        return self.values


@dataclass(frozen=True)
class SearchSpace:
    searched: tuple[Dimension, ...]
    tied: tuple[Dimension, ...]

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.searched + self.tied]

    def kind_of(self, key: str) -> str:
        return next(d.kind for d in self.searched + self.tied if d.key == key)

    def tune_space(self, algorithm: str, grid_seed: Optional[int] = None) -> dict[str, Any]:
        """Tune's param_space; a grid's values are shuffled with grid_seed when one is given."""
        from ray import tune

        space = {}
        for dim in self.searched:
            if algorithm == "grid":
                values = list(dim.values)
                if grid_seed is not None:
                    random.Random(f"{grid_seed}:{dim.key}").shuffle(values)
                space[dim.key] = tune.grid_search(values)
            elif dim.kind in ("choice", "case"):
                space[dim.key] = tune.choice(list(dim.values))
            elif dim.kind == "uniform":
                space[dim.key] = tune.uniform(*dim.values)
            elif dim.kind == "loguniform":
                space[dim.key] = tune.loguniform(*dim.values)
            else:  # randint: inclusive here, exclusive upper bound in Tune
                space[dim.key] = tune.randint(dim.values[0], dim.values[1] + 1)
        return space

    def grid_size(self) -> int:
        return math.prod(len(d.values) for d in self.searched)

    def resolve(self, sampled: dict[str, Any], base: TrainJobConfig) -> dict[str, Any]:
        """A trial's value of every key in the space: its sampled ones plus the tied ones."""
        base_values = flatten(base.to_dict())
        values = {d.key: sampled[d.key] for d in self.searched}
        for dim in self.tied:
            ref_value = values.get(dim.ref, base_values[dim.ref])
            values[dim.key] = tied_value(ref_value, dim.factor, base_values[dim.key])
        return values

    def config_values(self, sampled: dict[str, Any], base: TrainJobConfig) -> dict[str, Any]:
        """The training config's keys a trial sets: resolve()'s, with each case name replaced by the
        keys that case sets."""
        values = self.resolve(sampled, base)
        for dim in self.searched:
            if dim.kind == "case":
                values.pop(dim.key)
                values.update(dict(dim.settings)[sampled[dim.key]])
        return values


def tied_value(ref_value: Any, factor: float, like: Any) -> Any:
    """ref_value * factor, of the type the tied key has in the base config (int stays int)."""
    value = ref_value * factor
    if isinstance(like, int) and not isinstance(like, bool) and float(value).is_integer():
        return int(value)
    return float(value) if isinstance(like, float) else value


def set_key(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of the raw config dict with `key` (a dotted path) set to `value`."""
    raw = copy.deepcopy(raw)
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return raw


def apply_values(base_raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    for key, value in values.items():
        base_raw = set_key(base_raw, key, value)
    return base_raw


def _number_pair(spec: Any, where: str, kind: str) -> tuple:
    if not (isinstance(spec, list) and len(spec) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec)):
        raise ConfigError(f"{where}: {kind} takes [low, high] (two numbers), got {spec!r}")
    low, high = spec
    if not low < high:
        raise ConfigError(f"{where}: {kind} needs low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")
    if kind == "randint" and not all(isinstance(v, int) for v in spec):
        raise ConfigError(f"{where}: randint takes two integers, got {spec!r}")
    return (low, high)


def parse_dimension(key: str, spec: Any) -> Dimension:
    where = f"search.space.{key}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a distribution such as {{choice: [...]}} or "
                          f"{{loguniform: [lo, hi]}}, got {spec!r}")
    if "ratio_of" in spec:
        extra = set(spec) - {"ratio_of", "factor"}
        if extra:
            raise ConfigError(f"{where}: unknown key {sorted(extra)[0]!r} beside ratio_of (allowed: factor)")
        factor = spec.get("factor", 1)
        if not isinstance(spec["ratio_of"], str) or not isinstance(factor, (int, float)) or isinstance(factor, bool) \
                or factor <= 0:
            raise ConfigError(f"{where}: ratio_of takes a key path and a positive number factor, got {spec!r}")
        return Dimension(key, "ratio_of", ref=spec["ratio_of"], factor=factor)
    kinds = [k for k in spec if k in DISTRIBUTIONS]
    unknown = [k for k in spec if k not in DISTRIBUTIONS]
    if unknown or len(kinds) != 1:
        raise ConfigError(f"{where}: expected exactly one of {', '.join(DISTRIBUTIONS)} or ratio_of, got "
                          f"{', '.join(map(str, spec)) or 'an empty mapping'}")
    kind = kinds[0]
    if kind == "choice":
        values = spec["choice"]
        if not isinstance(values, list):
            raise ConfigError(f"{where}: choice takes a list of values, got {values!r}")
        if not values:
            raise ConfigError(f"{where}: choice has no values (an empty grid)")
        return Dimension(key, kind, tuple(values))
    return Dimension(key, kind, _number_pair(spec[kind], where, kind))


def parse_space(space_raw: dict[str, Any], base_raw: dict[str, Any], base: TrainJobConfig,
                algorithm: str) -> SearchSpace:
    """Check every key and every candidate value against the training schema."""
    if not space_raw:
        raise ConfigError("search.space: no keys to search")
    known = flatten(base.to_dict())
    dims = []
    for key, spec in space_raw.items():
        if key.startswith(NOT_SEARCHABLE):
            raise ConfigError(f"search.space.{key}: not searchable (the sweep sets it for every trial)")
        if key not in known:
            near = [k for k in known if k.startswith(key + ".")]
            hint = f" (a section; keys inside: {', '.join(near[:4])})" if near else ""
            raise ConfigError(f"search.space: unknown key {key!r}: not a key of the training config{hint}")
        dims.append(parse_dimension(key, spec))
    searched = tuple(d for d in dims if d.kind != "ratio_of")
    tied = tuple(d for d in dims if d.kind == "ratio_of")
    if not searched:
        raise ConfigError("search.space: every key is tied (ratio_of); nothing is searched")
    for dim in tied:
        where = f"search.space.{dim.key}"
        if dim.ref == dim.key or dim.ref not in known:
            raise ConfigError(f"{where}: ratio_of {dim.ref!r} is not another key of the training config")
        if any(t.key == dim.ref for t in tied):
            raise ConfigError(f"{where}: ratio_of {dim.ref!r}, which is itself tied; tie to a searched key")
    if algorithm == "grid":
        for dim in searched:
            if dim.kind != "choice":
                raise ConfigError(f"search.space.{dim.key}: algorithm grid needs a choice list, got {dim.kind} "
                                  f"(use random or optuna for ranges)")
    space = SearchSpace(searched, tied)
    _check_values(space, base_raw, base)
    return space


def _check_values(space: SearchSpace, base_raw: dict[str, Any], base: TrainJobConfig) -> None:
    """Every candidate value (and the tied values it implies) must make a valid training config."""
    base_values = flatten(base.to_dict())
    for dim in space.searched:
        for value in dim.candidates():
            values = {dim.key: value}
            for tie in space.tied:
                if tie.ref == dim.key:
                    values[tie.key] = tied_value(value, tie.factor, base_values[tie.key])
            parse_config(apply_values(base_raw, values), source=f"search.space.{dim.key}={value!r}")
    for tie in space.tied:
        if all(d.key != tie.ref for d in space.searched):
            value = tied_value(base_values[tie.ref], tie.factor, base_values[tie.key])
            parse_config(set_key(base_raw, tie.key, value), source=f"search.space.{tie.key}")
