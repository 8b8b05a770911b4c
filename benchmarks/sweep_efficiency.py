"""ASHA against a full grid: the same search space on the demo task, run twice in one invocation.

    .venv/bin/python benchmarks/sweep_efficiency.py [--steps 16] [--eval-steps 4] \
        [--lrs 1e-5 1e-4 1e-3 3e-3] [--ranks 4 16] [--reduction-factor 3]

Baseline: the full grid (every trial runs all --steps, scheduler none). Contender: the same grid
in the same order with ASHA (grace period = one evaluation, --reduction-factor) stopping trials
whose eval loss trails at a rung. The order is rayft's default for a grid: each key's values in
a seeded random order (search.shuffle_grid, seed train.seed), the same in both runs. Both are real `rayft sweep` runs (pipelines/demo_sweep.yaml's
base: SmolLM2-135M-Instruct, LoRA, 2 Ray Train workers, ZeRO-2) with alpha tied to 2 x rank.

Prints the best final eval loss of each, the optimizer steps each spent (a trial's steps are the
last step its MLflow run logged, so steps run after its last evaluation count too), wall time,
and whether the goal holds: ASHA's best within 5% of the grid's for at most half of its steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rayft.demo import write_demo_data  # noqa: E402
from rayft.tune.sweep import load_sweep, run_sweep  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def steps_spent(summary: dict, uri: str) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    total = 0
    for row in summary["rows"]:
        logged = [m.step for m in client.get_metric_history(row["mlflow_run_id"], "loss")] if row["mlflow_run_id"] else []
        total += max([row["steps"], *logged])
    return total


def run(label: str, args, out: Path, data: Path, scheduler: list[str]) -> dict:
    overrides = [
        f"output_dir={out / label}", f"name=bench-{label}", "search.algorithm=grid", "search.num_samples=1",
        "search.max_concurrent_trials=2",
        "search.space={method.lora.r: {choice: %s}, method.lora.alpha: {ratio_of: method.lora.r, factor: 2}, "
        "train.lr: {choice: %s}}" % (json.dumps(args.ranks), json.dumps(args.lrs)),
        f"data.train={data}", f"train.max_steps={args.steps}", f"train.eval_steps={args.eval_steps}",
        f"train.save_steps={args.steps}", "train.logging_steps=1", f"tracking.mlflow_uri=sqlite:///{out / 'mlflow.db'}",
        *scheduler,
    ]
    sweep = load_sweep(REPO / "pipelines" / "demo_sweep.yaml", overrides)
    start = time.perf_counter()
    summary = run_sweep(sweep, overwrite=True)
    seconds = time.perf_counter() - start
    from rayft.tracking.mlflow_run import tracking_uri

    return {"best": summary["best"]["final_eval_loss"], "best_trial": {k: summary["best"][k] for k in sweep.space.keys},
            "steps": steps_spent(summary, tracking_uri(sweep.base)), "trials": len(summary["rows"]),
            "stopped_early": sum(r["stopped_early"] for r in summary["rows"]), "seconds": seconds,
            "order": [{k: r[k] for k in ("method.lora.r", "train.lr")} for r in summary["rows"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--eval-steps", type=int, default=4)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3, 3e-3])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--reduction-factor", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench-sweep")
    args = parser.parse_args()
    out = args.out.resolve()
    data = write_demo_data(out / "data" / "people.jsonl")

    grid = run("grid", args, out, data, ["search.scheduler=none"])
    asha = run("asha", args, out, data, [f"search.scheduler={{type: asha, grace_period: {args.eval_steps}, "
                                         f"reduction_factor: {args.reduction_factor}}}"])
    loss_ratio = asha["best"] / grid["best"]
    steps_ratio = asha["steps"] / grid["steps"]
    print(f"\nsweep efficiency: {grid['trials']} trials (lr {args.lrs} x rank {args.ranks}), {args.steps} steps each, "
          f"eval every {args.eval_steps}, ASHA reduction factor {args.reduction_factor}")
    print(f"trial order (both runs): {grid['order']}")
    print(f"{'':6} {'best eval loss':>15} {'steps':>7} {'stopped':>8} {'seconds':>9}  best trial")
    for label, r in (("grid", grid), ("asha", asha)):
        print(f"{label:6} {r['best']:15.4f} {r['steps']:7d} {r['stopped_early']:8d} {r['seconds']:9.0f}  {r['best_trial']}")
    print(f"ASHA / grid: best eval loss x{loss_ratio:.3f}, steps x{steps_ratio:.2f}, wall time "
          f"x{asha['seconds'] / grid['seconds']:.2f}")
    goal = loss_ratio <= 1.05 and steps_ratio <= 0.5
    print(f"goal (loss within 5%, at most half the steps): {'MET' if goal else 'NOT MET'}")
    (out / "result.json").write_text(json.dumps({"grid": grid, "asha": asha, "loss_ratio": loss_ratio,
                                                 "steps_ratio": steps_ratio, "goal_met": goal}, indent=2))


if __name__ == "__main__":
    main()
