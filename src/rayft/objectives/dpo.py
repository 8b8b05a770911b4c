"""Preference alignment: Direct Preference Optimization and its variants (IPO, hinge, ORPO, SimPO).

Data: each record is a prompt with a chosen and a rejected answer. A pair becomes two sequences,
prompt + chosen and prompt + rejected, each learning its answer's tokens only, that always share a
row (positions restarting per sequence, as packed SFT samples do), so a pair's two sequences are
in the same micro-batch; pairs are packed into rows of 2 x data.cutoff_len. A pair longer than
cutoff_len has its prompt cut from the left; both answers are kept whole.

Loss: per sequence the summed log-probability of its answer (loop.sequence_logps), the policy's
against the reference's:
  sigmoid  -(1 - ls) log s(b z) - ls log s(-b z),  z = (pc - rc) - (pr - rr)   (DPO, conservative DPO)
  hinge    relu(1 - b z)                                                     (SLiC)
  ipo      (z' - 1 / (2 b))^2, z' as z with per-token means                  (IPO)
  simpo    -log s(b (mean pc - mean pr) - gamma), no reference               (SimPO)
  orpo     -b log s(log-odds(mean pc) - log-odds(mean pr)) + NLL(chosen), no reference (ORPO)
plus `sft_weight` x the chosen answer's mean NLL. The reference is the base: the same model with
its adapters switched off (no second copy); a frozen copy of the initial model (full and freeze:
train/reference.py, sharded like the policy under ZeRO-3); or its log-probabilities computed once
before the first step, when the model still equals its base, and kept with the tokenized data.
`auto` counts the reference forward passes of the run each way (the same forward, over the same
rows) and takes the fewer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field

from rayft.config import Strict
from rayft.errors import DataError
from rayft.objectives.base import Objective, register

REFERENCE_FREE = ("simpo", "orpo")


class DpoOptions(Strict):
    beta: float = Field(0.1, gt=0)
    loss: Literal["sigmoid", "ipo", "hinge", "orpo", "simpo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # conservative DPO: the labels' assumed noise (sigmoid)
    sft_weight: float = Field(0.0, ge=0)  # + this x the chosen answer's NLL, against drifting from it
    simpo_gamma: float = Field(0.5, ge=0)  # SimPO's target reward margin
    # auto: on each run, precomputed or the per-step reference (adapter_disabled, or model for full
    # and freeze), whichever runs fewer reference forwards (see DirectPreference.choose_reference)
    reference: Literal["auto", "adapter_disabled", "model", "precomputed"] = "auto"


# ---------------------------------------------------------------- records
def _pair_of(record: dict) -> Optional[tuple[list[dict], str, str]]:
    """(prompt messages, chosen, rejected) of one record in any of the accepted forms, or None."""
    chosen, rejected = record.get("chosen"), record.get("rejected")
    system = [{"role": "system", "content": record["system"]}] if isinstance(record.get("system"), str) and \
        record.get("system") else []
    if "conversations" in record:  # LLaMA-Factory ranking, sharegpt: turns end on the human's
        from rayft.data.formats import SHAREGPT_ROLES

        turns = record["conversations"]
        if not (isinstance(turns, list) and turns and all(isinstance(t, dict) and t.get("from") in SHAREGPT_ROLES
                                                          and isinstance(t.get("value"), str) for t in turns)):
            return None
        if not all(isinstance(a, dict) and isinstance(a.get("value"), str) for a in (chosen, rejected)):
            return None
        prompt = system + [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]
        return prompt, chosen["value"], rejected["value"]
    if isinstance(chosen, list) and isinstance(rejected, list):  # whole conversations sharing a prefix
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in
                   ("system", "user", "assistant") for m in chosen + rejected):
            return None
        if not chosen or not rejected or chosen[:-1] != rejected[:-1] or \
                chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            return None
        return [dict(m) for m in chosen[:-1]], chosen[-1]["content"], rejected[-1]["content"]
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        return None
    if "instruction" in record:  # LLaMA-Factory ranking, alpaca
        if not isinstance(record["instruction"], str) or not isinstance(record.get("input", ""), str):
            return None
        text = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return system + [{"role": "user", "content": text}], chosen, rejected
    if isinstance(record.get("prompt"), str):
        return system + [{"role": "user", "content": record["prompt"]}], chosen, rejected
    return None


NOT_A_PAIR = ("{count} records are not preference pairs ({{prompt, chosen, rejected}} strings, LLaMA-Factory "
              "ranking records in sharegpt or alpaca form, or chosen/rejected message lists sharing a prefix); "
              "first at index {first}")


def parse_pairs(records: list[dict], source: str, offset: int = 0, problems=None
                ) -> list[Optional[tuple[list[dict], str, str]]]:
    """(prompt messages, chosen, rejected) per record (None for a bad one, counted in `problems`;
    without it, one error counting them)."""
    from rayft.data.formats import Problems

    collected = problems if problems is not None else Problems()
    pairs = []
    for i, record in enumerate(records, start=offset):
        pair = None
        if "chosen" not in record or "rejected" not in record:
            collected.add("{count} records lack chosen or rejected; first at index {first}", i)
        elif (pair := _pair_of(record)) is None:
            collected.add(NOT_A_PAIR, i)
        elif not any(m["role"] == "user" and m["content"].strip() for m in pair[0]):
            collected.add("{count} records have an empty prompt; first at index {first}", i)
            pair = None
        pairs.append(pair)
    if problems is None:
        collected.raise_first(source)
    return pairs


def tokenize_pair(tokenizer, prompt: list[dict], chosen: str, rejected: str, cutoff_len: int):
    """The pair's two sequences (TokenizedSample), answers learned, the prompt cut from the left
    so that each sequence fits cutoff_len; None when the answers alone do not fit."""
    from rayft.data.tokenize import IGNORE_INDEX, TokenizedSample

    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    answers = []
    for answer in (chosen, rejected):
        text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=False)
        if not text.startswith(prompt_text):
            raise DataError("the chat template does not render a conversation prefix by prefix; cannot locate "
                            "the answer for the loss mask")
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        split = next((i for i, (start, _) in enumerate(encoded["offset_mapping"]) if start >= len(prompt_text)),
                     len(encoded["input_ids"]))
        answers.append((encoded["input_ids"][:split], encoded["input_ids"][split:]))
    prompt_ids = answers[0][0]
    keep = cutoff_len - max(len(answer) for _, answer in answers)
    if keep < 1:
        return None
    prompt_ids = prompt_ids[-keep:] if len(prompt_ids) > keep else prompt_ids
    sequences = []
    for _, answer in answers:
        labels = [IGNORE_INDEX] * len(prompt_ids) + list(answer)
        labels[0] = IGNORE_INDEX
        sequences.append(TokenizedSample(prompt_ids + list(answer), labels))
    return sequences


# ---------------------------------------------------------------- the losses
def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_losses(opts: DpoOptions, chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
                rejected_tokens: torch.Tensor, ref_chosen: Optional[torch.Tensor] = None,
                ref_rejected: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per pair: the loss and the metrics, from summed answer log-probabilities (and token counts)."""
    beta = opts.beta
    mean_chosen, mean_rejected = chosen / chosen_tokens, rejected / rejected_tokens
    if opts.loss in REFERENCE_FREE:
        reward_chosen, reward_rejected = beta * mean_chosen.detach(), beta * mean_rejected.detach()
        if opts.loss == "simpo":
            losses = -F.logsigmoid(beta * (mean_chosen - mean_rejected) - opts.simpo_gamma)
        else:
            log_odds = (mean_chosen - mean_rejected) - (_log1m_exp(mean_chosen) - _log1m_exp(mean_rejected))
            losses = -mean_chosen - beta * F.logsigmoid(log_odds)
    else:
        if opts.loss == "ipo":  # IPO compares per-token means (as TRL does)
            z = (mean_chosen - ref_chosen / chosen_tokens) - (mean_rejected - ref_rejected / rejected_tokens)
            losses = (z - 1 / (2 * beta)) ** 2
            reward_chosen = beta * (mean_chosen - ref_chosen / chosen_tokens).detach()
            reward_rejected = beta * (mean_rejected - ref_rejected / rejected_tokens).detach()
        else:
            z = (chosen - ref_chosen) - (rejected - ref_rejected)
            if opts.loss == "sigmoid":
                losses = -(1 - opts.label_smoothing) * F.logsigmoid(beta * z) - \
                    opts.label_smoothing * F.logsigmoid(-beta * z)
            else:  # hinge
                losses = torch.relu(1 - beta * z)
            reward_chosen, reward_rejected = beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()
    if opts.sft_weight:
        losses = losses - opts.sft_weight * mean_chosen
    metrics = {"rewards/chosen": reward_chosen, "rewards/rejected": reward_rejected,
               "rewards/margins": reward_chosen - reward_rejected,
               "pref_accuracy": (reward_chosen > reward_rejected).float(),
               "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()}
    return losses, metrics


# ---------------------------------------------------------------- the stage
@register
class DirectPreference(Objective):
    name = "dpo"
    options = DpoOptions
    nothing_left = "no preference pair is left after truncation"
    sequences_per_row = 2  # a pair's two sequences share a row of 2 x cutoff_len
    # fused_head (True): loop.sequence_logps takes each learned token's log-probability from the
    # fused head (head_loss.LinearTokenCrossEntropy), so the learned tokens' logits never exist in full
    eval_metrics = ("eval_loss", "eval_pref_accuracy", "eval_rewards/margins", "eval_rewards/chosen",
                    "eval_rewards/rejected", "eval_logps/chosen", "eval_logps/rejected")

    def __init__(self):
        self.reference_kind: Optional[str] = None  # resolved on each worker
        self.precomputed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # split -> (values, row starts)
        self.reference_model = None  # reference "model": the frozen copy (train/reference.py)

    # ---- checks
    @staticmethod
    def per_step_reference(method, method_opts) -> str:
        """The reference this method runs beside the policy in each step: the same model with its
        adapters off where it can be switched off, else a frozen copy."""
        return "adapter_disabled" if method.can_disable_adapters(method_opts) else "model"

    def reference_of(self, opts: DpoOptions, method, method_opts) -> Optional[str]:
        """The reference as the config reads before any data is seen (None: the loss needs none);
        `auto` as precomputed where the method allows it (a worker may still pick the per-step
        reference once it knows the run's size: choose_reference)."""
        if opts.loss in REFERENCE_FREE:
            return None
        if opts.reference != "auto":
            return opts.reference
        return "precomputed" if method.equals_base_at_init else self.per_step_reference(method, method_opts)

    def reference_forwards(self, opts, method, method_opts) -> int:
        return 0 if self.reference_of(opts, method, method_opts) in (None, "precomputed") else 1

    def frozen_model_copies(self, opts, method, method_opts) -> int:
        return 1 if self.reference_of(opts, method, method_opts) == "model" else 0  # train/reference.py

    def check_job(self, opts: DpoOptions, job) -> None:
        from rayft.methods import get_method

        method, method_opts = get_method(job.method.type), job.method.options
        if opts.label_smoothing and opts.loss != "sigmoid":
            raise ValueError(f"dpo.label_smoothing applies to the sigmoid loss only (dpo.loss={opts.loss})")
        if opts.loss in REFERENCE_FREE and opts.reference != "auto":
            raise ValueError(f"dpo.loss={opts.loss} uses no reference model; remove dpo.reference={opts.reference}")
        if method.extra_positions(method_opts):
            raise ValueError(f"stage dpo: method.type={job.method.type} puts virtual tokens at the start of each row, "
                             "and a DPO row holds both answers of a pair (the rejected one would have none)")
        reference = self.reference_of(opts, method, method_opts)
        if reference == "model" and method.output == "adapter":
            if opts.reference == "auto":
                raise ValueError(f"stage dpo with method.type={job.method.type}: the model differs from its base "
                                 "before training and its weights cannot be switched off, so no reference is "
                                 "available; use dpo.loss simpo or orpo, which need none")
            raise ValueError(f"dpo.reference=model with method.type={job.method.type}: an adapter method's "
                             "reference is its base with the adapter switched off (adapter_disabled, or auto)")
        if reference == "adapter_disabled" and not method.can_disable_adapters(method_opts):
            why = "its output is a whole model" if method.output == "model" else \
                "its weights cannot be switched off to give the base back"
            raise ValueError(f"dpo.reference=adapter_disabled with method.type={job.method.type}: {why}; "
                             "use precomputed (or auto)")
        if reference == "precomputed" and not method.equals_base_at_init:
            raise ValueError(f"dpo.reference=precomputed with method.type={job.method.type}: the model differs "
                             "from its base before the first step, so it cannot compute the base's log-probabilities")

    # ---- data
    def recognises(self, record: dict) -> bool:
        return "chosen" in record and "rejected" in record

    def parse(self, records, fmt, source, offset=0, problems=None):
        return parse_pairs(records, source, offset, problems)

    def row_length(self, cfg) -> int:
        return 2 * cfg.cutoff_len  # a pair's two sequences share a row

    def units(self, tokenizer, pairs, cfg, counts):
        units = []
        counts.setdefault("identical_pairs", 0)
        for prompt, chosen, rejected in pairs:
            sequences = None
            if chosen == rejected:
                counts["identical_pairs"] += 1  # nothing to prefer
            elif (sequences := tokenize_pair(tokenizer, prompt, chosen, rejected, cfg.cutoff_len)) is None:
                counts["dropped"] += 1
            else:
                counts["kept"] += 1
            units.append(sequences)
        return units

    def answer_issues(self, pair):
        _, chosen, rejected = pair
        issues = ["empty chosen or rejected answer"] if not (chosen.strip() and rejected.strip()) else []
        return issues + (["chosen equals rejected"] if chosen.strip() == rejected.strip() else [])

    def score_samples(self, tokenizer, pairs, cfg):
        """The chosen answer: after its prompt (cut from the left as training cuts it), and after
        the prompt's turns emptied."""
        scored = []
        for prompt, chosen, _ in pairs:
            bare = [{**m, "content": ""} for m in prompt]
            with_prompt = tokenize_pair(tokenizer, prompt, chosen, chosen, cfg.cutoff_len)
            without = tokenize_pair(tokenizer, bare, chosen, chosen, cfg.cutoff_len)
            scored.append((with_prompt[0], without[0]) if with_prompt and without else None)
        return scored

    # ---- on each worker
    def setup(self, opts, job, method, engine, data, rank, world, pad_id, device, reporter, resumed, model_dir) -> None:
        import torch.distributed as dist

        from rayft.models import base_fingerprint

        self.method = method  # its adapters are switched off for the reference
        fingerprint = base_fingerprint(model_dir)
        paths = {split: self._precomputed_path(data, split, job, fingerprint) for split in (0, 1)}
        present = [all(path.is_file() for path in paths.values())]
        dist.broadcast_object_list(present, src=0)  # rank 0 decides: another run may be writing them meanwhile
        self.reference_kind, why = self.choose_reference(opts, job, method, data, world, present[0], resumed)
        reporter.say(f"[rayft] dpo: loss {opts.loss}, beta {opts.beta:g}, reference "
                     f"{self.reference_kind or 'none (the loss needs none)'}" + (f" ({why})" if why else ""))
        if self.reference_kind == "precomputed":
            import time

            start = time.perf_counter()
            self.precomputed = {split: self._precompute(engine, data, split, job, rank, world, pad_id, device, resumed,
                                                        paths[split], present[0]) for split in (0, 1)}
            if not present[0]:  # a one-off cost that step times leave out (benchmarks/dpo_throughput.py adds it)
                reporter.say(f"[rayft] dpo: reference precomputed in {time.perf_counter() - start:.1f} s")
        elif self.reference_kind == "model":
            from rayft.train.reference import frozen_copy

            self.reference_model = frozen_copy(job, model_dir, device, world)

    def choose_reference(self, opts, job, method, data, world: int, precomputed_present: bool, resumed: bool
                         ) -> tuple[Optional[str], str]:
        """The reference of this run, and (for auto) why. Both candidates run the same forward pass
        (no gradients) over the same packed rows: precomputed over every training and validation
        row once before the first step (none at all when an earlier run on this data and base left
        them), the per-step reference over every row the run trains on and every evaluation's, so
        auto takes the one with fewer rows to run."""
        from rayft.data.dataset import RowFile, batches_per_epoch
        from rayft.train.schedule import StepPlan

        configured = self.reference_of(opts, method, job.method.options)
        per_step = self.per_step_reference(method, job.method.options)
        if opts.reference != "auto" or configured != "precomputed":
            return configured, ""
        if per_step == "model" and method.output == "adapter":
            return "precomputed", "auto: the only reference this method allows"
        if precomputed_present:
            return "precomputed", "auto: kept from an earlier run on this data and base, so no reference forward at all"
        if resumed:  # the first run chose the per-step reference (a precomputed one would be there)
            return per_step, "auto: no precomputed reference kept, and the model is no longer its base"
        train, mb = len(RowFile(data.train_file)), job.train.micro_batch_size
        val = len(RowFile(data.val_file))
        plan = StepPlan.build(job.train, batches_per_epoch(train, world, mb))
        evaluations = 1 + plan.total_steps // job.train.eval_steps + bool(plan.total_steps % job.train.eval_steps)
        once = train + val
        every_step = plan.total_steps * job.train.grad_accum * world * mb + evaluations * val
        counts = f"{once} rows once before training against {every_step} over the run's {plan.total_steps} steps " \
                 f"and {evaluations} evaluations with {per_step}"
        if once <= every_step:
            return "precomputed", f"auto: {counts}"
        return per_step, f"auto: {every_step} rows over the run's {plan.total_steps} steps and {evaluations} " \
                         f"evaluations against {once} to precompute"

    @staticmethod
    def _precomputed_path(data, split: int, job, fingerprint: str) -> Path:
        import hashlib
        import json

        # the model the reference comes from: the base as this method loads it (QLoRA's is 4-bit)
        loaded = hashlib.sha256(json.dumps({"method": job.method.type, "options": job.method.options.model_dump(
            mode="json")}, sort_keys=True).encode()).hexdigest()[:12]
        split_name = ("train", "val")[split]
        return Path(data.cache_dir) / f"reference-{fingerprint}-{job.train.precision}-{loaded}-{split_name}.safetensors"

    def _precompute(self, engine, data, split: int, job, rank, world, pad_id, device, resumed: bool, path: Path,
                    present: bool):
        """The base's per-sequence log-probabilities of every row of a split, kept beside the
        tokenized data (keyed by the base's fingerprint and the precision); computed by all ranks
        at once, each its share, before the first step (the model then equals its base)."""
        import torch.distributed as dist
        from safetensors.torch import load_file, save_file

        from rayft.data.dataset import RowFile
        from rayft.train.loop import eval_batches, sequence_logps

        split_name = ("train", "val")[split]
        if not present:
            if resumed:
                raise RuntimeError(f"{path}: the precomputed reference is gone, and a trained model cannot "
                                   "compute its base's log-probabilities; start the run again (--overwrite)")
            rows = RowFile(data.train_file if split_name == "train" else data.val_file)
            values: dict[int, list[float]] = {}
            engine.eval()
            with torch.no_grad():  # every rank runs as many passes (ZeRO-3 gathers collectively)
                for batch, counts in eval_batches(rows, job.train.micro_batch_size, rank, world, pad_id, device):
                    sums, _, row_of = sequence_logps(engine, batch, job.train.precision)
                    if counts:
                        per_row = torch.bincount(row_of, minlength=len(batch["row_index"])).tolist()
                        for index, part in zip(batch["row_index"].tolist(), sums.split(per_row)):
                            values[index] = part.tolist()
            engine.train()
            gathered = [None] * world
            dist.all_gather_object(gathered, values)
            merged = {i: v for part in gathered for i, v in part.items()}
            flat = [v for i in range(len(rows)) for v in merged[i]]
            starts = [0]
            for i in range(len(rows)):
                starts.append(starts[-1] + len(merged[i]))
            if rank == 0:
                staging = path.with_name(f".{path.name}.tmp-{rank}")
                save_file({"values": torch.tensor(flat, dtype=torch.float64), "starts": torch.tensor(starts)},
                          str(staging), metadata={"format": "pt"})
                staging.replace(path)
            dist.barrier()
        tensors = load_file(str(path))
        return tensors["values"].to(device), tensors["starts"]  # the starts are read on the host

    def loss(self, opts, model, batch, precision, method, method_opts):
        from rayft.train.loop import sequence_logps

        sums, tokens, row_of = sequence_logps(model, batch, precision)
        chosen, rejected = sums[0::2], sums[1::2]
        ref_chosen = ref_rejected = None
        if self.reference_kind is not None:
            reference = self._reference(model, batch, precision)
            ref_chosen, ref_rejected = reference[0::2], reference[1::2]
        losses, metrics = pair_losses(opts, chosen, rejected, tokens[0::2].to(sums.dtype), tokens[1::2].to(sums.dtype),
                                      ref_chosen, ref_rejected)
        if "row_weight" in batch:  # data.task_weights: each pair weighted by its row's task
            losses = losses * batch["row_weight"][row_of[0::2]]
        return losses.sum(), losses.new_full((), float(len(losses))), \
            {name: value.sum() for name, value in metrics.items()}

    def _reference(self, model, batch, precision) -> torch.Tensor:
        from rayft.train.loop import on_host, sequence_logps

        if self.reference_kind == "adapter_disabled":
            with torch.no_grad(), self.method.disabled_adapters(model):
                return sequence_logps(model, batch, precision)[0]
        if self.reference_kind == "model":
            with torch.no_grad():
                return sequence_logps(self.reference_model, batch, precision)[0]
        values, starts = self.precomputed[int(on_host(batch, "split_id"))]
        rows = on_host(batch, "row_index").tolist()
        return torch.cat([values[starts[i]:starts[i + 1]] for i in rows]).to(torch.float32)
