"""LLaMA-Factory as a training-throughput baseline, in its own virtual environment.

    .venv/bin/python benchmarks/llamafactory_baseline.py --setup      # create the venv and check it

LLaMA-Factory 0.9.5 pins transformers 5.6, peft 0.18.1 and trl 0.24, which conflict with
rayft's pins, so it lives in `.bench/llamafactory/venv` (git-ignored), created on first use:
torch 2.13.0 (the CPU wheel) first, then the pinned llamafactory. `run_llamafactory` writes an
LF dataset (`dataset_info.json` + the rows), a training YAML, runs `llamafactory-cli train` with
a callback that times every optimizer step, and counts real tokens from the packed rows LF itself
tokenized (see `lf_worker.py`). On a GPU LF runs FlashAttention-2 where flash-attn is installed in its
environment (the GPU bundle brings `flash_attn_shim/`, a stand-in over torch's own kernel).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LF_VERSION = "0.9.5"
TORCH_VERSION = "2.13.0"
VENV = ROOT / ".bench" / "llamafactory" / "venv"
LF_PYTHON = VENV / "bin" / "python"
LF_CLI = VENV / "bin" / "llamafactory-cli"
# A host without registry access (benchmarks/gpu_check.sh) brings LLaMA-Factory as a site folder
# instead: a Python to run it with, and the folder put first on that Python's path.
PREPARED_PYTHON, PREPARED_PATH = os.environ.get("RAYFT_BENCH_LF_PYTHON"), os.environ.get("RAYFT_BENCH_LF_PATH")


def lf_python() -> str:
    return PREPARED_PYTHON or str(LF_PYTHON)


def ensure_venv(log=print) -> Path:
    """Create LF's venv on first use; afterwards only check it imports and its CLI answers."""
    if PREPARED_PYTHON:
        check = subprocess.run([PREPARED_PYTHON, "-c", "import llamafactory; print(llamafactory.__version__)"],
                               capture_output=True, text=True, env=lf_env())
        if check.returncode != 0 or check.stdout.strip() != LF_VERSION:
            raise RuntimeError(f"llamafactory on {PREPARED_PATH} does not import as {LF_VERSION}: "
                               f"{check.stderr[-2000:]}")
        return Path(PREPARED_PATH or "")
    marker = VENV / f".ready-{LF_VERSION}"
    if not marker.exists():
        log(f"creating {VENV} (torch=={TORCH_VERSION}, then llamafactory=={LF_VERSION}); this takes minutes")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        pip = [str(LF_PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        # torch first: the CPU wheel lies on this machine's disk; a bare requirement pulls CUDA builds
        subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
        # torch stays pinned: LF's torchaudio/torchvision requirements would otherwise pull a newer
        # (CUDA) torch with its nvidia-* wheels
        subprocess.run([*pip, f"torch=={TORCH_VERSION}", f"llamafactory=={LF_VERSION}"], check=True)
        replace_audio_and_vision()
    check = subprocess.run([str(LF_PYTHON), "-c", "import llamafactory; print(llamafactory.__version__)"],
                           capture_output=True, text=True)
    if check.returncode != 0 or check.stdout.strip() != LF_VERSION:
        raise RuntimeError(f"llamafactory in {VENV} does not import as {LF_VERSION}: {check.stderr[-2000:]}")
    version = subprocess.run([str(LF_CLI), "version"], capture_output=True, text=True, env=lf_env())
    if version.returncode != 0:
        raise RuntimeError(f"llamafactory-cli version failed: {version.stderr[-2000:]}")
    marker.touch()
    return VENV


TORCHAUDIO_STUB = '''"""A stand-in for torchaudio in the benchmark's LLaMA-Factory environment.

No torchaudio release on PyPI is built against torch 2.13 (the newest, 2.11.1, fails to load
its library), and LLaMA-Factory 0.9.5 imports torchaudio at module level (data/mm_plugin.py)
for audio inputs only. Text fine-tuning never calls it; anything that does fails loudly here.
"""


def __getattr__(name):
    raise ImportError(f"torchaudio.{name}: torchaudio is a stub in this environment (no build for torch 2.13)")
'''


def replace_audio_and_vision() -> None:
    """PyPI's torchvision and torchaudio wheels do not load against the CPU torch 2.13 wheel
    (torchvision: `operator torchvision::nms does not exist`); LLaMA-Factory's text path needs
    neither, and transformers only uses torchvision where it is importable. torchvision goes;
    torchaudio becomes the stub above."""
    subprocess.run([str(LF_PYTHON), "-m", "pip", "uninstall", "--yes", "--quiet", "torchvision", "torchaudio"],
                   check=True)
    site = subprocess.run([str(LF_PYTHON), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stub = Path(site) / "torchaudio"
    stub.mkdir(exist_ok=True)
    (stub / "__init__.py").write_text(TORCHAUDIO_STUB)


def lf_env(threads: int | None = None, device: str = "cpu") -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(DISABLE_VERSION_CHECK="1", WANDB_DISABLED="true",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PATH=f"{VENV / 'bin'}:{env.get('PATH', '')}")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if PREPARED_PATH:
        env["PYTHONPATH"] = PREPARED_PATH
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def write_dataset(data_path: Path, dataset_dir: Path) -> str:
    """LF's dataset_info.json for the benchmark's alpaca-style rows (instruction, input, output)."""
    dataset_dir.mkdir(parents=True, exist_ok=True)
    (dataset_dir / "rows.jsonl").write_text(Path(data_path).read_text())
    info = {"bench": {"file_name": "rows.jsonl", "formatting": "alpaca",
                      "columns": {"prompt": "instruction", "query": "input", "response": "output"}}}
    (dataset_dir / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return "bench"


def flash_attn_version(device: str) -> str | None:
    """The version of the flash-attn distribution installed where LF's Python looks (on the GPU
    host: benchmarks/flash_attn_shim, gpu_bundle.py packs it), or None."""
    found = subprocess.run([lf_python(), "-c", "import importlib.metadata as m; print(m.version('flash-attn'))"],
                           capture_output=True, text=True, env=lf_env(device=device))
    return found.stdout.strip() if found.returncode == 0 else None


def lf_arguments(model_dir: Path, dataset_dir: Path, output_dir: Path, args, threads: int,
                 flash_attention: bool = False) -> dict:
    """The benchmark's settings in LF's own terms (what a `llamafactory-cli train` YAML holds).
    `flash_attention` (on a GPU where flash-attn is installed): FlashAttention-2, with which LF's
    neat packing runs varlen attention; LF then takes one packed row per step (its collator
    asserts it), so the row holds what `batch` rows of `cutoff` would (cutoff x batch tokens) and a
    step trains on as many tokens as rayft's. LF's cutoff also truncates (and drops) samples, so
    this would keep samples longer than `cutoff` that rayft cuts; the benchmark's rows (~100
    tokens) have none. Otherwise sdpa under LF's block-diagonal 4D mask, `batch` rows of `cutoff`.
    lf_worker.py records which attention ran."""
    on_gpu = getattr(args, "device", "cpu") == "cuda"
    rows, cutoff = (1, args.cutoff * args.batch) if flash_attention else (args.batch, args.cutoff)
    return {
        "model_name_or_path": str(model_dir), "stage": "sft", "do_train": True,
        "finetuning_type": "lora", "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_target": "all",
        "dataset": "bench", "dataset_dir": str(dataset_dir), "template": "smollm2", "cutoff_len": cutoff,
        "packing": True, "neat_packing": True, "overwrite_cache": True,
        # LF turns gradient checkpointing on by default; rayft runs without it, so LF does too here
        "disable_gradient_checkpointing": True, "preprocessing_num_workers": None,
        "output_dir": str(output_dir), "overwrite_output_dir": True,
        "per_device_train_batch_size": rows, "gradient_accumulation_steps": 1, "learning_rate": 2e-4,
        "max_steps": args.steps, "logging_steps": 1000, "save_strategy": "no", "report_to": "none",
        "plot_loss": False, "bf16": args.precision == "bf16", "use_cpu": not on_gpu, "dataloader_num_workers": 0,
        "seed": 42, "flash_attn": "fa2" if flash_attention else "sdpa" if on_gpu else "auto",
        "threads": threads,
    }


def run_llamafactory(data_path: Path, model_dir: Path, work: Path, args, threads: int | None = None) -> dict:
    """One LF SFT run in its own venv and process; its tokens/s as lf_worker.py measures them."""
    ensure_venv()
    work.mkdir(parents=True, exist_ok=True)
    dataset_dir = work / "lf_data"
    write_dataset(data_path, dataset_dir)
    threads = threads or os.cpu_count()
    device = getattr(args, "device", "cpu")
    lf_args = lf_arguments(model_dir, dataset_dir, work / "lf_out", args, threads,
                           flash_attention=device == "cuda" and flash_attn_version(device) is not None)
    (work / "lf_args.json").write_text(json.dumps(lf_args, indent=2))
    result = work / "lf_result.json"
    log = work / "lf.log"
    with open(log, "w") as out:
        proc = subprocess.run([lf_python(), str(Path(__file__).with_name("lf_worker.py")),
                               str(work / "lf_args.json"), str(result)], stdout=out, stderr=subprocess.STDOUT,
                              env=lf_env(threads, device), cwd=work)
    if proc.returncode != 0:
        raise RuntimeError(f"LLaMA-Factory run failed (exit {proc.returncode}); its log {log}:\n"
                           + log.read_text()[-4000:])
    return json.loads(result.read_text())


if __name__ == "__main__":
    if "--setup" in sys.argv:
        ensure_venv()
        print(subprocess.run([str(LF_CLI), "version"], capture_output=True, text=True, env=lf_env()).stdout)
    else:  # a quick trial: --steps N (default 4), bf16 where rayft's precision auto picks it
        import argparse
        import tempfile

        import torch

        sys.path.insert(0, str(ROOT / "src"))
        from rayft.demo import write_demo_data
        from rayft.models import resolve_model_path
        from rayft.train.loop import resolve_precision

        parser = argparse.ArgumentParser()
        parser.add_argument("--steps", type=int, default=4)
        parser.add_argument("--cutoff", type=int, default=256)
        parser.add_argument("--batch", type=int, default=4)
        parser.add_argument("--keep", help="a directory to keep the run's files in")
        args = parser.parse_args()
        args.precision = resolve_precision("auto", torch.device("cpu"))
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(args.keep or tmp)
            data = write_demo_data(work / "people.jsonl", n=2000)
            print(json.dumps(run_llamafactory(data, resolve_model_path("smollm2-135m-instruct"), work, args)))
