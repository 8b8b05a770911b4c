"""The per-worker training loop: what every Ray Train worker runs, top to bottom.

setup (model, optimizer, DeepSpeed engine, resume) -> evaluate before -> train steps
(log, evaluate, checkpoint) -> final evaluation -> export weights in the last checkpoint.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from rayft.config import TrainJobConfig
from rayft.data.dataset import NO_TASK, PreparedData, RowFile, batches_per_epoch, shard_indices
from rayft.data.packing import collate
from rayft.data.tokenize import IGNORE_INDEX
from rayft.objectives import get_objective
from rayft.train.attention import ATTENTION_NAME, PackedLayout, host_to_device
from rayft.train.checkpoint import TrainerState, export_weights, load_training_state, save_training_state
from rayft.train.ewc import ElasticWeightConsolidation
from rayft.train.head_loss import Learned, fused_head_loss_applies, head_returns_loss, head_returns_token_losses
from rayft.train.schedule import StepPlan, lr_factor
from rayft.train.task_weights import remember_evaluation, task_loss_weights


# ---------------------------------------------------------------- the loss step
def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device, say=print) -> str:
    """'auto' -> bf16 with native hardware support, else fp32. An explicit bf16 is kept."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device):
        say(f"[rayft] warning: train.precision=bf16 on {device.type} without native bf16 math is emulated "
            f"and far slower than fp32; precision=auto would pick fp32 here")
    return precision


def autocast_context(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def unwrapped(model) -> torch.nn.Module:
    """The model under a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


def output_head(model) -> torch.nn.Module:
    """The LM head under any wrapping (DeepSpeed engine, peft)."""
    return unwrapped(model).get_output_embeddings()


def token_losses(model, batch: dict, precision: str, virtual_tokens: int = 0,
                 fused_head: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss over the learned tokens of a batch, and how many there are.

    No attention mask: position ids that restart per packed sample give a block-diagonal
    causal mask (or, with rayft's packed attention, one attention per sample), and right
    padding is invisible under causal attention. The output head (a hidden x vocabulary matmul,
    the biggest of the model) runs only at positions whose next token is learned, and where it
    can (train/head_loss.py) it returns their summed loss itself, chunk by chunk, so that the
    full logits never exist; otherwise a forward pre-hook hands it just those hidden states.
    `virtual_tokens`: positions a soft-prompt method puts before each row's own (never learned).
    A batch with `row_weight` (its rows' task weights, data.task_weights) weights each token's
    loss by its row's; the normaliser stays the token count."""
    learned, targets = learned_positions(on_host(batch, "labels"), virtual_tokens)
    learned, targets, count = on_device(batch, learned, targets, torch.tensor([len(targets)]))
    learned = Learned(learned, virtual_tokens + batch["labels"].shape[1])
    weights = batch["row_weight"].index_select(0, learned.rows()) if "row_weight" in batch else None
    head = output_head(model)
    if fused_head and fused_head_loss_applies(unwrapped(model), head, precision):
        with head_returns_loss(head, learned, targets, weights), autocast_context(precision, targets.device):
            return model(**model_inputs(model, batch)).logits, count[0]  # the summed loss, from the head itself
    logits = learned_logits(model, batch, precision, learned)
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    return (losses * weights if weights is not None else losses).sum(), count[0]


def learned_positions(labels: torch.Tensor, virtual_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(the positions whose next token is learned, as flat indices into the rows x (virtual
    tokens + tokens) of the model's hidden states; those tokens)."""
    learned = labels[:, 1:] != IGNORE_INDEX
    row, position = torch.nonzero(learned, as_tuple=True)
    return row * (virtual_tokens + labels.shape[1]) + virtual_tokens + position, labels[:, 1:][learned]


def on_host(batch: dict, name: str) -> torch.Tensor:
    """The batch's `name` as the host has it (to_device keeps the host's copy; a batch moved without
    one is copied back, which on a GPU waits). What the step works out from the batch's values
    (which positions are learned, the packed layout) is worked out there: on a GPU a boolean
    selection or a read of the device's copy makes the host wait for the device."""
    return batch["host"][name] if "host" in batch else batch[name].cpu()


def on_device(batch: dict, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Integer tensors worked out on the host, moved to the batch's device together (as int64) in
    one copy that does not wait."""
    joined = host_to_device(torch.cat([t.reshape(-1).long() for t in tensors]), batch["labels"].device)
    return list(joined.split([t.numel() for t in tensors]))


def model_inputs(model, batch: dict) -> dict:
    extra = {}
    if unwrapped(model).config._attn_implementation == ATTENTION_NAME:
        # once per batch, not per layer, from the host's copy of the position ids
        extra["packed_layout"] = PackedLayout.of(on_host(batch, "position_ids"), batch["input_ids"].device)
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False, **extra}


def learned_logits(model, batch: dict, precision: str, learned: Learned) -> torch.Tensor:
    """The logits at the learned positions only: a forward pre-hook hands the head just those
    hidden states."""
    hook = output_head(model).register_forward_pre_hook(lambda _module, args: (learned.rows_of(args[0]), *args[1:]))
    try:
        with autocast_context(precision, learned.index.device):
            return model(**model_inputs(model, batch)).logits
    finally:
        hook.remove()


def learned_token_logps(model, batch: dict, precision: str, learned: Learned,
                        targets: torch.Tensor) -> torch.Tensor:
    """The log-probability of each learned token: from the head itself where the fused head
    applies (the learned tokens' logits never exist in full), else from their logits."""
    head = output_head(model)
    if fused_head_loss_applies(unwrapped(model), head, precision):
        with head_returns_token_losses(head, learned, targets), autocast_context(precision, targets.device):
            return -model(**model_inputs(model, batch)).logits
    logits = learned_logits(model, batch, precision, learned)
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None])[:, 0]


def sequence_logps(model, batch: dict, precision: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sequence of the batch, in order (rows in order, each row's sequences as its positions
    restart): the summed log-probability of its learned tokens, how many there are, and the row
    it sits in. A sequence without learned tokens (a row's padding) is not one."""
    # worked out on the host (see on_host)
    labels = on_host(batch, "labels")
    learned, targets = learned_positions(labels)
    starts = on_host(batch, "position_ids") == 0
    segment = torch.cumsum(starts, dim=1) - 1  # within the row
    row_offset = torch.arange(segment.shape[0])[:, None] * segment.shape[1]
    # the target at t+1 belongs to the sequence of t+1 (no sequence's first token is learned)
    learned_segments = (segment + row_offset).reshape(-1)[learned + 1]
    segments, sequence = torch.unique_consecutive(learned_segments, return_inverse=True)
    counts = torch.bincount(sequence, minlength=len(segments))
    learned, targets, sequence, counts, rows = on_device(batch, learned, targets, sequence, counts,
                                                         segments // segment.shape[1])
    learned = Learned(learned, labels.shape[1])
    token_logps = learned_token_logps(model, batch, precision, learned, targets)
    return token_logps.new_zeros(len(segments)).index_add_(0, sequence, token_logps), counts, rows


# ---------------------------------------------------------------- data
def train_batches(rows: RowFile, plan: StepPlan, cfg: TrainJobConfig, rank: int, world: int,
                  start_step: int, pad_id: int, device) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches of this rank's shard from optimizer step `start_step` on; the shard of each
    epoch is a fixed function of the seed, so a resumed run skips exactly what it trained."""
    mb, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    batches_per_step_epoch = plan.steps_per_epoch * accum
    micro_index = start_step * accum
    end = plan.total_steps * accum
    while micro_index < end:
        epoch, offset = divmod(micro_index, batches_per_step_epoch)
        indices = shard_indices(len(rows), rank, world, epoch, cfg.train.seed, shuffle=True)
        for at in range(offset, batches_per_step_epoch):
            if micro_index >= end:
                return
            chunk = indices[at * mb:(at + 1) * mb]
            yield with_rows(collate(rows.rows(chunk), pad_id), chunk, TRAIN_SPLIT, device)
            micro_index += 1


def eval_batches(rows: RowFile, mb: int, rank: int, world: int, pad_id: int, device,
                 subset: Optional[np.ndarray] = None):
    """(batch, counts) pairs of this rank's part of the validation rows (or of `subset` of them).
    Every rank runs the same number of forward passes (ZeRO-3 gathers weights collectively); a
    rank out of rows repeats its first batch with counts=False."""
    subset = np.arange(len(rows)) if subset is None else subset
    indices = subset[rank::world]
    n_batches = math.ceil(math.ceil(len(subset) / world) / mb)
    for b in range(n_batches):
        chunk = indices[b * mb:(b + 1) * mb]
        counts = len(chunk) > 0
        if not counts:
            chunk = indices[:mb] if len(indices) else subset[:mb]
        yield with_rows(collate(rows.rows(chunk), pad_id), chunk, VAL_SPLIT, device), counts


TRAIN_SPLIT, VAL_SPLIT = 0, 1


def with_rows(batch: dict[str, torch.Tensor], indices, split: int, device) -> dict:
    """The batch on the device (to_device), with which rows of which split it holds (what a stage
    may have computed per row beforehand, e.g. a reference's log-probabilities, is looked up by them)."""
    return to_device({**batch, "row_index": torch.as_tensor(np.asarray(indices), dtype=torch.long),
                      "split_id": torch.tensor(split)}, device)


def to_device(batch: dict[str, torch.Tensor], device) -> dict:
    """A collated batch on the device, without waiting for it (host_to_device), and the host's copy
    of all of it under "host" (on_host)."""
    return {**{k: host_to_device(v, device) for k, v in batch.items()}, "host": batch}


def all_sum(values: list[float] | torch.Tensor, device) -> list[float]:
    """Each value summed over the ranks; `values`: floats, or a float64 tensor on the device."""
    tensor = values if torch.is_tensor(values) else torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def metric_part(name: str) -> str:
    """A task's or an eval set's name as part of a metric name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


@torch.no_grad()
def evaluate(engine, loss_of, rows: RowFile, cfg: TrainJobConfig, rank: int, world: int, pad_id: int, device,
             perplexity: bool, tasks: list[str] = ()) -> dict[str, float]:
    """eval_loss (and eval_ppl where it means one) and eval_<metric> for each of the stage's
    metrics, over all ranks' validation rows; with tasks, each task's loss as
    eval_task_<task>_loss (a packed row holds one task's samples)."""
    engine.eval()
    sums: dict[str, float] = {}
    task_sums = np.zeros((len(tasks), 2))  # per task: summed loss, normaliser
    row_tasks = rows.tasks() if tasks else np.full(len(rows), NO_TASK)
    for task in np.unique(row_tasks):  # the same on every rank: all read the same file
        for batch, counts in eval_batches(rows, cfg.train.micro_batch_size, rank, world, pad_id, device,
                                          np.flatnonzero(row_tasks == task)):
            loss, normaliser, metrics = loss_of(engine, batch)
            for name, value in {"loss": loss, "normaliser": normaliser, **metrics}.items():
                # a repeated batch adds zeros: every rank all-reduces the same names
                sums[name] = sums.get(name, 0.0) + (value.item() if counts else 0.0)
            if counts and task != NO_TASK:
                task_sums[task] += (loss.item(), normaliser.item())
    engine.train()
    names = sorted(sums)
    reduced = all_sum([sums[name] for name in names] + task_sums.ravel().tolist(), device)
    totals = dict(zip(names, reduced[:len(names)]))
    normaliser = max(totals.pop("normaliser"), 1.0)
    result = {f"eval_{name}": value / normaliser for name, value in totals.items()}
    for task, (loss, task_normaliser) in zip(tasks, np.reshape(reduced[len(names):], (-1, 2))):
        if task_normaliser > 0:  # a task with validation rows
            result[f"eval_task_{metric_part(task)}_loss"] = loss / task_normaliser
    if perplexity:
        result["eval_ppl"] = math.exp(min(result["eval_loss"], 50))
    return result


def evaluate_sets(engine, sets: dict[str, RowFile], cfg: TrainJobConfig, rank: int, world: int, pad_id: int, device,
                  virtual_tokens: int, fused_head: bool) -> dict[str, float]:
    """eval_<name>_loss of each of data.eval_sets: the next-token loss on general conversations,
    whatever the stage, so that a drop in general ability (forgetting) shows."""
    def token_loss(model, batch):
        return (*token_losses(model, batch, cfg.train.precision, virtual_tokens, fused_head), {})

    result = {}
    for name, rows in sets.items():
        loss = evaluate(engine, token_loss, rows, cfg, rank, world, pad_id, device, False)["eval_loss"]
        result[f"eval_{metric_part(name)}_loss"] = loss
    return result


# ---------------------------------------------------------------- setup
def build_optimizer(model, cfg: TrainJobConfig, on_gpu: bool):
    from rayft.methods import get_method

    params = get_method(cfg.method.type).param_groups(cfg.method.options, model, cfg.train.lr)
    train = cfg.train
    if train.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, fused=on_gpu or None)


class Reporter:
    """Rank 0's metrics: to MLflow (step metrics) and to the driver's progress bar.

    MLflow's writes run in order on a thread of their own: one write to a SQLite store took
    20-170 ms on the 2-core dev machine, time in which rank 0 would not train and every other
    rank would wait for it at the next all-reduce. A failed write is raised at the next log()
    or at close(), which waits for them all."""

    def __init__(self, rank: int, mlflow_uri: Optional[str], run_id: Optional[str], progress_queue):
        self.enabled = rank == 0
        self.client = None
        self.run_id = run_id
        self.queue = progress_queue
        self.writes: list = []
        if self.enabled and run_id:
            from concurrent.futures import ThreadPoolExecutor

            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=mlflow_uri)
            self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayft-mlflow")

    def say(self, line: str) -> None:
        """One of rayft's lines: to the driver's console (through the progress queue), else printed."""
        if not self.enabled:
            return
        if self.queue is not None:
            try:
                self.queue.put_nowait({"message": line})
                return
            except Exception:
                pass
        print(line, flush=True)

    def log(self, step: int, metrics: dict[str, float], state: TrainerState) -> None:
        if not self.enabled:
            return
        state.history.append({"step": step, **metrics})
        if self.client:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._raise_failed_writes()
            self.writes.append(self.writer.submit(
                self.client.log_batch, self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]))
        if self.queue is not None:
            try:
                self.queue.put_nowait({"step": step, **metrics})
            except Exception:  # the progress bar is a convenience: never fail training over it
                pass

    def _raise_failed_writes(self) -> None:
        writes, self.writes = self.writes, []
        for write in writes:
            if write.done():
                write.result()
            else:
                self.writes.append(write)

    def close(self) -> None:
        """Waits for MLflow's writes (raising the first that failed)."""
        if self.client:
            self.writer.shutdown(wait=True)
            self._raise_failed_writes()


# ---------------------------------------------------------------- the loop
def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point: the worker's output goes to its own log file (unless verbose), and
    an exception leaves its traceback there before Ray Train reports it."""
    import traceback

    import ray.train

    from rayft.console import redirect_descriptors, worker_log

    if loop_config.get("log_dir"):
        redirect_descriptors(worker_log(Path(loop_config["log_dir"]), ray.train.get_context().get_world_rank()))
    try:
        train_on_worker(loop_config)
    except BaseException:
        traceback.print_exc()
        raise


def train_on_worker(loop_config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch
    from transformers import AutoTokenizer

    from rayft.methods import Run, get_method
    from rayft.models.loading import compile_decoder_layers, count_parameters, load_for_training
    from rayft.train.deepspeed_config import deepspeed_config, skip_the_inference_comm_build

    skip_the_inference_comm_build()
    cfg = TrainJobConfig.model_validate(loop_config["config"])
    data = PreparedData(**loop_config["data"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    torch.manual_seed(cfg.train.seed)  # identical adapter init on every rank
    reporter = Reporter(rank, loop_config.get("mlflow_uri"), loop_config.get("mlflow_run_id"),
                        loop_config.get("progress_queue"))
    precision = resolve_precision(cfg.train.precision, device, reporter.say)
    cfg.train.precision = precision

    train_rows, val_rows = RowFile(data.train_file), RowFile(data.val_file)
    plan = StepPlan.build(cfg.train, batches_per_epoch(len(train_rows), world, cfg.train.micro_batch_size))
    method, opts = get_method(cfg.method.type), cfg.method.options
    run = Run(total_steps=plan.total_steps, precision=precision, zero_stage=cfg.distributed.zero_stage)
    model = load_for_training(loop_config["model_dir"], cfg.method, device, cfg.train.attention, run,
                              cfg.train.gradient_checkpointing)
    if cfg.train.compile:
        reporter.say(f"[rayft] train.compile: {compile_decoder_layers(model)} decoder layers compile in the first steps")
    trainable_params, total_params = count_parameters(model)
    changed_params = method.changed_base_params(opts, model)
    reporter.say(f"[rayft] {cfg.method.type}: {trainable_params:,} trainable of {total_params:,} parameters "
                 f"({100 * trainable_params / total_params:.3f}%); its output changes {changed_params:,} base "
                 f"parameters once merged or applied; precision {precision}")
    pad_id = AutoTokenizer.from_pretrained(loop_config["model_dir"]).pad_token_id or 0

    objective, stage_opts = get_objective(cfg.stage), cfg.stage_options

    def loss_of(model, batch):
        """(summed loss, normaliser, metric sums) of a batch, as the stage (objectives/) defines them."""
        return objective.loss(stage_opts, model, batch, precision, method, opts)

    ewc = None
    if cfg.train.ewc:  # from the model as loaded: a resumed run recomputes the same Fisher
        ewc_cfg = cfg.train.ewc
        ewc = ElasticWeightConsolidation.estimate(
            ewc_cfg.weight, ewc_cfg.samples, model, RowFile(data.eval_set_file(ewc_cfg.set)),
            lambda m, b: token_losses(m, b, precision, method.virtual_tokens(opts), method.fused_head),
            pad_id, device, rank, world, cfg.train.seed)
        reporter.say(ewc.summary(ewc_cfg.set, ewc_cfg.samples))

    optimizer = build_optimizer(model, cfg, on_gpu)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, plan, cfg.train.scheduler) * method.lr_scale(opts, s))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world, on_gpu), dist_init_required=False)
    if ewc:
        ewc.anchor(engine.module)  # theta* as DeepSpeed cast it, before a checkpoint moves it

    state = TrainerState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as checkpoint_dir:
            state = load_training_state(engine, Path(checkpoint_dir))
            method.load_state(opts, engine, Path(checkpoint_dir))
        state.resumed_from.append(state.step)
        reporter.say(f"[rayft] resumed at step {state.step} of {plan.total_steps}")
    objective.setup(stage_opts, cfg, method, engine, data, rank, world, pad_id, device, reporter,
                    resumed=state.step > 0, model_dir=loop_config["model_dir"])
    param_counts = {"trainable_params": trainable_params, "total_params": total_params,
                    "changed_base_params": changed_params}

    def report(metrics: dict, checkpoint: bool, export: bool) -> None:
        metrics = {**metrics, **param_counts, "step": state.step, "total_steps": plan.total_steps}
        if not checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="rayft-ckpt-") as tmp:
            save_training_state(engine, state, Path(tmp), rank)
            if rank == 0:
                method.save_state(opts, engine, Path(tmp))
            if export:
                export_weights(engine.module, method, opts, Path(tmp), rank)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if not export:
            # Train on once Ray Train has committed this checkpoint (it collects reports when it
            # polls the workers): a worker lost after this point redoes at most save_steps steps,
            # where a checkpoint still uncollected when a worker dies would be lost with it.
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    eval_sets = {name: RowFile(data.eval_set_file(name)) for name in data.eval_sets}

    def loss_weights() -> Optional[torch.Tensor]:
        """Each task's loss weight (data.task_weights, data.task_weighting), and 1 at the end for
        rows of no task (index -1); None: no weighting."""
        weights = task_loss_weights(data.tasks, cfg.data.task_weights, cfg.data.task_weighting,
                                    cfg.data.dwa_temperature, state.task_evaluations)
        return None if weights is None else torch.tensor(weights + [1.0], device=device)

    def run_evaluation() -> dict[str, float]:
        result = {**evaluate(engine, loss_of, val_rows, cfg, rank, world, pad_id, device,
                             objective.reports_perplexity, data.tasks),
                  **evaluate_sets(engine, eval_sets, cfg, rank, world, pad_id, device, method.virtual_tokens(opts),
                                  method.fused_head)}
        if cfg.data.task_weighting != "static":  # the weights follow the tasks' validation losses
            keys = {task: f"eval_task_{metric_part(task)}_loss" for task in data.tasks}
            state.task_evaluations = remember_evaluation(
                state.task_evaluations, {task: result[key] for task, key in keys.items() if key in result})
            result.update({f"task_weight_{metric_part(task)}": weight
                           for task, weight in zip(data.tasks, loss_weights().tolist())})
        return result

    if state.step == 0:
        before = run_evaluation()
        state.eval_loss_before = before["eval_loss"]
        reporter.log(0, {**before, "total_steps": plan.total_steps}, state)

    # The logging window's sums stay on the device (float64: the same sums as Python floats) and
    # are read back once per window, so the step never waits on the GPU to read them.
    window_sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss_sum, normaliser, real tokens
    window_seconds = 0.0
    metric_sums: dict[str, torch.Tensor] = {}
    step_start = time.perf_counter()
    engine.train()
    task_weights = loss_weights()
    for batch in train_batches(train_rows, plan, cfg, rank, world, state.step, pad_id, device):
        if task_weights is not None:
            batch["row_weight"] = task_weights[batch["task"]]
        loss_sum, normaliser, metrics = loss_of(engine, batch)
        loss = loss_sum / normaliser.clamp(min=1)
        extra = method.extra_loss(opts, engine.module)
        penalty = ewc.penalty(engine.module) if ewc else None  # None under ZeRO-3: see before_optimizer_step
        if penalty is not None:
            extra = penalty if extra is None else extra + penalty
        engine.backward(loss if extra is None else loss + extra)
        window_sums += torch.stack([x.detach().double() for x in (loss_sum, normaliser, batch["real_tokens"])])
        for name, value in metrics.items():
            metric_sums[name] = metric_sums.get(name, 0.0) + value.detach().to(device, torch.float64)
        boundary = engine.is_gradient_accumulation_boundary()
        if boundary:
            method.before_optimizer_step(opts, engine.module, state.step + 1)
            if ewc:
                ewc.before_optimizer_step(engine)
        engine.step()
        if not boundary:
            continue
        state.step += 1
        method.after_optimizer_step(opts, engine, state.step)
        window_ends = state.step % cfg.train.logging_steps == 0 or state.step == plan.total_steps
        if window_ends:  # read back before the clock: the window's time then covers its device work
            names = sorted(metric_sums)
            loss_sum, normaliser, tokens, *metric_totals = all_sum(
                torch.cat([window_sums, *[metric_sums[n].reshape(1) for n in names]]), device)
        now = time.perf_counter()
        window_seconds += now - step_start
        step_start = now

        if window_ends:
            state.tokens_seen += int(tokens)
            state.train_seconds += window_seconds
            grad_norm = engine.get_global_grad_norm()
            reporter.log(state.step, {
                "loss": loss_sum / max(normaliser, 1.0),
                **{name: total / max(normaliser, 1.0) for name, total in zip(names, metric_totals)},
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "tokens_per_s": tokens / max(window_seconds, 1e-9),
                **(ewc.window_metrics() if ewc else {}),
                "total_steps": plan.total_steps,
            }, state)
            window_sums, window_seconds, metric_sums = torch.zeros_like(window_sums), 0.0, {}

        last = state.step == plan.total_steps
        evaluated = state.step % cfg.train.eval_steps == 0 or last
        saving = last or state.step % cfg.train.save_steps == 0
        eval_metrics = {}
        if evaluated:
            eval_metrics = run_evaluation()
            task_weights = loss_weights()
            reporter.log(state.step, {**eval_metrics, "total_steps": plan.total_steps}, state)
        if evaluated or saving:
            # Every evaluation reaches Ray Train (and, in a sweep, Tune's scheduler), with or
            # without a checkpoint; the last one also exports the weights.
            report(eval_metrics, checkpoint=saving, export=last)
            step_start = time.perf_counter()  # evaluation and saving are not training time
    reporter.close()
