"""`rayft estimate`: per-device memory and time of a training config, before anything is loaded.

The model is built on the meta device from its config (fp32, as models/loading.py loads it for
training) and the method applied to it by the method's own apply(), so the parameter counts are
exact. The rest follows what rayft's step does on each rank (train/loop.py), term by term:

- weights as stored (fp32; a quantising method's bytes per weight; halves under fp16; frozen
  linear weights in the compute dtype where the method stores them so), sharded by ZeRO-3 above
  its persistence threshold, plus the parameters ZeRO-3 holds gathered;
- gradients (trainable parameters only, fp32), optimizer states (AdamW: two fp32 moments;
  paged AdamW 8-bit: two bytes plus block scales) and DeepSpeed's fp32 master copy (ZeRO 1-3),
  each sharded as the ZeRO stage shards it, and DeepSpeed's gradient buckets at the sizes of
  rayft's DeepSpeed config (deepspeed's own defaults for what it leaves out); under ZeRO-3
  DeepSpeed's memory-efficient linear, which keeps no compute-dtype weight copies;
- activations kept for the backward pass, per decoder layer: the residual stream, each matmul's
  input where a weight or adapter needs it (under bf16 autocast every linear casts its fp32 input
  anew), the compute-dtype copy of each weight the backward needs, the attention (rayft's packed
  attention on CPU materialises the scores of small buckets, the fused kernels keep only their
  inputs and output), the gated MLP, and what the method's own modules keep (the method says:
  methods/base.py layer_activations); with checkpointing each layer's input, plus one layer
  recomputed;
- the output head and loss: rayft's fused head (train/head_loss.py) holds a chunk of logits at a
  time (and the whole logits gradient when the head's weight trains); the plain path holds the
  learned positions' logits in the compute dtype, in fp32 and their log-softmax;
- temporaries of the backward pass and of the optimizer step.

The peak is the largest of four moments of a step: the end of the forward pass, the start and
the end of the backward pass, and the optimizer step. The batch is the worst case: micro_batch_size rows of cutoff_len
tokens (a preference pair's two sequences per row under stage dpo), one sample per row, every
token learned. The framework's own memory (CUDA context, libraries) is a stated overhead on top.

Time: the matmul FLOPs of a step (per token: forward 2 per weight; backward 2 per weight for the
input's gradient wherever one flows, 2 more where the weight trains: ~6x parameters for full
fine-tuning, ~4x for an adapter over frozen weights), over a measured or given matmul peak times
a stated utilisation.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from rayft.config import TrainJobConfig
from rayft.errors import ConfigError, RayftError

GiB = 1 << 30
COMPUTE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Linear layers that write a sublayer's output (their input is a compute-dtype activation); every
# other linear of a decoder layer reads a normalisation's fp32 output.
OUTPUT_PROJECTIONS = frozenset({"o_proj", "down_proj", "dense", "out_proj", "c_proj", "fc2", "w2", "wo",
                                "dense_4h_to_h"})
NORM_SUFFIXES = ("RMSNorm", "LayerNorm")
# What the framework needs besides the tensors: the CUDA context, cuBLAS/NCCL workspaces and the
# caching allocator's slack on a GPU; on CPU a worker process's interpreter and libraries (604 MiB
# resident after a worker's imports, measured here) with Ray's runtime and the allocator's slack.
OVERHEAD = {"cuda": (1.0 * GiB, 0.05), "cpu": (1.0 * GiB, 0.0)}  # (fixed bytes, fraction of the tensor peak)
# The full fine-tuning rule of thumb the issue quotes: fp16 weights 2 + fp32 gradients 4 + Adam 8 +
# activations ~2 + framework ~1.5 bytes per parameter.
RULE_OF_THUMB_BYTES_PER_PARAM = 17.5
DEFAULT_UTILISATION = 0.4  # rayft's measured CPU MFU: 0.40 in bf16, 0.66 in fp32 (README, Benchmark)


# ---------------------------------------------------------------- the device
@dataclass(frozen=True)
class Device:
    kind: str  # "cuda" or "cpu"
    total_bytes: int

    def __str__(self) -> str:
        return f"{self.kind}:{self.total_bytes / GiB:.3g}GB"


_DEVICE = re.compile(r"^(cuda|gpu|cpu):([0-9]+(?:\.[0-9]+)?)(t|g|m)(?:i?b)?$", re.IGNORECASE)
_UNITS = {"t": 1 << 40, "g": GiB, "m": 1 << 20}


def parse_device(text: str) -> Device:
    """"cuda:80GB" / "cpu:24GB" (GB, GiB or G: 2^30 bytes; also MB and TB) -> Device."""
    match = _DEVICE.match(text.strip().replace(" ", ""))
    if not match or float(match.group(2)) <= 0:
        raise RayftError(f"--device {text!r}: expected cuda:<memory> or cpu:<memory>, e.g. cuda:80GB or cpu:24GB")
    kind = "cpu" if match.group(1).lower() == "cpu" else "cuda"
    return Device(kind, int(float(match.group(2)) * _UNITS[match.group(3).lower()]))


def local_device(num_workers: int) -> Device:
    """This machine: its first GPU, else its memory shared by `num_workers` worker processes."""
    if torch.cuda.is_available():
        return Device("cuda", torch.cuda.get_device_properties(0).total_memory)
    import psutil

    return Device("cpu", psutil.virtual_memory().total // num_workers)


# ---------------------------------------------------------------- the model on the meta device
@dataclass
class LayerFacts:
    module: torch.nn.Module
    linears: dict[str, tuple[int, int, bool]]  # short name -> (in, out, weight trains), the base's own
    attention_side: set[str]  # linears of the attention sublayer
    trainable: int  # elements, the method's included
    adapter_trainable: int  # trainable elements that are not a base linear's weight
    norm_trains: bool


@dataclass
class ModelFacts:
    config: object
    model: torch.nn.Module
    layers: list[LayerFacts]
    params: list[tuple[int, bool, bool]]  # per parameter: (elements, trains, a base linear weight in a layer)
    total_params: int
    trainable_params: int
    base_params: int
    upstream_trains: bool  # something before the first layer trains (embeddings, virtual tokens)
    head_trains: bool
    final_norm_trains: bool
    checkpoint_bytes: int = 0  # the model directory's safetensors files
    checkpoint_dtype: str = ""  # as its config states it ("float32", "bfloat16", ...)


def _decoder_layers(model, count: int) -> torch.nn.ModuleList:
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise ConfigError(f"cannot find the {count} decoder layers of {type(model).__name__}")


def _is_norm(module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith(NORM_SUFFIXES)


def model_facts(cfg: TrainJobConfig, model_dir: str | Path, precision: str, total_steps: int = 10) -> ModelFacts:
    """The model as `cfg`'s method leaves it, on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rayft.methods import Run, get_method

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    layers = _decoder_layers(model, config.num_hidden_layers)
    base_linears = {}  # id(weight) -> (layer index, short name, in, out)
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                base_linears[id(module.weight)] = (index, name.rsplit(".", 1)[-1], module.in_features,
                                                   module.out_features, "attn" in name)
    base_params = sum(p.numel() for p in model.parameters())
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    final_norm = [p for name, m in model.named_modules() if _is_norm(m) and ".layers." not in name
                  for p in m.parameters(recurse=False)]
    # a copy: the registered method keeps per-run state (e.g. PiSSA's initial factors)
    method = copy.copy(get_method(cfg.method.type))
    try:
        with torch.device("meta"):
            model = method.apply(cfg.method.options, model, Run(total_steps=total_steps, precision=precision,
                                                                 zero_stage=cfg.distributed.zero_stage))
    except (NotImplementedError, RuntimeError) as exc:
        raise RayftError(f"method.type={cfg.method.type}: cannot be applied on the meta device to estimate "
                         f"({type(exc).__name__}: {exc})") from None
    layers = _decoder_layers(model, config.num_hidden_layers)
    layer_facts = []
    for index, layer in enumerate(layers):
        linears, attention_side, trainable, adapters, norm_trains = {}, set(), 0, 0, False
        for module in layer.modules():
            for param in module.parameters(recurse=False):
                known = base_linears.get(id(param))
                if known is not None:
                    linears[known[1]] = (known[2], known[3], param.requires_grad)
                    if known[4]:
                        attention_side.add(known[1])
                if param.requires_grad:
                    trainable += param.numel()
                    adapters += 0 if known else param.numel()
                    norm_trains |= _is_norm(module)
        layer_facts.append(LayerFacts(layer, linears, attention_side, trainable, adapters, norm_trains))
    params, seen, upstream = [], set(), False
    layer_params = {id(p) for layer in layers for p in layer.parameters()}
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        params.append((param.numel(), param.requires_grad, id(param) in base_linears))
        # a trainable parameter outside the layers feeds them, unless it is the final norm or an untied head
        feeds_layers = not any(param is p for p in final_norm) and (param is embedding or param is not head)
        upstream |= param.requires_grad and id(param) not in layer_params and feeds_layers
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return ModelFacts(config=config, model=model, layers=layer_facts, params=params,
                      total_params=sum(n for n, _, _ in params), trainable_params=sum(n for n, t, _ in params if t),
                      base_params=base_params, upstream_trains=upstream, head_trains=head.requires_grad,
                      final_norm_trains=any(p.requires_grad for p in final_norm),
                      checkpoint_bytes=sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")),
                      checkpoint_dtype=str(dtype or "").replace("torch.", ""))


# ---------------------------------------------------------------- the estimate
PHASES = ("loading", "forward", "backward start", "backward end", "step")


@dataclass
class Term:
    name: str
    bytes: dict[str, float]  # at each of PHASES
    note: str = ""


@dataclass
class Estimate:
    device: Device
    terms: list[Term]
    phase: str  # the moment of the step with the peak: one of PHASES
    peak_bytes: float  # tensor bytes at the peak
    overhead_bytes: float
    total_params: int
    trainable_params: int
    base_params: int
    precision: str
    checkpointing: bool
    flops_per_step: float
    peak_flops: Optional[float] = None
    utilisation: float = DEFAULT_UTILISATION
    total_steps: Optional[int] = None
    host_bytes: float = 0.0  # what ZeRO offload keeps in host memory instead
    advice: list[tuple[str, float, bool]] = field(default_factory=list)  # (change, its peak + overhead, fits)

    @property
    def needed_bytes(self) -> float:
        return self.peak_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.device.total_bytes

    @property
    def rule_of_thumb_bytes(self) -> float:
        return RULE_OF_THUMB_BYTES_PER_PARAM * self.base_params

    @property
    def seconds_per_step(self) -> Optional[float]:
        if not self.peak_flops:
            return None
        return self.flops_per_step / (self.peak_flops * self.utilisation)

    @property
    def wall_seconds(self) -> Optional[float]:
        if self.seconds_per_step is None or self.total_steps is None:
            return None
        return self.seconds_per_step * self.total_steps


def resolved_precision(cfg: TrainJobConfig, device: Device) -> str:
    """What train.precision becomes on the worker (train/loop.py resolve_precision)."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    if device.kind == "cuda":
        return "bf16"  # GPUs since Ampere; an older GPU would run fp32
    from rayft.train.loop import native_bf16

    return "bf16" if native_bf16(torch.device("cpu")) else "fp32"


def zero_settings(cfg: TrainJobConfig, on_gpu: bool):
    """DeepSpeed's ZeRO settings for this run: rayft's config, DeepSpeed's defaults for the rest."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from rayft.train.deepspeed_config import deepspeed_config

    return DeepSpeedZeroConfig(**deepspeed_config(cfg, cfg.distributed.num_workers, on_gpu)["zero_optimization"])


class _Step:
    """The memory of one rank's step for one config: the pieces the phases add up."""

    def __init__(self, cfg: TrainJobConfig, facts: ModelFacts, device: Device, checkpointing: bool):
        from rayft.methods import Run, get_method
        from rayft.objectives import get_objective

        self.cfg, self.facts, self.device = cfg, facts, device
        self.precision = resolved_precision(cfg, device)
        self.c = COMPUTE_BYTES[self.precision]
        self.method, self.opts = get_method(cfg.method.type), cfg.method.options
        self.objective = get_objective(cfg.stage)
        self.checkpointing = checkpointing
        self.world = cfg.distributed.num_workers
        self.stage = cfg.distributed.zero_stage
        self.zero = zero_settings(cfg, device.kind == "cuda")
        config = facts.config
        self.hidden, self.vocab = config.hidden_size, config.vocab_size
        self.heads = config.num_attention_heads
        self.intermediate = getattr(config, "intermediate_size", 4 * self.hidden)
        # DeepSpeed's fp16 mode halves every weight; otherwise they stay fp32 (bf16 runs under autocast)
        self.weight_bytes = 2 if self.precision == "fp16" else 4
        self.quantized = self.method.quantized_weight_bytes(self.opts)
        # frozen base linear weights the method keeps in the compute dtype (no autocast copies)
        stored = self.method.frozen_linear_dtype(self.opts, Run(precision=self.precision, zero_stage=self.stage))
        self.frozen_linear_bytes = stored.itemsize if stored is not None and not self.quantized else None
        self.rows = cfg.train.micro_batch_size
        self.sequences = self.objective.sequences_per_row
        self.sequence_len = cfg.data.cutoff_len + self.method.virtual_tokens(self.opts)
        self.tokens = self.rows * self.sequences * self.sequence_len
        # positions whose next token is learned: all but each row's last (the worst case)
        self.learned = self.rows * (self.sequences * cfg.data.cutoff_len - 1)
        self.recorded = self._recorded_layers()

    # ---- parameters
    def _recorded_layers(self) -> list[LayerFacts]:
        """Layers whose forward autograd records: from the first one with something trainable in or
        before it."""
        layers = self.facts.layers
        if self.facts.upstream_trains:
            return layers
        first = next((i for i, layer in enumerate(layers) if layer.trainable), len(layers))
        return layers[first:]

    def param_bytes(self, numel: int, base_linear: bool, trains: bool = False) -> float:
        if base_linear and self.quantized:
            return numel * self.quantized
        if base_linear and not trains and self.frozen_linear_bytes:
            return numel * self.frozen_linear_bytes
        return numel * self.weight_bytes

    def sharded(self, numel: int) -> bool:
        return self.stage == 3 and numel > self.zero.param_persistence_threshold

    def weights(self) -> float:
        """This rank's share of the weights as stored (ZeRO-3: a 1/world shard of each big one)."""
        total = 0.0
        for numel, trains, base_linear in self.facts.params:
            size = self.param_bytes(numel, base_linear, trains)
            total += size / self.world if self.sharded(numel) else size
        return total

    def gathered(self) -> float:
        """ZeRO-3's gathered parameters: at steady state DeepSpeed keeps a gathered parameter
        until its next use if that comes within max_reuse_distance elements of the trace; a
        layer's forward and backward uses are about twice the elements of the layers after it
        apart, so the last max_reuse_distance / 2 elements stay gathered at the turn."""
        if self.stage != 3 or self.world == 1:
            return 0.0  # at world size 1 a shard is the whole parameter: nothing to gather
        sharded = [(n, base, trains) for n, trains, base in self.facts.params if self.sharded(n)]
        elements = sum(n for n, _, _ in sharded)
        if not elements:
            return 0.0
        kept = min(elements, self.zero.max_reuse_distance / 2 + max(n for n, _, _ in sharded))
        return kept * sum(self.param_bytes(n, b, t) for n, b, t in sharded) / elements

    def trainable(self) -> int:
        return self.facts.trainable_params

    def optimizer_states(self) -> float:
        """AdamW's two fp32 moments, or bitsandbytes' 8-bit ones (one byte each, an fp32 scale per
        block of 256); bitsandbytes keeps 32-bit states for tensors under 4096 elements, and under
        ZeRO 1-3 the optimizer sees one flat partition."""
        if self.cfg.train.optimizer == "adamw":
            per = lambda n: 8.0 * n  # noqa: E731
        else:
            per = lambda n: (2 + 8 / 256) * n if n >= 4096 else 8.0 * n  # noqa: E731
        if self.stage >= 1:
            return per(self.trainable() / self.world)
        return sum(per(n) for n, trains, _ in self.facts.params if trains)

    def master(self) -> float:
        """ZeRO 1-3 keep an fp32 copy of this rank's partition of the trainable weights (even when
        the weights are fp32); at stage 0 only fp16's optimizer keeps one (of every trainable weight)."""
        if self.stage == 0:
            return 4.0 * self.trainable() if self.weight_bytes == 2 else 0.0
        return 4.0 * self.trainable() / self.world

    def gradients_backward(self) -> float:
        """Gradients held by the end of the backward pass: whole fp32 gradients (ZeRO 0-1), or
        this rank's partition of them (ZeRO-2; ZeRO-3's flat buffer is a DeepSpeed buffer)."""
        if self.stage <= 1:
            return float(self.weight_bytes * self.trainable())  # the weights' dtype (fp16 under fp16)
        if self.stage == 2 and not self.offloads_optimizer():
            return 4.0 * self.trainable() / self.world
        return 0.0  # ZeRO-2 offload: the partition's gradients are in host memory

    def offloads_optimizer(self) -> bool:
        return self.device.kind == "cuda" and self.cfg.distributed.offload_optimizer

    def buckets(self) -> tuple[float, float]:
        """DeepSpeed's gradient buffers: (held throughout, held during the backward pass). ZeRO-3
        allocates its reduce bucket and its flat gradient partition once; ZeRO-1/2 allocate the
        reduce bucket (twice with overlap_comm) for each backward pass; ZeRO-0 flattens the
        gradients (up to 5e8 elements at a time) for the all-reduce at the end of it."""
        grad_bytes = 4.0
        if self.stage == 3:  # with offload the flat partition is in host memory
            flat = 0.0 if self.offloads_optimizer() else 4.0 * self.trainable() / self.world
            return self.zero.reduce_bucket_size * grad_bytes + flat, 0.0
        if self.stage in (1, 2):
            copies = 2 if self.zero.overlap_comm else 1
            return 0.0, copies * self.zero.reduce_bucket_size * grad_bytes
        from deepspeed.runtime.engine import MEMORY_OPT_ALLREDUCE_SIZE

        return 0.0, grad_bytes * min(self.trainable(), MEMORY_OPT_ALLREDUCE_SIZE)

    def step_temporaries(self) -> float:
        """The optimizer step's own memory. ZeRO 1-3 step one flat fp32 partition (ZeRO-3 per
        sub-group, flattening its gradients into a copy first), ZeRO-0 each parameter; torch's
        AdamW on CPU (single-tensor) holds sqrt(v) and its quotient at once, the size of what it
        steps; on a GPU rayft's AdamW is fused and bitsandbytes' works in blocks."""
        if self.stage >= 1:
            stepped = self.trainable() / self.world
            if self.stage == 3:
                stepped = min(stepped, self.zero.sub_group_size)
        else:
            stepped = max((n for n, trains, _ in self.facts.params if trains), default=0)
        adam_copies = 2 if self.cfg.train.optimizer == "adamw" and self.device.kind == "cpu" else 0
        if self.offloads_optimizer():
            return 0.0  # the step runs in host memory
        return 4.0 * stepped * (adam_copies + (self.stage == 3))

    def offloaded(self) -> float:
        """What ZeRO offload moves to host memory (a GPU device only: on CPU it is the same memory)."""
        if self.device.kind != "cuda":
            return 0.0
        moved = 0.0
        if self.cfg.distributed.offload_optimizer:
            moved += self.optimizer_states() + self.master() + 4.0 * self.trainable() / self.world  # + gradients
        if self.cfg.distributed.offload_params:
            moved += self.weights()
        return moved

    # ---- activations
    def zero3_linear(self) -> bool:
        """ZeRO-3 replaces torch.nn.functional.linear process-wide (DeepSpeed's memory-efficient
        linear): it keeps each linear's input as given and the weight itself, no compute-dtype copy."""
        return self.stage == 3 and self.zero.memory_efficient_linear

    def casts_weights(self) -> bool:
        """Does autocast make compute-dtype copies of the (unquantised) weights?"""
        return not self.quantized and self.c != self.weight_bytes

    def layer_kept(self, layer: LayerFacts) -> float:
        """Bytes one recorded decoder layer keeps for the backward pass."""
        t, h, c, f = self.tokens, self.hidden, self.c, self.intermediate
        residual = self.weight_bytes  # the residual stream has the weights' dtype
        method_bytes, reads = self.method.layer_activations(self.opts, layer.module, t, c)
        kept = method_bytes + 2 * t * h * residual  # each normalisation keeps its input: the residual sum
        if layer.norm_trains:
            kept += 2 * t * h * 4  # and its normalised input (fp32), for its weight's gradient
        readers = [name for name, (_, _, trains) in layer.linears.items()
                   if name not in OUTPUT_PROJECTIONS and (trains or name in reads)]
        if c != residual and not self.zero3_linear():  # autocast casts the input anew for each linear
            kept += len(readers) * t * h * c
        else:  # the linears keep each normalisation's output itself
            kept += len({name in layer.attention_side for name in readers}) * t * h * residual
        if self.casts_weights() and not self.zero3_linear():
            # each weight's compute-dtype copy, for the input's gradient (a trainable one is also
            # cached); none of a frozen weight stored in the compute dtype
            kept += c * sum(i * o for i, o, trains in layer.linears.values() if trains or not self.frozen_linear_bytes)
        kept += self.attention_kept()
        down_reads = any(name in OUTPUT_PROJECTIONS and name not in layer.attention_side and (trains or name in reads)
                         for name, (_, _, trains) in layer.linears.items())
        # gated MLP: gate and up outputs, the activation, and their product where down needs it;
        # bitsandbytes' 4-bit linear returns its input's dtype (the normalisation's), not autocast's,
        # so behind it the first three are in the residual's dtype and down reads a cast product
        kept += 3 * t * f * (residual if self.quantized else c) + down_reads * t * f * c
        return kept

    def attention_kept(self) -> float:
        """The attention's kept tensors: queries, keys and values (expanded to every head but in
        rayft's packed paths: on the CPU, and the varlen kernel on a GPU in half precision), its
        output, and the scores where the kernel materialises them."""
        from rayft.train import attention as packed

        t, h, c = self.tokens, self.hidden, self.c
        segments = self.rows * self.sequences
        length = self.sequence_len + self._kv_prefix()
        scores = segments * self.heads * self.sequence_len * length
        kind = self.attention_kind()
        kv_share = getattr(self.facts.config, "num_key_value_heads", None) or self.heads
        if kind == "packed" and self.device.kind == "cpu" and scores <= packed._MATH_MAX_SCORES:
            # queries and output, keys and values once per key-value head (a group's query heads
            # share them in one product), the fp32 softmax and its compute-dtype copy
            return (2 + 2 * kv_share / self.heads) * t * h * c + scores * (4 + c)
        config = self.facts.config
        head_dim = getattr(config, "head_dim", None) or self.hidden // self.heads
        if (kind == "packed" and self.device.kind == "cuda" and c == 2 and head_dim <= packed.FLASH_VARLEN_MAX_HEAD_DIM
                and not getattr(config, "attention_dropout", 0.0)):
            # the flash kernel's varlen attention (train/attention.py says where it runs): queries,
            # output, keys and values unexpanded, and its log-sum-exp per row and head
            return (2 + 2 * kv_share / self.heads) * t * h * c + segments * self.heads * self.sequence_len * 4
        if kind == "eager":
            return 4 * t * h * c + scores * (4 + c) + segments * length * length * c / self.heads
        return 4 * t * h * c + segments * self.heads * self.sequence_len * 4  # fused: log-sum-exp per row

    def attention_kind(self) -> str:
        from rayft.train.attention import supports

        attention = self.cfg.train.attention
        if attention == "auto" and not self.method.packs:
            attention = "sdpa"
        if attention == "packed" or (attention == "auto" and supports(self.facts.config)):
            return "packed"
        return attention if attention != "auto" else "sdpa"

    def _kv_prefix(self) -> int:
        return self.method.extra_positions(self.opts) - self.method.virtual_tokens(self.opts)

    def activations(self) -> tuple[float, float, float]:
        """(kept by the end of the forward pass, one layer's kept set, what only the forward pass
        holds): every recorded layer's kept tensors and the embedding output, or with
        checkpointing each layer's input only; autocast's cache of the trainable weights'
        compute-dtype copies lives until the forward pass ends (without checkpointing, outside
        ZeRO-3, the layers keep those copies anyway)."""
        t, h = self.tokens, self.hidden
        per_layer = [self.layer_kept(layer) for layer in self.recorded]
        largest = max(per_layer, default=0.0)
        inputs = t * h * self.weight_bytes
        final = t * h * 4 if self.facts.final_norm_trains else 0.0
        cache = 0.0
        if self.casts_weights() and (self.checkpointing or self.zero3_linear()):
            cache = self.c * sum(i * o for layer in self.recorded for i, o, trains in layer.linears.values() if trains)
        if self.checkpointing:
            return len(self.recorded) * inputs + final, largest, cache
        return sum(per_layer) + inputs + final, largest, cache

    # ---- the output head and loss
    def fused(self) -> bool:
        from rayft.train.head_loss import HEAD_IS_LAST

        return (self.objective.fused_head and self.method.fused_head and self.precision != "fp16"
                and getattr(self.facts.config, "model_type", None) in HEAD_IS_LAST)

    def head(self) -> tuple[float, float, float]:
        """(peak while the head runs in the forward pass, what it keeps for the backward pass, the
        backward pass's extra at the head)."""
        from rayft.train.head_loss import _CHUNK_ELEMENTS

        n, h, v, c = self.learned, self.hidden, self.vocab, self.c
        trains, needs_hidden = self.facts.head_trains, bool(self.recorded) or self.facts.final_norm_trains
        if self.fused():
            rows = min(n, max(1, _CHUNK_ELEMENTS[self.device.kind] // v))
            # a chunk's fp32 logits and logsumexp's fp32 temporary; from the second chunk on, the
            # previous chunk's softmax and its compute-dtype cast are still held
            working = rows * v * (8 if rows >= n else 12 + c)
            kept = (n * h * c if needs_hidden else 0.0) + (v * h * c if trains else 0.0)
            # the learned positions' hidden states (fp32, and cast), the weight cast, the gradient
            # for the hidden states, and the whole logits gradient where the weight trains
            forward = n * h * (4 + c) + v * h * c + (n * h * c if needs_hidden else 0.0) \
                + (n * v * c if trains else 0.0) + working
            return forward, kept, n * h * 4
        # plain: the logits in the compute dtype, their fp32 copy and its log-softmax (kept)
        kept = n * v * 4 + (n * h * c if trains else v * h * c if c != self.weight_bytes else 0.0)
        forward = n * h * 4 + n * v * (c + 4) + kept
        return forward, kept, n * v * (4 + 4 + c)

    # ---- the phases
    def phases(self) -> list[Term]:
        """Each term at four moments of a step: the end of the forward pass (the output head
        running), the start of the backward pass (every activation still kept, the first
        gradients arriving), its end (every gradient, the first layer's activations) and the
        optimizer step."""
        t, h, c, f = self.tokens, self.hidden, self.c, self.intermediate
        weights, gathered = self.weights(), self.gathered()
        states, master = self.optimizer_states(), self.master()
        if self.offloaded():  # moved to host memory
            if self.cfg.distributed.offload_optimizer:
                states = master = 0.0
            if self.cfg.distributed.offload_params:
                weights = 0.0
        held, during_backward = self.buckets()
        kept, one_layer, forward_only = self.activations()
        head_forward, head_kept, head_backward = self.head()
        if self.objective.reference_forwards(self.cfg.stage_options, self.method, self.opts):
            # the reference's forward (no gradients) runs its own head beside the policy's kept one
            head_forward += head_kept
        # a frozen reference copy (train/reference.py): under ZeRO-3 a DeepSpeed engine sharded,
        # cast and offloaded (offload_params) as the policy is, so it stores what `weights` does;
        # under ZeRO 0-2 a plain module, fp32 as loaded
        copies = self.objective.frozen_model_copies(self.cfg.stage_options, self.method, self.opts)
        reference = copies * (weights if self.stage == 3 else self.weights() * 4 / self.weight_bytes)
        grads = self.gradients_backward()
        largest_trained = max((i * o for layer in self.facts.layers for i, o, trains in layer.linears.values()
                               if trains), default=0)
        # a layer's backward pass: the MLP's activation gradients, and a weight's gradient in the
        # compute dtype on its way to fp32
        layer_grads = 2 * t * f * c + 2 * t * h * 4 + largest_trained * (c + 4)
        recompute = one_layer if self.checkpointing else 0.0
        # the first gradients: the head's weight (tied or not) and the last layer's
        first_grads = 4.0 * ((self.vocab * h if self.facts.head_trains else 0) + self.facts.layers[-1].trainable)
        if self.stage >= 2:
            first_grads = min(first_grads, 4.0 * self.zero.reduce_bucket_size)  # into the bucket as they come
        zero0_copy = during_backward if self.stage == 0 else 0.0
        bucket_backward = during_backward if self.stage in (1, 2) else 0.0
        step_grads = grads if self.stage <= 2 else 0.0
        step_temporaries = self.step_temporaries()
        end_activations = max(one_layer + layer_grads, zero0_copy)  # the all-reduce copy comes after the last layer

        def term(name, forward, start, end, step, note="", loading=0.0):
            return Term(name, {"loading": loading, "forward": forward, "backward start": start, "backward end": end,
                               "step": step}, note)

        loading = self.loading()
        return [
            term("checkpoint, loading", 0.0, 0.0, 0.0, 0.0, "CPU: the file mapped + the weights built beside it"
                 if loading else "", loading=loading),
            term("weights", weights, weights, weights, weights, self._weights_note()),
            term("ZeRO-3 gathered weights", gathered, gathered, gathered, 0.0, "steady state"),
            term("reference model", reference, reference, reference, reference,
                 "frozen copy" + (f", sharded / {self.world}" if self.stage == 3 else ", fp32") if reference else ""),
            term("gradients (fp32)", 0.0, first_grads, grads, step_grads,
                 "trainable only" + (f", sharded / {self.world}" if self.stage >= 2 else "")),
            term("optimizer states", states, states, states, states, self._optimizer_note()),
            term("fp32 master weights", master, master, master, master, "ZeRO 1-3" if master else ""),
            term("DeepSpeed buckets", held, held + bucket_backward, held + bucket_backward, held, self._bucket_note()),
            term("activations", kept + forward_only, kept + head_kept + recompute, 0.0, 0.0, self._activation_note()),
            term("output head and loss", head_forward, head_backward, 0.0, 0.0,
                 "fused, chunked" if self.fused() else "plain logits"),
            term("temporaries", 0.0, layer_grads, end_activations, step_temporaries,
                 "backward: a layer's (end: or the all-reduce copy); step: the optimizer's"),
        ]

    def loading(self) -> float:
        """The moment the weights are loaded, on CPU: transformers memory-maps the checkpoint file,
        and a mapped file counts as allocated (torch.profiler reports it so; its pages are resident
        once read, and the loader reads them all). Weights loaded in the file's own dtype are views
        of the map; weights converted or quantised are built beside it, until the map is released
        (release_checkpoint_map, models/loading.py). On a GPU the map is in host memory: nothing
        on the device."""
        if self.device.kind != "cpu" or not self.facts.checkpoint_bytes:
            return 0.0
        if self.quantized or (self.frozen_linear_bytes and self.facts.checkpoint_dtype == "float32"):
            # 4-bit (or bf16) linear weights and fp32 copies of the rest; the adapters come after
            built = sum(self.param_bytes(numel, linear, trains) for numel, trains, linear in self.facts.params if not trains)
        elif self.facts.checkpoint_dtype == "float32":
            built = 0.0  # loaded in fp32, as stored: the weights are the map
        else:
            built = 4.0 * self.facts.base_params
        return self.facts.checkpoint_bytes + built

    def _weights_note(self) -> str:
        parts = ["fp16" if self.weight_bytes == 2 else "fp32"]
        if self.quantized:
            parts.append(f"linear weights {self.quantized:.3g} bytes each")
        if self.frozen_linear_bytes:
            parts.append(f"frozen linear weights {self.frozen_linear_bytes:g} bytes each")
        if self.stage == 3:
            parts.append(f"sharded / {self.world} above {self.zero.param_persistence_threshold:,} elements")
        return ", ".join(parts)

    def _bucket_note(self) -> str:
        if self.stage == 0:
            return "none (the end of backward: an all-reduce copy)"
        return f"reduce_bucket_size {self.zero.reduce_bucket_size:.3g}" + (", flat gradients" if self.stage == 3 else "")

    def _optimizer_note(self) -> str:
        kind = "AdamW, 2 x fp32" if self.cfg.train.optimizer == "adamw" else "paged AdamW 8-bit"
        return kind + (f", sharded / {self.world}" if self.stage >= 1 else "")

    def _activation_note(self) -> str:
        what = f"{len(self.recorded)} layers, {self.rows} x {self.sequences * self.sequence_len} tokens, " \
               f"{self.attention_kind()} attention"
        return what + (", checkpointed" if self.checkpointing else "")

    # ---- time
    def flops_per_step(self) -> float:
        """Matmul FLOPs of one optimizer step on one rank."""
        t, h, v = self.tokens, self.hidden, self.vocab
        recorded = {id(layer) for layer in self.recorded}
        flops = 0.0
        for layer in self.facts.layers:
            in_graph = id(layer) in recorded
            for i, o, trains in layer.linears.values():
                flops += 2 * t * i * o * (1 + in_graph + trains)
            flops += 6 * t * layer.adapter_trainable
            segments = self.rows * self.sequences
            attention = 4 * segments * self.sequence_len * (self.sequence_len + self._kv_prefix()) * h
            if self.attention_kind() != "packed" or self.device.kind != "cpu":
                attention /= 2  # fused causal kernels skip the masked half
            flops += attention * (1 + 2 * in_graph)
            if self.checkpointing and in_graph:
                flops += sum(2 * t * i * o for i, o, _ in layer.linears.values()) + attention
        needs_hidden = bool(self.recorded)
        flops += 2 * self.learned * h * v * (1 + needs_hidden + self.facts.head_trains)
        if self.objective.reference_forwards(self.cfg.stage_options, self.method, self.opts):
            flops += sum(2 * t * i * o for layer in self.facts.layers for i, o, _ in layer.linears.values())
            flops += 2 * self.learned * h * v
        return flops * self.cfg.train.grad_accum


def estimate(cfg: TrainJobConfig, model_dir: str | Path, device: Device, peak_tflops: Optional[float] = None,
             total_steps: Optional[int] = None, checkpointing: Optional[bool] = None,
             utilisation: float = DEFAULT_UTILISATION, advise: bool = True, facts: Optional[ModelFacts] = None
             ) -> Estimate:
    """The per-device estimate of `cfg` on `device`. `checkpointing`: decide train.gradient_checkpointing
    here (for `auto`); otherwise the config's. `peak_tflops`: the device's matmul peak; on CPU it
    is measured when not given."""
    gc_setting = cfg.train.gradient_checkpointing
    checkpointing = bool(gc_setting is True) if checkpointing is None else checkpointing
    precision = resolved_precision(cfg, device)
    facts = facts or model_facts(cfg, model_dir, precision, total_steps or 10)
    step = _Step(cfg, facts, device, checkpointing)
    terms = step.phases()
    totals = {phase: sum(term.bytes[phase] for term in terms) for phase in PHASES}
    phase = max(totals, key=totals.get)
    fixed, fraction = OVERHEAD[device.kind]
    if peak_tflops is None and device.kind == "cpu":
        peak = measured_cpu_peak(precision, cfg.distributed.cpus_per_worker)
    else:
        peak = peak_tflops * 1e12 if peak_tflops else None
    result = Estimate(device=device, terms=terms, phase=phase, peak_bytes=totals[phase],
                      overhead_bytes=fixed + fraction * totals[phase], total_params=facts.total_params,
                      trainable_params=facts.trainable_params, base_params=facts.base_params, precision=precision, checkpointing=checkpointing,
                      flops_per_step=step.flops_per_step(), peak_flops=peak, utilisation=utilisation,
                      total_steps=total_steps, host_bytes=step.offloaded())
    if advise and not result.fits:
        result.advice = advice(cfg, model_dir, device, result, facts)
    return result


# ---------------------------------------------------------------- what would make it fit
def _variant(cfg: TrainJobConfig, **changes) -> Optional[TrainJobConfig]:
    """`cfg` with dotted keys changed, or None where the change is not a valid config."""
    from rayft.config import parse_config

    raw = cfg.to_dict()
    for key, value in changes.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    try:
        return parse_config(raw)
    except RayftError:
        return None


def candidate_changes(cfg: TrainJobConfig, device: Device, checkpointing: bool) -> list[tuple[str, TrainJobConfig, bool]]:
    """(what to change, the changed config, gradient checkpointing on) for each single change
    that may lower the peak; changes that keep the method and its numbers come first."""
    from rayft.methods import get_method

    dist, train = cfg.distributed, cfg.train
    method = get_method(cfg.method.type)
    out = []

    def add(label, changed, ckpt=checkpointing):
        if changed is not None:
            out.append((label, changed, ckpt))

    for stage in range(dist.zero_stage + 1, 4):
        if dist.num_workers > 1:
            add(f"distributed.zero_stage={stage}", _variant(cfg, **{"distributed.zero_stage": stage}))
    if device.kind == "cuda" and dist.zero_stage >= 1 and not dist.offload_optimizer:
        add("distributed.offload_optimizer=true", _variant(cfg, **{"distributed.offload_optimizer": True}))
    if device.kind == "cuda" and dist.zero_stage == 3 and not dist.offload_params:
        add("distributed.offload_params=true", _variant(cfg, **{"distributed.offload_params": True}))
    if not checkpointing and not method.checkpointing_refusal:
        add("train.gradient_checkpointing=true", _variant(cfg, **{"train.gradient_checkpointing": True}), True)
    mb = train.micro_batch_size
    while mb > 1:
        mb //= 2
        accum = train.grad_accum * train.micro_batch_size // mb
        add(f"train.micro_batch_size={mb} with train.grad_accum={accum}",
            _variant(cfg, **{"train.micro_batch_size": mb, "train.grad_accum": accum}))
    for label, changed in method_alternatives(cfg):
        add(label, changed)
    return out


def method_alternatives(cfg: TrainJobConfig) -> list[tuple[str, TrainJobConfig]]:
    """Smaller versions of the method: its own (methods/base.py smaller: e.g. half the rank), and
    the same adapter over a 4-bit base (a registered method of the same kind that quantises, with
    the same options)."""
    from rayft.methods import get_method, method_names

    method, opts = get_method(cfg.method.type), cfg.method.options
    out = []
    smaller = method.smaller(opts)
    if smaller is not None:
        changed = _variant(cfg, method={"type": cfg.method.type, cfg.method.type: smaller[1]})
        if changed is not None:
            out.append((smaller[0], changed))
    if method.quantized_weight_bytes(opts) is None:
        for name in method_names():
            other = get_method(name)
            if isinstance(other, type(method)) and other is not method and \
                    other.quantized_weight_bytes(other.options()) is not None:
                changed = _variant(cfg, method={"type": name, name: opts.model_dump()})
                if changed is not None:
                    out.append((f"method.type={name}", changed))
    return out


def advice(cfg: TrainJobConfig, model_dir, device: Device, current: Estimate, facts: ModelFacts
           ) -> list[tuple[str, float, bool]]:
    """Each single change that lowers the predicted need, with its need: those that fit first (in
    the order of candidate_changes: sharding and offload, then recomputation, then smaller
    micro-batches, then a smaller method), then the others by need."""
    out = []
    for label, changed, ckpt in candidate_changes(cfg, device, current.checkpointing):
        same_model = changed.method == cfg.method
        result = estimate(changed, model_dir, device, peak_tflops=1.0, checkpointing=ckpt, advise=False,
                          facts=facts if same_model else None)
        if result.needed_bytes < current.needed_bytes:
            out.append((label, result.needed_bytes, result.fits))
    fitting = [a for a in out if a[2]]
    return fitting + sorted((a for a in out if not a[2]), key=lambda a: a[1])


# ---------------------------------------------------------------- time
def measured_cpu_peak(precision: str, threads: float, seconds: float = 0.5) -> float:
    """FLOP/s of a square matmul in the run's compute dtype with a worker's threads."""
    import time

    dtype = torch.bfloat16 if precision in ("bf16", "fp16") else torch.float32
    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        n = 1024
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up: kernel selection and first-touch pages
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
        return best
    finally:
        torch.set_num_threads(saved)


def total_steps_of(cfg: TrainJobConfig, train_rows: Optional[int]) -> Optional[int]:
    from rayft.data.dataset import batches_per_epoch
    from rayft.train.schedule import StepPlan

    if cfg.train.max_steps:
        return cfg.train.max_steps
    if train_rows is None:
        return None
    batches = batches_per_epoch(train_rows, cfg.distributed.num_workers, cfg.train.micro_batch_size)
    return StepPlan.build(cfg.train, batches).total_steps


# ---------------------------------------------------------------- the command and the pre-flight
def _gib(value: float) -> str:
    return f"{value / GiB:.2f} GiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def check_options(device_text: Optional[str], peak_tflops: Optional[float], utilisation: float) -> Optional[Device]:
    """`rayft estimate`'s own options, checked before anything is loaded; the device, if given."""
    if peak_tflops is not None and peak_tflops <= 0:
        raise RayftError(f"--peak-tflops {peak_tflops:g}: must be positive")
    if not 0 < utilisation <= 1:
        raise RayftError(f"--utilisation {utilisation:g}: must be inside (0, 1]")
    return parse_device(device_text) if device_text else None


def estimate_command(cfg: TrainJobConfig, device: Optional[Device], peak_tflops: Optional[float],
                     utilisation: float = DEFAULT_UTILISATION) -> Estimate:
    """What `rayft estimate` computes: the config checked as `rayft train` checks it before the
    workers start, the run's steps (train.max_steps, else from the tokenized data, as train counts
    them), then the estimate on `device` (None: this machine's, local_device)."""
    from rayft.models import resolve_model_path
    from rayft.train.runner import check_method

    device = device or local_device(cfg.distributed.num_workers)
    model_dir = resolve_model_path(cfg.model.name_or_path)
    check_method(cfg, model_dir)
    return estimate(cfg, model_dir, device, peak_tflops=peak_tflops, total_steps=_planned_steps(cfg, model_dir),
                    utilisation=utilisation)


def _planned_steps(cfg: TrainJobConfig, model_dir: Path) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    from rayft.data.dataset import prepare_data
    from rayft.models import rayft_home

    data = prepare_data(cfg.data, model_dir, rayft_home() / "datasets", cfg.train.seed, cfg.stage)
    return total_steps_of(cfg, data.train_rows)


def render(cfg: TrainJobConfig, result: Estimate, console=None) -> None:
    """The estimate as a table of terms per moment of the step, the verdict, the advice and the time."""
    from rich.console import Console
    from rich.table import Table

    import sys

    # wide enough for the table's columns where no terminal sets the width (a log, a pipe)
    console = console or Console(width=None if sys.stdout.isatty() else 150)
    dist = cfg.distributed
    console.print(f"rayft estimate: {cfg.name} (stage {cfg.stage}), method {cfg.method.type}: "
                  f"{result.trainable_params:,} of {result.total_params:,} parameters train")
    console.print(f"{dist.num_workers} workers, ZeRO-{dist.zero_stage}, {result.precision}, micro-batch "
                  f"{cfg.train.micro_batch_size} x {cfg.data.cutoff_len} tokens, gradient checkpointing "
                  f"{'on' if result.checkpointing else 'off'}; memory per device:")
    table = Table()
    table.add_column("term")
    for phase in PHASES:
        table.add_column(f"{phase}{' (peak)' if phase == result.phase else ''}", justify="right")
    table.add_column("note")
    for term in result.terms:
        if any(term.bytes.values()):
            table.add_row(term.name, *(_gib(term.bytes[p]) for p in PHASES), term.note)
    totals = [sum(term.bytes[p] for term in result.terms) for p in PHASES]
    table.add_row("[bold]tensors", *(f"[bold]{_gib(v)}" for v in totals), "")
    fixed, fraction = OVERHEAD[result.device.kind]
    table.add_row("framework overhead", *([""] * len(PHASES)), f"{_gib(result.overhead_bytes)}: stated, {_gib(fixed)}"
                  + (f" + {fraction:.0%} of the tensors" if fraction else "")
                  + (" (CUDA context, workspaces, allocator slack)" if result.device.kind == "cuda"
                     else " (a worker's interpreter and libraries)"))
    console.print(table)
    verdict = "fits" if result.fits else "does NOT fit"
    console.print(f"needed per device: {_gib(result.needed_bytes)} (the peak, at the {result.phase}, + overhead) "
                  f"on {result.device} ({_gib(result.device.total_bytes)}): {verdict}"
                  + (f"; {_gib(result.host_bytes)} more in host memory (offload)" if result.host_bytes else ""))
    console.print(f"rule of thumb for full fine-tuning on one device: {RULE_OF_THUMB_BYTES_PER_PARAM} x "
                  f"{result.base_params:,} base parameters = {_gib(result.rule_of_thumb_bytes)}")
    for label, needed, fits in result.advice[:6]:
        console.print(f"  {'fits' if fits else 'lower'} with {label}: {_gib(needed)}")
    if result.seconds_per_step is None:
        console.print(f"time: {result.flops_per_step / 1e12:.3g} TFLOP per step per device; pass --peak-tflops "
                      "(the device's dense matmul TFLOP/s in the run's precision) for seconds")
        return
    wall = f", {_duration(result.wall_seconds)} for {result.total_steps} steps" if result.wall_seconds else ""
    console.print(f"time: {result.flops_per_step / 1e12:.3g} TFLOP per step per device at "
                  f"{result.peak_flops / 1e12:.3g} TFLOP/s x utilisation {result.utilisation:g}: "
                  f"~{_duration(result.seconds_per_step)} per step{wall} (evaluation and start-up not counted)")


def advice_line(result: Estimate) -> str:
    fitting = [f"{label} ({_gib(needed)})" for label, needed, fits in result.advice if fits]
    if fitting:
        return "fits with: " + "; ".join(fitting[:4])
    if result.advice:
        label, needed, _ = result.advice[0]
        return f"no single change makes it fit; the closest: {label} ({_gib(needed)})"
    return "no single change makes it fit"


def worker_device(cfg: TrainJobConfig, use_gpu: bool) -> Optional[Device]:
    """Each worker's device: a GPU's memory (read here, or on the cluster by a one-GPU task), or
    on CPU this machine's memory shared by the workers. None where the GPU cannot be read."""
    if not use_gpu:
        import psutil

        return Device("cpu", psutil.virtual_memory().total // cfg.distributed.num_workers)
    if torch.cuda.is_available():
        return Device("cuda", torch.cuda.get_device_properties(0).total_memory)
    import ray

    @ray.remote(num_gpus=1, num_cpus=0)
    def gpu_memory() -> int:
        import torch as worker_torch

        return worker_torch.cuda.get_device_properties(0).total_memory

    try:
        return Device("cuda", ray.get(gpu_memory.remote(), timeout=120))
    except Exception:  # noqa: BLE001 (the check is skipped, and says so)
        return None


def preflight_estimate(cfg: TrainJobConfig, model_dir: Path, use_gpu: bool, force: bool = False, say=print) -> None:
    """`rayft train`'s memory check, before the workers start: decides train.gradient_checkpointing
    `auto` (in `cfg`, so the workers and config.yaml get the decision), then refuses a GPU run
    predicted not to fit (RayftError, one line with the advice; `force` runs it anyway) and warns
    of a CPU one."""
    from rayft.methods import get_method

    device = worker_device(cfg, use_gpu)
    setting = cfg.train.gradient_checkpointing
    if device is None:
        if setting == "auto":
            cfg.train.gradient_checkpointing = False
        say("[rayft] note: the workers' GPU memory could not be read; no memory check"
            + ("; train.gradient_checkpointing auto: off" if setting == "auto" else ""))
        return
    precision = resolved_precision(cfg, device)
    facts = model_facts(cfg, model_dir, precision)
    without = estimate(cfg, model_dir, device, checkpointing=setting is True, advise=False, facts=facts,
                       peak_tflops=1.0)
    result = without
    if setting == "auto":
        refused = get_method(cfg.method.type).checkpointing_refusal
        with_it = None if refused or without.fits else estimate(cfg, model_dir, device, checkpointing=True,
                                                                   advise=False, facts=facts, peak_tflops=1.0)
        on = bool(with_it is not None and with_it.fits)
        cfg.train.gradient_checkpointing = on
        if on:
            result = with_it
            why = f"{_gib(without.needed_bytes)} without it does not fit {device}, {_gib(with_it.needed_bytes)} with it does"
        elif refused:
            why = f"method.type={cfg.method.type} cannot run with it"
        elif without.fits:
            why = f"{_gib(without.needed_bytes)} fits {device} without it"
        else:
            why = f"{_gib(with_it.needed_bytes)} with it still does not fit {device}"
        say(f"[rayft] train.gradient_checkpointing auto: {'on' if on else 'off'} (predicted need per worker "
            f"{why})")
    if result.fits:
        return
    result.advice = advice(cfg, model_dir, device, result, facts)
    line = (f"predicted peak {_gib(result.needed_bytes)} per worker does not fit {device} "
            f"(at the {result.phase}; `rayft estimate` shows the terms); {advice_line(result)}")
    if device.kind == "cuda" and not force:
        raise RayftError(line + "; --force runs it anyway")
    say(f"[rayft] warning: {line}" + ("" if device.kind == "cuda" else " (CPU: warned, not refused)"))
