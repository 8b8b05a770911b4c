"""A CPU rehearsal of LLaMA-Factory's FlashAttention-2 run on the GPU host (see gpu_bundle.py):
LLaMA-Factory 0.9.5 with transformers 5.5.4 and benchmarks/flash_attn_shim, asked for
`flash_attn: fa2` with neat packing, one packed row of cutoff x batch tokens per step, as
llamafactory_baseline.lf_arguments sets it up on a GPU. torch's flash kernel is CUDA only, so
the stand-in runs its CPU path (sdpa per sample), and transformers' CUDA-only checks for
FlashAttention-2 are opened in LF's process. Then the same rows through LF's sdpa path.

    .venv/bin/python benchmarks/lf_flash_rehearsal.py [--steps 3]

Prints, per path: the attention LF reports, the real tokens per step, the losses (logged every
step), and for fa2 how transformers called flash_attn_varlen_func (shapes, offsets, keywords).
What it shows: the wiring (LF's config, its collator, transformers' dispatch into the stand-in,
the arguments it passes). What it cannot show: torch's CUDA kernel under LF, or any speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]

LF_SIDE = r'''
import functools, json, sys
sys.path.insert(0, sys.argv[3])
mode, calls, losses = sys.argv[2], [], []
if mode == "fa2":
    import transformers.modeling_flash_attention_utils as fau
    import transformers.utils as tu
    import transformers.utils.import_utils as iu
    yes = lambda: True
    iu.is_flash_attn_2_available = tu.is_flash_attn_2_available = fau.is_flash_attn_2_available = yes
    fau.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2].update(general_availability_check=yes, supported_devices=((yes, "cpu"),))
    import flash_attn
    inner = flash_attn.flash_attn_varlen_func
    @functools.wraps(inner)  # transformers reads the signature
    def counted(q, k, v, cu_seqlens_q, cu_seqlens_k, *args, **kwargs):
        calls.append({"q": list(q.shape), "k": list(k.shape), "offsets": cu_seqlens_q.tolist()[:4] + ["..."],
                      "keywords": {n: (int(x) if hasattr(x, "dtype") else x) for n, x in kwargs.items()}})
        return inner(q, k, v, cu_seqlens_q, cu_seqlens_k, *args, **kwargs)
    flash_attn.flash_attn_varlen_func = counted
import torch
from transformers import TrainerCallback
import lf_worker
from llamafactory.train.tuner import run_exp
class Losses(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            losses.append(round(logs["loss"], 4))
lf_args = json.loads(open(sys.argv[1]).read())
torch.set_num_threads(int(lf_args.pop("threads")))
run_exp({**lf_args, "logging_steps": 1}, callbacks=[lf_worker.clock, Losses()])
print("RESULT", json.dumps({"attention": lf_worker.clock.attention, "tokens_per_step": lf_worker.clock.batches[:lf_args["max_steps"]],
                            "losses": losses, "varlen_calls": len(calls), "first_call": calls[0] if calls else None}))
'''


def main() -> None:
    import argparse

    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import llamafactory_baseline as lf
    from gpu_bundle import flash_attn_shim_wheel
    from rayft.demo import write_demo_data
    from rayft.models import resolve_model_path

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    lf.ensure_venv()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        site = work / "site"  # first on LF's path: the stand-in and transformers 5.5.4, as on the GPU host
        subprocess.run([str(lf.LF_PYTHON), "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                        str(flash_attn_shim_wheel(work)), "transformers==5.5.4"], check=True)
        lf.write_dataset(write_demo_data(work / "people.jsonl", n=400), work / "lf_data")
        settings = SimpleNamespace(cutoff=256, batch=4, steps=args.steps, precision="bf16", device="cpu")
        (work / "side.py").write_text(LF_SIDE)
        for mode in ("fa2", "sdpa"):
            lf_args = lf.lf_arguments(resolve_model_path("smollm2-135m-instruct"), work / "lf_data", work / mode,
                                      settings, 2, flash_attention=True)
            lf_args["flash_attn"] = mode  # the same rows (one of 1,024 tokens per step) through each path
            (work / f"{mode}.json").write_text(json.dumps(lf_args))
            env = {**lf.lf_env(2, "cpu"), "PYTHONPATH": str(site)}
            done = subprocess.run([str(lf.LF_PYTHON), str(work / "side.py"), str(work / f"{mode}.json"), mode,
                                   str(ROOT / "benchmarks")], env=env, cwd=work, capture_output=True, text=True)
            result = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not result:
                raise SystemExit(f"{mode}: LLaMA-Factory failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            print(mode, result[0], flush=True)


if __name__ == "__main__":
    main()
