"""rayft's data preparation against Hugging Face `datasets.map`, at scale: rows per second and
peak memory.

    .venv/bin/python benchmarks/prepare_scale.py [--rows 100000 1000000] [--cutoff 512]

For each size, one invocation generates that many alpaca-size records (instruction ~20 words,
input ~30, output ~80, as in the Alpaca set) as JSONL, then prepares them both ways, each in its
own child process, while this process samples the resident memory of the child and all its
children (worker processes included) every 50 ms:
  - rayft: prepare_data as `rayft train` runs it: streaming, worker processes on every core, the
    SmolLM2 chat template, the assistant-only loss mask, packing into rows of --cutoff tokens,
    Arrow files.
  - baseline: `datasets.load_dataset("json")` and a batched `.map` on every core (num_proc =
    cores) that renders each record with the same tokenizer's chat template and masks the prompt
    the usual way (the prompt tokenized alone; its length masked in the full sequence); no
    packing. Its cache goes to a temporary directory and is not reused.
Both read the same file and use the same tokenizer. Rows/s counts input records per second of
wall time (the child's own clock, from reading the file to the finished Arrow files).

Needs `datasets` (pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

WORDS = ("the of and to in is was for on that with as by at from data model answer question city person "
         "number list write explain short long first last because which where when how what").split()


def write_records(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    with open(path, "w") as out:
        for _ in range(n):
            out.write(json.dumps({"instruction": words(rng.randint(10, 30)), "input": words(rng.randint(0, 60)),
                                  "output": words(rng.randint(40, 120))}) + "\n")


def run_rayft(data: Path, cutoff: int, work: Path) -> dict:
    from rayft.config import DataConfig
    from rayft.data.dataset import prepare_data
    from rayft.models import resolve_model_path

    model_dir = resolve_model_path("smollm2-135m-instruct")
    start = time.perf_counter()
    prepared = prepare_data(DataConfig(train=str(data), cutoff_len=cutoff, val_size=0.01), model_dir, work, seed=0)
    return {"seconds": time.perf_counter() - start, "samples": prepared.train_samples, "rows": prepared.train_rows}


def run_baseline(data: Path, cutoff: int, work: Path) -> dict:
    import datasets
    from transformers import AutoTokenizer

    from rayft.models import resolve_model_path

    tokenizer_dir = str(resolve_model_path("smollm2-135m-instruct"))
    datasets.disable_progress_bars()

    def tokenize(batch):
        tokenizer = tokenize.tokenizer = getattr(tokenize, "tokenizer", None) or AutoTokenizer.from_pretrained(
            tokenizer_dir)
        input_ids, labels = [], []
        for instruction, extra, output in zip(batch["instruction"], batch["input"], batch["output"]):
            prompt = [{"role": "user", "content": instruction + (f"\n\n{extra}" if extra else "")}]
            prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True)["input_ids"]
            ids = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": output}], tokenize=True,
                                                return_dict=True)["input_ids"][:cutoff]
            input_ids.append(ids)
            labels.append([-100] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids):])
        return {"input_ids": input_ids, "labels": labels}

    start = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(work / "hf"))
    dataset = dataset.map(tokenize, batched=True, batch_size=1000, num_proc=os.cpu_count(),
                          remove_columns=dataset.column_names, load_from_cache_file=False)
    return {"seconds": time.perf_counter() - start, "samples": len(dataset), "rows": len(dataset)}


def measured(kind: str, data: Path, cutoff: int) -> dict:
    """The child's result, and the peak of its process tree's resident memory."""
    import psutil

    with tempfile.TemporaryDirectory(prefix=f"prepare-{kind}-") as work:
        child = subprocess.Popen([sys.executable, __file__, "--child", kind, "--data", str(data),
                                  "--cutoff", str(cutoff), "--work", work], stdout=subprocess.PIPE, text=True)
        peak = [0]

        def sample() -> None:
            process = psutil.Process(child.pid)
            while child.poll() is None:
                try:
                    tree = [process, *process.children(recursive=True)]
                    peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree if p.is_running()))
                except psutil.Error:
                    pass
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out, _ = child.communicate()
        sampler.join()
        if child.returncode != 0:
            raise SystemExit(f"{kind} failed (exit {child.returncode})")
        return {**json.loads(out.strip().splitlines()[-1]), "peak_gb": peak[0] / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--cutoff", type=int, default=512)
    parser.add_argument("--child", choices=["rayft", "baseline"])
    parser.add_argument("--data")
    parser.add_argument("--work")
    args = parser.parse_args()
    if args.child:
        run = run_rayft if args.child == "rayft" else run_baseline
        print(json.dumps(run(Path(args.data), args.cutoff, Path(args.work))))
        return
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise SystemExit("benchmarks/prepare_scale.py needs datasets: .venv/bin/pip install -e '.[bench]'") from None
    print(f"{os.cpu_count()} cores; cutoff {args.cutoff}; rows/s = input records per second of wall time")
    print(f"{'records':>9} {'rayft rows/s':>13} {'peak GB':>8} {'datasets.map rows/s':>20} {'peak GB':>8} {'ratio':>6}")
    with tempfile.TemporaryDirectory(prefix="prepare-scale-") as tmp:
        for n in args.rows:
            data = Path(tmp) / f"records-{n}.jsonl"
            write_records(data, n)
            ours, theirs = measured("rayft", data, args.cutoff), measured("baseline", data, args.cutoff)
            ours_rate, their_rate = n / ours["seconds"], n / theirs["seconds"]
            print(f"{n:>9} {ours_rate:>13.0f} {ours['peak_gb']:>8.2f} {their_rate:>20.0f} {theirs['peak_gb']:>8.2f} "
                  f"{ours_rate / their_rate:>6.2f}", flush=True)
            data.unlink()


if __name__ == "__main__":
    main()
