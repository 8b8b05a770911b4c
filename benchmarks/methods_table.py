"""Every fine-tuning method on the demo task with the same budget: one table, made by one command.

    .venv/bin/python benchmarks/methods_table.py [--steps 30] [--only lora,ia3] [--out outputs/methods]

Each method trains through the same entry point as `rayft train` (2 Ray Train workers, DeepSpeed
ZeRO-2, pipelines/demo_lora.yaml's data, cutoff, batch, schedule and steps) on SmolLM2-135M-Instruct;
only the method block and the learning rate differ (each method family has its own usual rate,
printed in the table). Columns, all read from each run's metrics.json:
- trainable: parameters the optimizer updates (peft's count for peft methods);
- changed: base parameters the output changes once merged or applied (0: it only adds);
- output: the output's weight files on disk;
- tokens/s: real (non-padding) training tokens per second over all workers;
- eval loss before -> after, on the same held-out rows (soft prompts: one sample per row).
A method the base cannot take (BitFit: SmolLM2 has no biases) is listed with its refusal.
The markdown table is printed and written to <out>/methods.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rayft.config import load_config, parse_config  # noqa: E402
from rayft.demo import DEMO_CONFIG, write_demo_data  # noqa: E402
from rayft.errors import RayftError  # noqa: E402

# (row name, method block, learning rate)
CASES = [
    ("full", {"type": "full"}, 5e-5),
    ("freeze (last 2 layers)", {"type": "freeze", "freeze": {"trainable_layers": 2}}, 1e-4),
    ("lora r16", {"type": "lora", "lora": {"r": 16, "alpha": 32}}, 1e-3),
    ("rslora r16", {"type": "lora", "lora": {"r": 16, "alpha": 32, "use_rslora": True}}, 1e-3),
    ("dora r16", {"type": "lora", "lora": {"r": 16, "alpha": 32, "use_dora": True}}, 1e-3),
    ("lora+ r16 (ratio 8)", {"type": "lora", "lora": {"r": 16, "alpha": 32, "plus_lr_ratio": 8}}, 5e-4),
    ("pissa r16", {"type": "lora", "lora": {"r": 16, "alpha": 16, "init": "pissa", "dropout": 0.0}}, 5e-4),
    ("olora r16", {"type": "lora", "lora": {"r": 16, "alpha": 16, "init": "olora", "dropout": 0.0}}, 5e-4),
    ("qlora r16 (nf4)", {"type": "qlora", "qlora": {"r": 16, "alpha": 32}}, 1e-3),
    ("adalora 12->8", {"type": "adalora", "adalora": {"init_r": 12, "target_r": 8, "tinit": 5, "tfinal": 5,
                                                      "delta_t": 2}}, 1e-3),
    ("plora r16 (merge every 10)", {"type": "plora", "plora": {"r": 16, "alpha": 32, "merge_every": 10}}, 1e-3),
    ("prompt tuning (20 tokens)", {"type": "prompt_tuning", "prompt_tuning": {"num_virtual_tokens": 20}}, 3e-2),
    ("p-tuning (20 tokens, mlp)", {"type": "p_tuning", "p_tuning": {"num_virtual_tokens": 20}}, 1e-2),
    ("prefix tuning (20 tokens)", {"type": "prefix_tuning", "prefix_tuning": {"num_virtual_tokens": 20}}, 1e-2),
    ("ia3", {"type": "ia3"}, 3e-3),
    ("bitfit", {"type": "bitfit"}, 1e-3),
    ("ln-tuning", {"type": "ln_tuning"}, 5e-3),
    ("bottleneck pfeiffer rf16", {"type": "bottleneck", "bottleneck": {"reduction_factor": 16}}, 1e-3),
    ("bottleneck pfeiffer rf8", {"type": "bottleneck", "bottleneck": {"reduction_factor": 8}}, 1e-3),
    ("bottleneck houlsby rf16", {"type": "bottleneck", "bottleneck": {"placement": "houlsby", "reduction_factor": 16}}, 1e-3),
    ("adapterdrop houlsby rf16 (first 15 of 30 layers)",
     {"type": "bottleneck", "bottleneck": {"placement": "houlsby", "reduction_factor": 16, "drop_first_n": 15}}, 1e-3),
    ("compacter rf16 (n=4, k=1)", {"type": "compacter", "compacter": {"reduction_factor": 16}}, 3e-3),
    # fuses the two pfeiffer bottlenecks above (their output directories are filled in at run time)
    ("adapterfusion of 2 bottlenecks", {"type": "adapter_fusion", "adapter_fusion": {"adapters": []}}, 1e-3),
]
FUSED = ("bottleneck pfeiffer rf16", "bottleneck pfeiffer rf8")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


def run(name: str, block: dict, lr: float, steps: int, out: Path, data: Path) -> dict:
    from rayft.train.runner import run_training

    raw = load_config(DEMO_CONFIG).to_dict()
    raw.update(name=slug(name)[:100], output_dir=str(out / slug(name)), method=block)
    raw["data"]["train"] = str(data)
    raw["train"].update(max_steps=steps, lr=lr)
    try:
        return run_training(parse_config(raw, source=name), overwrite=True)
    except RayftError as refused:
        return {"refused": str(refused)}


def size(n_bytes) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 2**20:.2f} MB" if n_bytes >= 2**20 else f"{n_bytes / 2**10:.1f} KB"


def table(rows: list[tuple[str, float, dict]]) -> str:
    lines = ["| method | lr | trainable params | changed base params | output | tokens/s | eval loss before -> after |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for name, lr, m in rows:
        if "refused" in m:
            lines.append(f"| {name} | {lr:g} | refused: {m['refused'].split(': ', 1)[-1]} | | | | |")
            continue
        lines.append(f"| {name} | {lr:g} | {m['trainable_params']:,} ({100 * m['trainable_params'] / m['total_params']:.3f}%) "
                     f"| {m['changed_base_params']:,} | {size(m['output_bytes'])} | {m['tokens_per_s']:.0f} "
                     f"| {m['eval_loss_before']:.3f} -> {m['eval_loss']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", default="", help="comma-separated row names (prefix match)")
    parser.add_argument("--out", type=Path, default=Path("outputs/methods"))
    args = parser.parse_args()
    data = write_demo_data(args.out / "data" / "people.jsonl")
    wanted = [c for c in CASES if not args.only or any(c[0].startswith(o) for o in args.only.split(","))]
    rows, outputs = [], {}
    for name, block, lr in wanted:
        if block["type"] == "adapter_fusion":
            if not all(f in outputs for f in FUSED):
                continue
            block = {"type": "adapter_fusion", "adapter_fusion": {"adapters": [outputs[f] for f in FUSED]}}
        metrics = run(name, block, lr, args.steps, args.out, data)
        if "output" in metrics:
            outputs[name] = metrics["output"]
        rows.append((name, lr, metrics))
        print(json.dumps({"method": name, **{k: metrics.get(k) for k in (
            "trainable_params", "changed_base_params", "output_bytes", "tokens_per_s", "eval_loss_before",
            "eval_loss", "refused")}}), flush=True)
    text = table(rows)
    (args.out / "methods.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
