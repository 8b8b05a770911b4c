"""Typed schema of a training config: validated once at the edge, the one place defaults live.

Unknown keys are errors (a misspelled key must never fall back to a silent default), and every
error names the key path, the bad value and what is allowed.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)

from rayft.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """YAML as users write numbers: PyYAML (YAML 1.1) reads `1e-5` as a string, YAML 1.2 as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    name_or_path: str = DEFAULT_BASE_MODEL


def own_block_only(raw: dict, chosen: str, registered: list[str], block_schema, fields: tuple, prefix: str,
                   chooser: str) -> dict:
    """`raw` with the chosen method's (or stage's) block validated by its module's schema, under
    the block's name so that errors name <prefix><name>.<key>; a block of another registered one,
    or any key that is neither a field nor the chosen block, is an error."""
    raw = dict(raw)
    for key in raw:
        if key not in fields and key != chosen:
            if key in registered:
                raise ValueError(f"{prefix}{key}: a block for {chooser.split('.')[0]} {key!r}, but {chooser} is {chosen!r}")
            raise ValueError(f"unknown key {prefix}{key}")
    raw[chosen] = getattr(block_schema.model_validate({chosen: raw.get(chosen) or {}}), chosen)
    return raw


class MethodConfig(Strict):
    """`method.type` and that method's own block, `method.<type>`, whose schema the method's module
    owns (rayft/methods/). A block for another method is an error, as is an unknown key in the block."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    type: str = "lora"

    @model_validator(mode="before")
    @classmethod
    def _own_block_only(cls, raw: Any) -> Any:
        from rayft.methods import get_method, method_names

        if not isinstance(raw, dict):
            return raw
        name = raw.get("type", "lora")
        if name not in method_names():
            return raw  # the field validator below names the unknown type
        return own_block_only(raw, name, method_names(), get_method(name).block_schema(), ("type",), "method.",
                              "method.type")

    @field_validator("type")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from rayft.methods import method_names

        if value not in method_names():
            raise ValueError(f"unknown method {value!r}; allowed: {', '.join(method_names())}")
        return value

    @property
    def options(self) -> Strict:
        """The block of the chosen method (method.<type>)."""
        return getattr(self, self.type)


FORMATS = Literal["auto", "alpaca", "sharegpt", "messages"]
# the two forms of data.train; errors leave these names out of the key path they print
ONE_FILE, SOURCES = "one file", "a list of sources"
# a name that becomes part of metric names (eval_<set>_loss, eval_task_<task>_loss)
METRIC_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class SourceConfig(Strict):
    """One data source of a mixture (data.train as a list)."""

    path: str  # a JSON/JSONL file, or a directory of them
    format: FORMATS = "auto"
    # concat: how many times the source is taken (0.5: a seeded half, 2: twice); interleave: its
    # share of the draws
    weight: float = Field(1.0, ge=0)
    task: Optional[str] = Field(None, pattern=METRIC_NAME)  # the task of records that name none
    max_samples: Optional[int] = Field(None, gt=0)  # the first N records (before the validation split)
    # rayft's field -> the record's field: instruction, input, output, history, system, tools,
    # conversations, messages, chosen, rejected, prompt, task (and LLaMA-Factory's query and
    # response for input and output)
    columns: dict[str, str] = {}
    # sharegpt role names: role_tag, content_tag, user_tag, assistant_tag, observation_tag,
    # function_tag, system_tag (LLaMA-Factory's `tags`)
    tags: dict[str, str] = {}
    val: Optional[str] = None  # this source's validation file (else val_size of its records)
    val_size: Optional[float] = None  # None: data.val_size

    @field_validator("val_size")
    @classmethod
    def _fraction(cls, value: Optional[float]) -> Optional[float]:
        if value is not None and not 0 <= value < 1:
            raise ValueError(f"must be inside [0, 1), got {value}")
        return value


class FilterConfig(Strict):
    """data.filter: which training records are kept when the data is prepared (the validation split
    and eval sets are measured as they are, so their losses stay comparable across filters)."""

    # keep records whose score (written by `rayft data score`) lies inside [min_score, max_score]
    min_score: Optional[float] = None
    max_score: Optional[float] = None
    score: Literal["ifd", "loss"] = "ifd"  # which score: the answer's loss, or IFD (loss with / without prompt)
    # drop records whose content repeats an earlier record's (exact), or nearly (near: the MinHash
    # estimate of their word 3-gram sets' Jaccard similarity at least near_threshold); the first is kept
    dedup: Literal["exact", "near", "none"] = "none"
    near_threshold: float = Field(0.8, gt=0, le=1)
    # drop samples longer than this many tokens (their longest sequence) instead of truncating them
    max_tokens: Optional[int] = Field(None, gt=0)

    @property
    def bounds_score(self) -> bool:
        return self.min_score is not None or self.max_score is not None

    @model_validator(mode="after")
    def _range(self) -> "FilterConfig":
        if self.min_score is not None and self.max_score is not None and self.min_score > self.max_score:
            raise ValueError(f"data.filter: min_score={self.min_score} is above max_score={self.max_score}")
        return self


class DataConfig(Strict):
    # one file, or sources to mix; absent when dataset_info + datasets name them
    train: Annotated[Union[Annotated[str, Tag(ONE_FILE)], Annotated[list[SourceConfig], Tag(SOURCES)]],
                     Discriminator(lambda v: SOURCES if isinstance(v, list) else ONE_FILE)] | None = None
    val: Optional[str] = None
    format: FORMATS = "auto"
    val_size: float = 0.1
    # LLaMA-Factory's dataset_info.json and the names of its datasets to train on
    dataset_info: Optional[str] = None
    datasets: list[str] = []
    # concat: the sources one after another (each taken `weight` times); interleave: records drawn
    # from the sources at random in proportion to their weights (seeded), until the first source
    # is exhausted or (all_seen) until every record of every source has been drawn once
    mix: Literal["concat", "interleave"] = "concat"
    interleave_until: Literal["first_exhausted", "all_seen"] = "first_exhausted"
    # evaluated before, every eval_steps and after training, each as eval_<name>_loss: general
    # data whose loss shows forgetting
    eval_sets: dict[str, str] = {}
    # multi-task records: how a record's task becomes part of its prompt, and static loss weights
    task_template: str = "[{task}] {prompt}"
    task_weights: dict[str, float] = {}
    # dwa: Dynamic Weight Average (Liu et al., CVPR 2019) multiplies task_weights by weights that
    # follow each task's validation loss, refreshed at every evaluation (see train/task_weights.py)
    task_weighting: Literal["static", "dwa"] = "static"
    dwa_temperature: float = Field(2.0, gt=0)
    cutoff_len: int = Field(512, ge=16)
    packing: bool = True
    train_on_prompt: bool = False
    filter: FilterConfig = FilterConfig()

    @field_validator("val_size")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0 < value < 1:
            raise ValueError(f"must be inside (0, 1), got {value}")
        return value

    @field_validator("eval_sets", "task_weights")
    @classmethod
    def _metric_names(cls, value: dict) -> dict:
        for name in value:
            if not re.match(METRIC_NAME, name):
                raise ValueError(f"{name!r} cannot be part of a metric name (letters, digits, _ . -)")
        return value

    @field_validator("task_weights")
    @classmethod
    def _task_weights(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not v >= 0}
        if bad:
            raise ValueError(f"weights must be >= 0, got {bad}")
        if value and not any(value.values()):
            raise ValueError("all weights are zero")
        return value

    @field_validator("task_template")
    @classmethod
    def _template(cls, value: str) -> str:
        if "{prompt}" not in value:
            raise ValueError(f"{value!r} must contain {{prompt}}")
        try:
            value.format(task="t", prompt="p")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{value!r}: only {{task}} and {{prompt}} may be filled in ({exc})") from None
        return value

    @model_validator(mode="after")
    def _sources(self) -> "DataConfig":
        if self.dataset_info is None and self.datasets:
            raise ValueError("datasets: names datasets of a dataset_info file; set data.dataset_info")
        if self.dataset_info is not None:
            if self.train is not None:
                raise ValueError("train: set either data.train or data.dataset_info with data.datasets, not both")
            if not self.datasets:
                raise ValueError("datasets: name the datasets of data.dataset_info to train on")
        elif self.train is None:
            raise ValueError("train: missing (a file, a list of sources, or data.dataset_info with data.datasets)")
        if isinstance(self.train, list):
            if not self.train:
                raise ValueError("train: an empty list of sources")
            if not any(source.weight for source in self.train):
                raise ValueError("train: every source has weight 0")
        n_sources = len(self.train) if isinstance(self.train, list) else len(self.datasets) or 1
        if self.mix == "interleave" and n_sources < 2:
            raise ValueError("mix: interleave needs at least two sources; use concat for one")
        if self.filter.max_tokens is not None and self.filter.max_tokens > self.cutoff_len:
            raise ValueError(f"data.filter.max_tokens={self.filter.max_tokens} is above "
                             f"data.cutoff_len={self.cutoff_len}; samples are truncated at cutoff_len, so none "
                             "would be longer")
        return self


def map_data_paths(raw_data: dict, change) -> dict:
    """A raw `data:` block with every file path in it (sources, validation, eval sets,
    dataset_info) replaced by change(key path, path): for trials and jobs that run in another
    working directory, and for checks that the files exist."""
    data = copy.deepcopy(raw_data)
    for key in ("val", "dataset_info"):
        if isinstance(data.get(key), str):
            data[key] = change(key, data[key])
    if isinstance(data.get("train"), str):
        data["train"] = change("train", data["train"])
    elif isinstance(data.get("train"), list):
        for i, source in enumerate(data["train"]):
            if isinstance(source, dict):
                for key in ("path", "val"):
                    if isinstance(source.get(key), str):
                        source[key] = change(f"train.{i}.{key}", source[key])
    if isinstance(data.get("eval_sets"), dict):
        data["eval_sets"] = {name: change(f"eval_sets.{name}", path) if isinstance(path, str) else path
                             for name, path in data["eval_sets"].items()}
    return data


class EWCConfig(Strict):
    """Elastic Weight Consolidation (train.ewc): a quadratic pull of each trainable parameter toward
    its value before training, weighted by its diagonal Fisher on a general set."""

    weight: float = Field(..., gt=0)  # lambda: the penalty is weight/2 * sum_i F_i (theta_i - theta*_i)^2
    samples: int = Field(64, gt=0)  # rows of the set whose squared gradients estimate the Fisher
    set: str  # the name of one of data.eval_sets


class TrainConfig(Strict):
    max_steps: Optional[int] = Field(None, gt=0)
    epochs: float = Field(1, gt=0)
    micro_batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2.0e-4, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    optimizer: Literal["adamw", "paged_adamw_8bit"] = "adamw"
    # auto: bf16 where the hardware has native bf16 math (GPUs since Ampere, CPUs with
    # AVX512-BF16/AMX), else fp32. On a CPU without it, bf16 is emulated and ~100x slower.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # auto: rayft's attention over packed rows (one causal attention per sample, no mask; see
    # train/attention.py) where it matches the model's own, else sdpa. sdpa/eager: transformers'.
    attention: Literal["auto", "packed", "sdpa", "eager"] = "auto"
    # Recompute each decoder layer's activations in the backward pass instead of keeping them:
    # activation memory falls from all layers' to about one layer's, for ~1/3 more compute.
    # auto: on only where `rayft estimate` predicts the run does not fit its device without it and
    # fits with it (decided before the workers start; stays off for a method that refuses it)
    gradient_checkpointing: Union[bool, Literal["auto"]] = False
    # torch.compile each decoder layer (models/loading.py): a faster step once compiled, the first
    # step slower by the compilation (~13 s warm, ~30 s cold per worker on this project's CPUs). Not under ZeRO-3.
    compile: bool = False
    logging_steps: int = Field(5, gt=0)
    eval_steps: int = Field(50, gt=0)
    save_steps: int = Field(50, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    seed: int = 42
    ewc: Optional[EWCConfig] = None


class DistributedConfig(Strict):
    num_workers: int = Field(2, gt=0)
    use_gpu: Union[bool, Literal["auto"]] = "auto"
    cpus_per_worker: float = Field(1, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    # ZeRO-3 keeps parameters smaller than this whole on every rank (DeepSpeed's
    # stage3_param_persistence_threshold): fewer gathers for small tensors, a little more memory
    zero3_persistence_threshold: int = Field(100_000, ge=0)
    max_failures: int = Field(2, ge=0)
    # how long a (re)start may wait for the workers' resources, e.g. for a lost node to come back or
    # an autoscaler to add one, before the run fails: a job never waits forever
    start_timeout_s: float = Field(600, gt=0)
    # how Ray places the workers: PACK fills a node first; SPREAD puts them on different nodes
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # None: RAY_ADDRESS if set, else a local Ray instance started for this run
    ray_address: Optional[str] = None
    # None: <output_dir>/ray (use shared storage, e.g. s3:// or an NFS path, on a cluster)
    storage_path: Optional[str] = None


class TrackingConfig(Strict):
    mlflow_uri: Optional[str] = None  # None: sqlite file mlflow.db in the working directory
    experiment: str = "rayft"


class TrainJobConfig(Strict):
    """A training job. `stage` names the objective (rayft/objectives/), whose own options are the
    top-level block of the same name (`stage: dpo` with `dpo: {...}`); a block of another stage is
    an error, as is any other unknown key."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    output_dir: str
    stage: str = "sft"
    model: ModelConfig = ModelConfig()
    method: MethodConfig = Field(default_factory=MethodConfig)  # built lazily: it asks the method registry
    data: DataConfig
    train: TrainConfig = TrainConfig()
    distributed: DistributedConfig = DistributedConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _own_stage_block_only(cls, raw: Any) -> Any:
        from rayft.objectives import get_objective, stage_names

        if not isinstance(raw, dict):
            return raw
        stage = raw.get("stage", "sft")
        if stage not in stage_names():
            raise ValueError(f"stage: unknown stage {stage!r}; allowed: {', '.join(stage_names())}")
        return own_block_only(raw, stage, stage_names(), get_objective(stage).block_schema(), tuple(cls.model_fields),
                              "", "stage")

    @property
    def stage_options(self) -> Strict:
        """The block of the chosen stage (e.g. `dpo:`)."""
        return getattr(self, self.stage)

    @model_validator(mode="after")
    def _combinations(self) -> "TrainJobConfig":
        from rayft.methods import get_method
        from rayft.objectives import get_objective

        method = get_method(self.method.type)
        get_objective(self.stage).check_job(self.stage_options, self)  # the method, the reference, the data
        if self.train.attention == "packed" and not method.packs:
            raise ValueError(f"train.attention=packed: method.type={self.method.type} keeps one sample per row "
                             "(its extra tokens are per row); use auto or sdpa")
        if self.train.gradient_checkpointing is True and method.checkpointing_refusal:
            raise ValueError(f"train.gradient_checkpointing: method.type={self.method.type} cannot run with it "
                             f"({method.checkpointing_refusal})")
        method.check_job(self.method.options, self)  # ZeRO stage, offload, precision
        if self.train.compile:
            if self.distributed.zero_stage == 3:
                raise ValueError("train.compile: not with distributed.zero_stage=3 (its hooks gather each layer's "
                                 "parameters inside the forward, which a compiled layer would trace)")
            if method.compile_refusal:
                raise ValueError(f"train.compile: method.type={self.method.type} cannot run with it "
                                 f"({method.compile_refusal})")
        ewc = self.train.ewc
        if ewc and ewc.set not in self.data.eval_sets:
            raise ValueError(f"train.ewc.set: {ewc.set!r} is not one of data.eval_sets "
                             f"({', '.join(self.data.eval_sets) or 'none set'})")
        if self.distributed.offload_params and self.distributed.zero_stage != 3:
            raise ValueError("distributed.offload_params needs distributed.zero_stage=3")
        if self.distributed.offload_optimizer and self.distributed.zero_stage == 0:
            raise ValueError("distributed.offload_optimizer needs distributed.zero_stage >= 1")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------- sweeps
class SchedulerConfig(Strict):
    type: Literal["asha", "none"] = "asha"
    # in optimizer steps; None: the base config's train.eval_steps (the first evaluation)
    grace_period: Optional[int] = Field(None, gt=0)
    reduction_factor: float = Field(2, gt=1)


class SearchConfig(Strict):
    # key path of the training config -> distribution: {choice: [...]}, {uniform: [lo, hi]},
    # {loguniform: [lo, hi]}, {randint: [lo, hi]} (inclusive), {ratio_of: key, factor: x}
    space: dict[str, Any]
    algorithm: Literal["grid", "random", "optuna"] = "random"
    # grid: each key's values in a seeded random order (train.seed), not as listed. Early stopping
    # compares a trial with those before it: in a listed order such as ascending learning rates
    # every trial beats its predecessors and ASHA can stop none.
    shuffle_grid: bool = True
    # grid: how many times the whole grid runs (default 1); random/optuna: trials, required
    num_samples: Optional[int] = Field(None, gt=0)
    # None: as many as the cluster's CPUs/GPUs hold
    max_concurrent_trials: Optional[int] = Field(None, gt=0)
    scheduler: SchedulerConfig = SchedulerConfig()
    # an evaluation metric the base config's stage reports (sft: eval_loss, eval_ppl; dpo also
    # eval_pref_accuracy, eval_rewards/margins, ...); checked against the stage when the sweep is read
    metric: str = Field("eval_loss", pattern=r"^eval_[A-Za-z0-9_/]+$")
    mode: Literal["min", "max"] = "min"

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_shorthand(cls, value: Any) -> Any:
        return {"type": "none"} if value in (None, "none") else value


class SweepConfig(Strict):
    # a training config file (relative to the working directory, else to the sweep file), or
    # the training config inline
    base: Union[str, dict[str, Any]]
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}$")
    output_dir: str
    search: SearchConfig


# ---------------------------------------------------------------- serving
class ServeBaseModel(Strict):
    name_or_path: str = DEFAULT_BASE_MODEL
    load_in_4bit: bool = False  # NF4 base weights through bitsandbytes (adapters stay full precision)


class ServeLimits(Strict):
    max_prompt_tokens: int = Field(2048, gt=0)
    max_new_tokens: int = Field(512, gt=0)
    max_concurrent_requests: int = Field(64, gt=0)  # per ingress replica; beyond it: 429
    max_body_bytes: int = Field(1_000_000, gt=0)
    max_lora_rank: int = Field(64, gt=0, le=1024)
    max_adapter_bytes: int = Field(256 * 2**20, gt=0)


class AuthConfig(Strict):
    # None: no keys, every caller is tenant "default" with admin rights (loopback hosts only)
    keys_file: Optional[str] = None


class AutoscalingConfig(Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, gt=0)
    target_ongoing_requests: float = Field(16, gt=0)


class ServeConfig(Strict):
    base_model: ServeBaseModel = ServeBaseModel()
    registry: str = "adapters"  # published adapters: <registry>/<tenant>/<name>/versions/<n>/
    adapters: list[str] = []  # "tenant/name" (or "name" of tenant default/shared) loaded at start
    max_resident_adapters: int = Field(32, gt=0)  # per replica; least recently used are evicted
    max_batch_size: int = Field(16, gt=0)
    batch_wait_ms: float = Field(10, ge=0)
    limits: ServeLimits = ServeLimits()
    auth: AuthConfig = AuthConfig()
    replicas: Union[int, AutoscalingConfig] = 1
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    cpus_per_replica: float = Field(1, gt=0)
    gpus_per_replica: float = Field(0, ge=0)
    # where POST /v1/adapters fetches runs:/ and models:/ sources (None: MLFLOW_TRACKING_URI or ./mlflow.db)
    mlflow_uri: Optional[str] = None
    log_dir: str = "logs"  # rayft serve's own log (serve.log); each replica's is in Ray's session folder

    @field_validator("base_model", mode="before")
    @classmethod
    def _base_model_shorthand(cls, value: Any) -> Any:
        return {"name_or_path": value} if isinstance(value, str) else value

    @field_validator("replicas")
    @classmethod
    def _positive_replicas(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1 (or an autoscaling block)")
        return value

    @model_validator(mode="after")
    def _open_only_on_loopback(self) -> "ServeConfig":
        if self.auth.keys_file is None and self.host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"host {self.host} is reachable from other machines: set auth.keys_file")
        return self


SWEEP_KEYS = ("name", "output_dir", "search")


def split_sweep_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """--set for a sweep: name, output_dir and search.* change the sweep; base.* and every other
    key change the base training config."""
    sweep_overrides, base_overrides = [], []
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.split(".")[0] in SWEEP_KEYS:
            sweep_overrides.append(item)
        else:
            base_overrides.append(item.removeprefix("base."))
    return sweep_overrides, base_overrides


def parse_sweep(raw: Any, source: str) -> SweepConfig:
    return _validate(SweepConfig, raw, source)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides (values parsed as YAML) to a raw config dict."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key_path, _, text = item.partition("=")
        keys = key_path.strip().split(".")
        if not all(keys):
            raise ConfigError(f"--set {item!r}: empty key in {key_path!r}")
        node = raw
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {key!r} is not a section")
            node = child
        node[keys[-1]] = load_yaml(text) if text.strip() else None
    return raw


def _error_key(error: dict[str, Any]) -> str:
    return ".".join(str(part) for part in error["loc"] if part not in (ONE_FILE, SOURCES))


def _describe_error(error: dict[str, Any], source: str) -> str:
    where = _error_key(error) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error" and isinstance(error.get("input"), dict):
        return f"{source}: {message}"  # a check over a whole section: its message names the keys
    if error["type"] == "extra_forbidden":
        return f"{source}: unknown key {where}"
    if error["type"] == "missing":
        return f"{source}: missing required key {where}"
    return f"{source}: {where}={error.get('input')!r}: {message}"


def _validate(schema: type[Strict], raw: Any, source: str):
    """Validate a raw mapping against a schema; the first error as one line naming key and value."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level")
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(_describe_error(first, source), key=_error_key(first) or None) from None


def parse_config(raw: Any, source: str = "config") -> TrainJobConfig:
    return _validate(TrainJobConfig, raw, source)


def parse_serve(raw: Any, source: str = "serve config") -> "ServeConfig":
    return _validate(ServeConfig, raw, source)


def load_serve_config(path: str | Path, overrides: list[str] | None = None) -> "ServeConfig":
    return parse_serve(apply_overrides(read_yaml(path), overrides or []), source=str(path))


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainJobConfig:
    """Read a YAML config, apply --set overrides and validate it. Relative data paths stay
    relative to the working directory, as the user typed them."""
    raw = apply_overrides(read_yaml(path), overrides or [])
    return parse_config(raw, source=str(path))


def dump_config(config: TrainJobConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the resolved config as MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat
