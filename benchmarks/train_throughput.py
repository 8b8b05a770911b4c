"""rayft LoRA SFT throughput against a plain Hugging Face Trainer + peft LoRA baseline.

    .venv/bin/python benchmarks/train_throughput.py [--steps 30] [--rounds 3] [--precision bf16]

One invocation runs both, alternating, for --rounds rounds, on the same model
(SmolLM2-135M-Instruct), the same data (the demo's extraction task), the same sequence length,
per-device batch, LoRA settings and precision, and prints real-token throughputs (padding excluded) and their ratio for every round, the median
ratio, and rayft's model FLOPs utilisation against a matmul peak measured here in the same
precision. Rounds alternate because a shared machine's speed drifts by several per cent.

Baseline: transformers.Trainer, one process using every core, dynamic padding to the longest
sample of each batch (DataCollatorForSeq2Seq), loss on the assistant tokens only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rayft.config import parse_config  # noqa: E402
from rayft.demo import write_demo_data  # noqa: E402
from rayft.models import resolve_model_path  # noqa: E402


def matmul_peak_flops(dtype: torch.dtype, threads: int) -> float:
    """The best of several timings: a peak, not an average over the machine's noise."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 3 * 2 * 2048 ** 3 / best


def lora_flops_per_token(model_dir: Path) -> float:
    """Model FLOPs of one LoRA training token: 4 per weight (forward 2, input gradient 2; the
    frozen weights get no weight gradient, the adapter's are negligible), with the LM head
    counted on every token as a plain implementation computes it. rayft skips the head where
    no token is learned, so this is the work a standard model needs, not what rayft runs."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i
    return 4.0 * (layers * per_layer + h * cfg.vocab_size)


def run_rayft(data_path: Path, work: Path, args) -> dict:  # rayft's own defaults where not set here
    import ray

    from rayft.train.runner import run_training

    work.mkdir(parents=True, exist_ok=True)
    cfg = parse_config({
        "name": "bench-rayft", "output_dir": str(work / "rayft"),
        "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "data": {"train": str(data_path), "cutoff_len": args.cutoff, "packing": True, "val_size": 0.05},
        "train": {"max_steps": args.steps, "micro_batch_size": args.batch, "lr": 2e-4,
                  "eval_steps": 10_000, "save_steps": 10_000, "precision": args.precision},
        "distributed": {"num_workers": args.workers, "cpus_per_worker": args.cpus_per_worker, "zero_stage": 2},
        "tracking": {"mlflow_uri": f"sqlite:///{work / 'mlflow.db'}"},
    })
    metrics = run_training(cfg)  # tokens_per_s: real tokens over step time, every step counted
    ray.shutdown()  # the baseline's next round gets the machine without an idle Ray instance on it
    return {"tokens_per_s": metrics["tokens_per_s"], "steps": metrics["steps"]}


def run_hf_baseline(data_path: Path, model_dir: Path, args) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)

    from rayft.data.formats import read_records, to_messages
    from rayft.data.tokenize import tokenize_conversation

    torch.set_num_threads(os.cpu_count())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    conversations = to_messages(read_records(data_path), "auto", str(data_path))
    samples = [tokenize_conversation(tokenizer, m, args.cutoff, False) for m in conversations]
    dataset = [{"input_ids": s.input_ids, "labels": s.labels, "attention_mask": [1] * len(s.input_ids)} for s in samples]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules="all-linear"))

    class Clock(TrainerCallback):
        def __init__(self):
            self.step_start, self.seconds, self.batches = None, 0.0, []

        def on_step_begin(self, *a, **k):
            self.step_start = time.perf_counter()

        def on_step_end(self, *a, **k):  # every step counted, the first too, as for rayft
            self.seconds += time.perf_counter() - self.step_start

    clock = Clock()
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def counting_collator(features):
        batch = collator(features)
        clock.batches.append(int(batch["attention_mask"].sum()))
        return batch

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model=model, train_dataset=dataset, data_collator=counting_collator, callbacks=[clock],
                          args=TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch,
                                                 max_steps=args.steps, learning_rate=2e-4, logging_steps=1000,
                                                 save_strategy="no", report_to=[], use_cpu=True,
                                                 bf16=args.precision == "bf16", dataloader_num_workers=0,
                                                 remove_unused_columns=False))
        trainer.train()
    tokens = sum(clock.batches[:args.steps])  # the dataloader may prefetch past the last step
    return {"tokens_per_s": tokens / clock.seconds, "steps": args.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=1, help="torch threads per worker follow it")
    parser.add_argument("--precision", choices=["fp32", "bf16"],
                        help="default: what rayft's precision=auto picks here (bf16 where the CPU has native bf16)")
    args = parser.parse_args()
    if args.precision is None:
        from rayft.train.loop import resolve_precision

        args.precision = resolve_precision("auto", torch.device("cpu"))

    model_dir = resolve_model_path("smollm2-135m-instruct")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    # the peak before the rounds and after them (the better of both): a measurement taken while
    # the machine is busy (say, a Ray instance still shutting down) would inflate the MFU
    peak_before = matmul_peak_flops(dtype, os.cpu_count())
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_path = write_demo_data(work / "people.jsonl", n=2000)
        for index in range(args.rounds):
            baseline = run_hf_baseline(data_path, model_dir, args)["tokens_per_s"]
            rayft = run_rayft(data_path, work / f"round{index}", args)["tokens_per_s"]
            rounds.append({"baseline_hf_trainer_tokens_per_s": round(baseline, 1), "rayft_tokens_per_s": round(rayft, 1),
                           "ratio": round(rayft / baseline, 2)})
            print(f"round {index + 1}: {json.dumps(rounds[-1])}", flush=True)
    peak = max(peak_before, matmul_peak_flops(dtype, os.cpu_count()))
    median_rayft = statistics.median(r["rayft_tokens_per_s"] for r in rounds)
    mfu = median_rayft * lora_flops_per_token(model_dir) / peak
    print(json.dumps({"rounds": rounds, "median_ratio": statistics.median(r["ratio"] for r in rounds),
                      "median_baseline_tokens_per_s": statistics.median(r["baseline_hf_trainer_tokens_per_s"] for r in rounds),
                      "median_rayft_tokens_per_s": median_rayft,
                      "rayft_mfu": round(mfu, 3), "matmul_peak_gflops": round(peak / 1e9, 1),
                      "precision": args.precision, "cutoff": args.cutoff, "batch": args.batch,
                      "workers": args.workers, "cpus_per_worker": args.cpus_per_worker, "steps": args.steps, "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
