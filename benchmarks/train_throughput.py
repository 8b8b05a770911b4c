"""rayft LoRA SFT throughput against two baselines: a plain Hugging Face Trainer + peft LoRA, and
LLaMA-Factory with neat packing.

    .venv/bin/python benchmarks/train_throughput.py [--steps 30] [--rounds 3] [--precision bf16]
    .venv/bin/python benchmarks/train_throughput.py --baselines hf      # without LLaMA-Factory

One invocation runs all three, alternating, for --rounds rounds, on the same model directory
(the converted SmolLM2-135M-Instruct), the same data rows (the demo's extraction task, alpaca
style), the same sequence length, per-device batch, LoRA settings (r=16, alpha 32, all linear
layers) and precision, and prints real-token throughputs (padding excluded) and rayft's ratio
to each baseline for every round, the median ratios, and the model FLOPs utilisation of rayft
and of LLaMA-Factory against a matmul peak measured here in the same precision. Rounds
alternate because a shared machine's speed drifts by several per cent.

Baselines:
- hf: transformers.Trainer, one process using every core, dynamic padding to the longest
  sample of each batch (DataCollatorForSeq2Seq), loss on the assistant tokens only.
- lf: LLaMA-Factory 0.9.5 (`packing: true, neat_packing: true, template: smollm2`), one process
  using every core, in its own virtual environment (benchmarks/llamafactory_baseline.py creates
  it under .bench/ on first use; its pins conflict with rayft's).

On a GPU (--device cuda, the default where torch sees one; benchmarks/gpu_check.sh runs it so):
rayft runs one Ray Train worker per GPU, LLaMA-Factory runs FlashAttention-2 where flash-attn
is installed in its environment (gpu_bundle.py packs benchmarks/flash_attn_shim, a stand-in over
torch's kernel; LF then takes one packed row of cutoff x batch tokens per step, see
llamafactory_baseline.lf_arguments), else sdpa (the summary says which ran), and the peak is an
8192^3 matmul timed with CUDA events. LLaMA-Factory's last 5 steps end with a synchronize (rayft's
loop reads its logging window's sums back before the window's clock stops), so neither side's
time leaves GPU work queued.

Real tokens are each side's non-padding tokens of the rows it trains on, counted from its own
tokenized rows: rayft's packed rows' lengths; the HF collator's attention mask; LLaMA-Factory's
packed rows' non-zero attention-mask entries (see lf_worker.py). Every step is timed on every
side, the first too. rayft and the HF baseline tokenize with the same code; LLaMA-Factory with
its own template, so the tokens per sample of both are printed.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import llamafactory_baseline  # noqa: E402
from rayft.config import parse_config  # noqa: E402
from rayft.demo import write_demo_data  # noqa: E402
from rayft.models import resolve_model_path  # noqa: E402


def matmul_peak_flops(dtype: torch.dtype, threads: int, device: str = "cpu") -> float:
    """The best of several timings: a peak, not an average over the machine's noise."""
    if device == "cuda":  # large enough to fill the GPU; timed with CUDA events after a warm-up
        a, b = (torch.randn(8192, 8192, dtype=dtype, device="cuda") for _ in range(2))
        for _ in range(3):
            a @ b
        best = float("inf")
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        return 2 * 8192 ** 3 / best
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


def run_rayft(data_path: Path, work: Path, args, compile_layers: bool = False) -> dict:  # rayft's defaults where not set
    import ray

    from rayft.train.runner import run_training

    work.mkdir(parents=True, exist_ok=True)
    cfg = parse_config({
        "name": "bench-rayft", "output_dir": str(work / "rayft"),
        "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "data": {"train": str(data_path), "cutoff_len": args.cutoff, "packing": True, "val_size": 0.05},
        "train": {"max_steps": args.steps, "micro_batch_size": args.batch, "lr": 2e-4,
                  "eval_steps": 10_000, "save_steps": 10_000, "precision": args.precision,
                  "compile": compile_layers},
        "distributed": {"num_workers": args.workers, "cpus_per_worker": args.cpus_per_worker, "zero_stage": 2,
                        "use_gpu": args.device == "cuda"},
        "tracking": {"mlflow_uri": f"sqlite:///{work / 'mlflow.db'}"},
    })
    metrics = run_training(cfg)  # tokens_per_s: real tokens over step time, every step counted
    ray.shutdown()  # the baseline's next round gets the machine without an idle Ray instance on it
    # and the last logging window's (5 steps): the speed once any compilation is done
    import mlflow

    history = mlflow.MlflowClient(cfg.tracking.mlflow_uri).get_metric_history(
        metrics["mlflow_run_id"], "tokens_per_s")
    last = max(history, key=lambda m: m.step).value
    return {"tokens_per_s": metrics["tokens_per_s"], "last_window_tokens_per_s": last, "steps": metrics["steps"]}


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
                                                 save_strategy="no", report_to=[], use_cpu=args.device == "cpu",
                                                 bf16=args.precision == "bf16", dataloader_num_workers=0,
                                                 remove_unused_columns=False))
        trainer.train()
    tokens = sum(clock.batches[:args.steps])  # the dataloader may prefetch past the last step
    return {"tokens_per_s": tokens / clock.seconds, "steps": args.steps,
            "real_tokens_per_sample": sum(len(s.input_ids) for s in samples) / len(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="default: cuda where torch sees a GPU (then one worker per GPU), else cpu")
    parser.add_argument("--rows", type=int, default=2000, help="training rows (the demo's extraction task)")
    parser.add_argument("--workers", type=int, help="rayft's Ray Train workers (default: 2 on CPU, 1 per GPU)")
    parser.add_argument("--cpus-per-worker", type=float, default=1, help="torch threads per worker follow it")
    parser.add_argument("--precision", choices=["fp32", "bf16"],
                        help="default: what rayft's precision=auto picks on the device (bf16 where it has native bf16)")
    parser.add_argument("--compile", action="store_true",
                        help="also run rayft with train.compile (compiled decoder layers) in every round; the "
                             "baselines stay as they are")
    parser.add_argument("--baselines", nargs="+", choices=["hf", "lf"], default=["hf", "lf"],
                        help="hf: plain Trainer + peft, padding; lf: LLaMA-Factory, neat packing")
    args = parser.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.workers is None:
        args.workers = torch.cuda.device_count() if args.device == "cuda" else 2
    if args.precision is None:
        from rayft.train.loop import resolve_precision

        args.precision = resolve_precision("auto", torch.device(args.device))

    model_dir = resolve_model_path("smollm2-135m-instruct")
    if "lf" in args.baselines:
        llamafactory_baseline.ensure_venv()  # before any timing: the first use installs it
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    # the peak before the rounds and after them (the better of both): a measurement taken while
    # the machine is busy (say, a Ray instance still shutting down) would inflate the MFU
    peak_before = matmul_peak_flops(dtype, os.cpu_count(), args.device)
    print(f"matmul peak before the rounds: {peak_before / 1e9:.1f} GFLOP/s ({args.precision}); model FLOPs per "
          f"LoRA token: {lora_flops_per_token(model_dir) / 1e9:.3f} G", flush=True)
    rounds, tokens_per_sample = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_path = write_demo_data(work / "people.jsonl", n=args.rows)
        for index in range(args.rounds):
            result = {}
            if "hf" in args.baselines:
                hf = run_hf_baseline(data_path, model_dir, args)
                result["hf_trainer_tokens_per_s"] = round(hf["tokens_per_s"], 1)
                tokens_per_sample["rayft_and_hf"] = round(hf["real_tokens_per_sample"], 1)
            if "lf" in args.baselines:
                lf = llamafactory_baseline.run_llamafactory(data_path, model_dir, work / f"lf{index}", args)
                result["llamafactory_tokens_per_s"] = round(lf["tokens_per_s"], 1)
                result["llamafactory_last_5_steps_tokens_per_s"] = round(lf["last_5_steps_tokens_per_s"], 1)
                tokens_per_sample["llamafactory"] = round(lf["real_tokens_per_sample"], 1)
                tokens_per_sample["llamafactory_tokens_per_packed_row"] = round(lf["real_tokens_per_row"], 1)
                tokens_per_sample["llamafactory_base_dtype"] = lf["base_dtype"]
                tokens_per_sample["llamafactory_attention"] = lf.get("attention")
            plain = run_rayft(data_path, work / f"round{index}", args)
            rayft = plain["tokens_per_s"]
            result["rayft_tokens_per_s"] = round(rayft, 1)
            result["rayft_last_5_steps_tokens_per_s"] = round(plain["last_window_tokens_per_s"], 1)
            if args.compile:
                compiled = run_rayft(data_path, work / f"round{index}-compiled", args, compile_layers=True)
                result["rayft_compiled_tokens_per_s"] = round(compiled["tokens_per_s"], 1)
                result["compiled_over_plain"] = round(compiled["tokens_per_s"] / rayft, 2)
                result["rayft_compiled_last_5_steps_tokens_per_s"] = round(compiled["last_window_tokens_per_s"], 1)
                result["compiled_over_plain_last_5_steps"] = round(
                    compiled["last_window_tokens_per_s"] / plain["last_window_tokens_per_s"], 2)
                if "lf" in args.baselines:
                    result["ratio_lf_compiled"] = round(compiled["tokens_per_s"] / result["llamafactory_tokens_per_s"], 2)
            if "hf" in args.baselines:
                result["ratio_hf"] = round(rayft / result["hf_trainer_tokens_per_s"], 2)
            if "lf" in args.baselines:
                result["ratio_lf"] = round(rayft / result["llamafactory_tokens_per_s"], 2)
                result["ratio_lf_last_5_steps"] = round(
                    plain["last_window_tokens_per_s"] / result["llamafactory_last_5_steps_tokens_per_s"], 2)
            rounds.append(result)
            print(f"round {index + 1}: {json.dumps(rounds[-1])}", flush=True)
    peak = max(peak_before, matmul_peak_flops(dtype, os.cpu_count(), args.device))
    flops_per_token = lora_flops_per_token(model_dir)

    def median(key):
        return statistics.median(r[key] for r in rounds)

    summary = {"rounds": rounds}
    for key in ("ratio_hf", "ratio_lf", "hf_trainer_tokens_per_s", "llamafactory_tokens_per_s", "rayft_tokens_per_s",
                "rayft_compiled_tokens_per_s", "compiled_over_plain", "ratio_lf_compiled",
                "rayft_last_5_steps_tokens_per_s", "rayft_compiled_last_5_steps_tokens_per_s",
                "compiled_over_plain_last_5_steps", "llamafactory_last_5_steps_tokens_per_s",
                "ratio_lf_last_5_steps"):
        if key in rounds[0]:
            summary[f"median_{key}"] = median(key)
    summary["rayft_mfu"] = round(median("rayft_tokens_per_s") * flops_per_token / peak, 3)
    if args.compile:
        summary["rayft_compiled_mfu"] = round(median("rayft_compiled_tokens_per_s") * flops_per_token / peak, 3)
    if "lf" in args.baselines:
        summary["llamafactory_mfu"] = round(median("llamafactory_tokens_per_s") * flops_per_token / peak, 3)
    summary.update({"matmul_peak_gflops": round(peak / 1e9, 1), "real_tokens_per_sample": tokens_per_sample,
                    "precision": args.precision, "cutoff": args.cutoff, "batch": args.batch,
                    "workers": args.workers, "cpus_per_worker": args.cpus_per_worker, "steps": args.steps,
                    "rows": args.rows, "cpus": os.cpu_count(), "device": args.device,
                    "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None})
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
