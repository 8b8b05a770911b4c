"""rayft DPO against TRL's DPOTrainer: pairs/s and real tokens/s, LoRA on SmolLM2-135M-Instruct.

    .venv/bin/pip install -e '.[bench]'      # trl (1.16.0), datasets
    .venv/bin/python benchmarks/dpo_throughput.py [--pairs 120] [--rounds 2] [--cutoff 256]

One invocation runs both sides, alternating, for --rounds rounds (a shared machine's speed
drifts), each side in a fresh child process whose whole process tree's memory is sampled (rayft's
includes the Ray instance it starts: GCS, raylet, its 2 training workers). Both sides get:
- the same base: the converted SmolLM2-135M-Instruct directory (rayft.models);
- the same preference data: the first --pairs pairs of the project's own set (what `rayft demo
  --data-only` writes as preferences.jsonl), through the model's chat template on both sides;
- LoRA r16, alpha 32, dropout 0, all linear layers; the sigmoid loss, beta 0.1, lr 2e-4, one epoch;
- the same precision: what rayft's `precision: auto` picks here (bf16 autocast where the CPU has
  native bf16, else fp32); TRL's `bf16` follows it;
- the same cutoff: --cutoff tokens per sequence (prompt + answer; no pair of this set reaches it);
- the same pairs per step on average: rayft packs pairs into rows of 2 x cutoff and steps over
  --rows rows per worker; TRL's batch is the nearest whole number of pairs to rayft's mean pairs
  per step (both printed);
- the reference each does best: rayft's `dpo.reference: auto` (it says which; for this run it
  precomputes); TRL with a peft model and no ref_model (the adapter disabled in each step) and
  with `precompute_ref_log_probs`, both tried in the first round, the faster kept.

Time: each side's optimizer steps (every one, the first too) plus its one-off reference
precompute (rayft reports it; TRL's `_precompute_ref_logps` is timed); model loading, Ray's
start, tokenization and rayft's before/after evaluations are outside on both sides. Pairs and real
(non-padding) tokens are counted from each side's own batches: rayft's packed rows of the
trained shards, TRL's collated attention masks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
LR, BETA = 2e-4, 0.1


# ---------------------------------------------------------------- rayft (child process)
def rayft_config(args, work: Path) -> dict:
    return {
        "name": "bench-dpo", "output_dir": str(work / "rayft"), "stage": "dpo",
        "model": {"name_or_path": args.model_dir},
        "method": {"type": "lora", "lora": LORA},
        "data": {"train": args.data, "cutoff_len": args.cutoff, "val_size": args.val_size},
        "dpo": {"beta": BETA, "loss": "sigmoid", "reference": "auto"},
        "train": {"epochs": 1, "micro_batch_size": args.rows, "lr": LR, "warmup_ratio": 0.0,
                  "logging_steps": 1, "eval_steps": 10_000, "save_steps": 10_000, "precision": args.precision},
        "distributed": {"num_workers": args.workers, "cpus_per_worker": 1, "zero_stage": 2},
        "tracking": {"mlflow_uri": f"sqlite:///{work / 'mlflow.db'}"},
    }


def pairs_in(row) -> int:
    return sum(1 for p in row["position_ids"] if p == 0) // 2  # a pair is two sequences


def rayft_rows_per_pair(args, work: Path) -> tuple[float, int]:
    """(mean pairs per packed training row, training rows) of rayft's prepared data."""
    from rayft.config import parse_config
    from rayft.data.dataset import RowFile, prepare_data

    cfg = parse_config(rayft_config(args, work))
    rows = RowFile(prepare_data(cfg.data, Path(args.model_dir), work / "datasets", cfg.train.seed, "dpo").train_file)
    counts = [pairs_in(row) for row in rows.rows(list(range(len(rows))))]
    return sum(counts) / len(counts), len(counts)


def run_rayft(args) -> dict:
    import io
    import re

    import ray

    from rayft.config import parse_config
    from rayft.data.dataset import RowFile, batches_per_epoch, prepare_data
    from rayft.models import rayft_home
    from rayft.train.loop import train_batches
    from rayft.train.schedule import StepPlan

    work = Path(args.work)
    cfg = parse_config(rayft_config(args, work))
    console = io.StringIO()
    metrics = run_training_quiet(cfg, console)
    ray.shutdown()
    text = console.getvalue()
    chosen = re.search(r"dpo: .*reference (\S+)(.*)", text)
    precompute = re.search(r"reference precomputed in ([0-9.]+) s", text)
    # the pairs of the rows each rank trained on (the shards are a fixed function of the seed)
    data = prepare_data(cfg.data, Path(args.model_dir), rayft_home() / "datasets", cfg.train.seed, "dpo")
    rows = RowFile(data.train_file)
    plan = StepPlan.build(cfg.train, batches_per_epoch(len(rows), args.workers, cfg.train.micro_batch_size))
    pairs = 0
    for rank in range(args.workers):
        for batch in train_batches(rows, plan, cfg, rank, args.workers, 0, 0, "cpu"):
            pairs += sum(pairs_in(row) for row in rows.rows(batch["row_index"].numpy()))
    precompute_s = float(precompute.group(1)) if precompute else 0.0
    seconds = metrics["train_seconds"] + precompute_s
    return {"pairs": pairs, "steps": metrics["steps"], "real_tokens": metrics["train_tokens"],
            "step_seconds": metrics["train_seconds"], "precompute_seconds": precompute_s,
            "pairs_per_s": pairs / seconds, "tokens_per_s": metrics["train_tokens"] / seconds,
            "reference": (chosen.group(1) + chosen.group(2)) if chosen else "?",
            "gradient_checkpointing": cfg.train.gradient_checkpointing}


def run_training_quiet(cfg, console):
    from rich.console import Console

    from rayft.train.runner import run_training

    return run_training(cfg, console=Console(file=console, width=400))


# ---------------------------------------------------------------- TRL (child process)
def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from rayft.data.formats import read_records

    torch.set_num_threads(args.workers)  # the cores rayft's workers get
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    records = read_records(Path(args.data))
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                  "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": r["rejected"]}]}
                                 for r in records[:args.train_pairs]])
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["alpha"],
                             lora_dropout=LORA["dropout"], target_modules="all-linear")

    class Clock(TrainerCallback):
        def __init__(self):
            self.step_start, self.seconds, self.steps = None, 0.0, 0

        def on_step_begin(self, *a, **k):
            self.step_start = time.perf_counter()

        def on_step_end(self, *a, **k):  # every step, the first too
            self.seconds += time.perf_counter() - self.step_start
            self.steps += 1

    class TimedDPOTrainer(DPOTrainer):
        precompute_seconds = 0.0

        def _precompute_ref_logps(self, *a, **k):
            start = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*a, **k)
            finally:
                TimedDPOTrainer.precompute_seconds += time.perf_counter() - start

    batches: list[tuple[int, int]] = []  # (pairs, real tokens) of each collated batch
    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, per_device_train_batch_size=args.trl_batch, gradient_accumulation_steps=1,
                           num_train_epochs=1, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0,
                           beta=BETA, loss_type=["sigmoid"], max_length=args.cutoff, bf16=args.precision == "bf16",
                           use_cpu=True, gradient_checkpointing=False, logging_steps=10_000, save_strategy="no",
                           report_to=[], dataloader_num_workers=0, precompute_ref_log_probs=args.trl_precompute,
                           seed=0)
        trainer = TimedDPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                  peft_config=peft_config, callbacks=[clock])
        collate = trainer.data_collator

        def counting(features):
            batch = collate(features)
            batches.append((batch["input_ids"].shape[0] // 2, int(batch["attention_mask"].sum())))
            return batch

        trainer.data_collator = counting  # after the precompute: only the training batches count
        trainer.train()
    trained = batches[:clock.steps]  # the dataloader may collate one batch ahead
    pairs, tokens = sum(p for p, _ in trained), sum(t for _, t in trained)
    seconds = clock.seconds + TimedDPOTrainer.precompute_seconds
    return {"pairs": pairs, "steps": clock.steps, "real_tokens": tokens, "step_seconds": clock.seconds,
            "precompute_seconds": TimedDPOTrainer.precompute_seconds, "pairs_per_s": pairs / seconds,
            "tokens_per_s": tokens / seconds,
            "reference": "precompute_ref_log_probs" if args.trl_precompute else "adapter disabled per step"}


# ---------------------------------------------------------------- the parent
def tree_rss(root) -> tuple[int, int]:
    """(summed, largest) resident bytes of a process and all its descendants."""
    import psutil

    total = largest = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            rss = process.memory_info().rss
        except psutil.Error:
            continue
        total, largest = total + rss, max(largest, rss)
    return total, largest


def run_side(side: str, args, extra: list[str], env: dict) -> dict:
    """One side in a child process; its result and its process tree's peak memory."""
    import psutil

    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        command = [sys.executable, __file__, "--side", side, "--result", result.name, *extra]
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        root = psutil.Process(child.pid)
        peak = [0, 0]
        log: list[str] = []
        reader = threading.Thread(target=lambda: log.extend(child.stdout), daemon=True)
        reader.start()
        while child.poll() is None:
            total, largest = tree_rss(root)
            peak = [max(peak[0], total), max(peak[1], largest)]
            time.sleep(0.2)
        reader.join()
        if child.returncode != 0:
            sys.exit(f"{side} failed (exit {child.returncode}):\n{''.join(log[-40:])}")
        outcome = json.loads(Path(result.name).read_text())
    outcome = {**outcome, "peak_rss_mib": round(peak[0] / 2 ** 20), "largest_process_rss_mib": round(peak[1] / 2 ** 20)}
    print(f"{side}: {json.dumps(outcome)}", flush=True)  # as it comes: a long invocation may be cut short
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=120, help="pairs of the preference set used (train + validation)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--rows", type=int, default=2, help="rayft: packed rows per worker per step")
    parser.add_argument("--workers", type=int, default=2, help="rayft's workers; TRL gets as many torch threads")
    parser.add_argument("--val-size", type=float, default=0.05, help="rayft's validation split (evaluated, untimed)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="default: what rayft's precision=auto picks")
    parser.add_argument("--trl-reference", choices=["try-both", "adapter-disabled", "precompute"], default="try-both",
                        help="TRL's reference: both tried in the first round and the faster kept (default), or one")
    # the child processes' arguments
    parser.add_argument("--side", choices=["rayft", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--train-pairs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--trl-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--trl-precompute", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        outcome = run_rayft(args) if args.side == "rayft" else run_trl(args)
        Path(args.result).write_text(json.dumps(outcome))
        return

    import torch

    from rayft.demo import write_preference_data
    from rayft.models import resolve_model_path
    from rayft.train.loop import resolve_precision

    precision = args.precision or resolve_precision("auto", torch.device("cpu"))
    model_dir = str(resolve_model_path("smollm2-135m-instruct"))
    with tempfile.TemporaryDirectory(prefix="rayft-dpo-bench-") as tmp:
        work = Path(tmp)
        full_set = write_preference_data(work / "preferences.jsonl")  # as `rayft demo --data-only` writes it
        data = work / "pairs.jsonl"
        data.write_text("".join(full_set.read_text().splitlines(keepends=True)[:args.pairs]))
        args.model_dir, args.data, args.precision = model_dir, str(data), precision
        pairs_per_row, train_rows = rayft_rows_per_pair(args, work)
        # rayft trains on whole micro-batches of each rank's shard; its validation split stays out
        rayft_pairs_per_step = pairs_per_row * args.rows * args.workers
        trl_batch = max(1, round(rayft_pairs_per_step))
        train_pairs = round(train_rows * pairs_per_row)  # TRL trains on as many pairs as rayft's training split
        common = ["--model-dir", model_dir, "--data", str(data), "--cutoff", str(args.cutoff), "--rows",
                  str(args.rows), "--workers", str(args.workers), "--val-size", str(args.val_size), "--precision",
                  precision, "--train-pairs", str(train_pairs), "--trl-batch", str(trl_batch)]
        print(f"precision {precision}; rayft: {pairs_per_row:.2f} pairs per packed row, {args.rows} rows x "
              f"{args.workers} workers = {rayft_pairs_per_step:.1f} pairs per step; TRL: {trl_batch} pairs per step, "
              f"{train_pairs} training pairs; load average {os.getloadavg()}", flush=True)
        rounds = []
        trl_precompute = {"try-both": None, "adapter-disabled": 0, "precompute": 1}[args.trl_reference]
        for index in range(args.rounds):
            env = {**os.environ, "RAYFT_HOME": str(work / f"home{index}")}  # no precomputed reference kept
            env.pop("RAY_ADDRESS", None)
            (work / f"home{index}").mkdir()  # the model is passed by its directory: nothing else to share
            result: dict = {"load_average_1m": round(os.getloadavg()[0], 1)}
            if trl_precompute is None:  # the first round tries both of TRL's references
                tried = {flag: run_side("trl", args, [*common, "--trl-precompute", str(flag)], env)
                         for flag in (0, 1)}
                trl_precompute = max(tried, key=lambda flag: tried[flag]["pairs_per_s"])
                result["trl_tried"] = {tried[f]["reference"]: round(tried[f]["pairs_per_s"], 3) for f in tried}
                trl = tried[trl_precompute]
            else:
                trl = run_side("trl", args, [*common, "--trl-precompute", str(trl_precompute)], env)
            rayft = run_side("rayft", args, [*common, "--work", str(work / f"round{index}")], env)
            result.update(rayft=rayft, trl=trl, ratio_pairs_per_s=round(rayft["pairs_per_s"] / trl["pairs_per_s"], 2),
                          ratio_tokens_per_s=round(rayft["tokens_per_s"] / trl["tokens_per_s"], 2))
            rounds.append(result)
            print(f"round {index + 1}: {json.dumps(result)}", flush=True)
    summary = {
        "median_ratio_pairs_per_s": statistics.median(r["ratio_pairs_per_s"] for r in rounds),
        "median_ratio_tokens_per_s": statistics.median(r["ratio_tokens_per_s"] for r in rounds),
        **{f"median_{side}_{key}": round(statistics.median(r[side][key] for r in rounds), 2)
           for side in ("rayft", "trl") for key in ("pairs_per_s", "tokens_per_s", "peak_rss_mib")},
        "precision": precision, "cutoff": args.cutoff, "pairs": args.pairs, "rounds": args.rounds,
        "cpus": os.cpu_count(), "load_average_after": os.getloadavg(),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
