"""Runs inside LLaMA-Factory's own virtual environment (benchmarks/llamafactory_baseline.py starts
it): one LLaMA-Factory SFT run, timed the way train_throughput.py times the plain Trainer.

    .bench/llamafactory/venv/bin/python benchmarks/lf_worker.py ARGS.json RESULT.json

ARGS.json is LLaMA-Factory's own argument dict (what `llamafactory-cli train x.yaml` reads);
the run is `llamafactory.train.tuner.run_exp`, the function that CLI calls, with one extra
callback. Real tokens are counted from the rows LLaMA-Factory itself tokenized and packed, as
they reach its data collator: with neat_packing a packed row's attention_mask holds each
token's sample number (1, 2, ...) and 0 on padding, so its real tokens are the non-zero entries.
Every optimizer step is timed, the first too (as both other sides count it).
"""

import json
import sys
import time

import torch
from transformers import TrainerCallback

import llamafactory.train.sft.workflow as sft_workflow
from llamafactory.train.tuner import run_exp


class Clock(TrainerCallback):
    def __init__(self):
        self.step_start, self.seconds, self.steps, self.step_seconds = None, 0.0, 0, []
        self.batches, self.samples, self.widths = [], [], []
        self.model_dtype = self.attention = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        base = [p for n, p in model.named_parameters() if "lora_" not in n]
        self.model_dtype = str(base[0].dtype) if base else None
        self.attention = getattr(model.config, "_attn_implementation", None)

    def on_step_begin(self, *a, **k):
        self.step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available() and state.global_step >= args.max_steps - 5:
            # the GPU runs behind the host: the last window's steps (and so the total) end with
            # their work done, as rayft's do (its loop reads each step's loss back)
            torch.cuda.synchronize()
        self.step_seconds.append(time.perf_counter() - self.step_start)
        self.seconds += self.step_seconds[-1]
        self.steps += 1


clock = Clock()
Collator = sft_workflow.SFTDataCollatorWith4DAttentionMask


class CountingCollator(Collator):
    def __call__(self, features):
        clock.batches.append(sum(sum(1 for m in f["attention_mask"] if m != 0) for f in features))
        clock.samples.append(sum(max(f["attention_mask"]) for f in features))  # samples numbered 1..n per row
        clock.widths.append(max(len(f["input_ids"]) for f in features))
        return super().__call__(features)


sft_workflow.SFTDataCollatorWith4DAttentionMask = CountingCollator


def main() -> None:
    lf_args, result_path = json.loads(open(sys.argv[1]).read()), sys.argv[2]
    torch.set_num_threads(int(lf_args.pop("threads")))
    run_exp(lf_args, callbacks=[clock])
    steps = lf_args["max_steps"]
    tokens = sum(clock.batches[:steps])  # the dataloader may fetch past the last step
    rows = len(clock.batches[:steps]) * lf_args["per_device_train_batch_size"]
    with open(result_path, "w") as f:
        json.dump({"tokens_per_s": tokens / clock.seconds, "steps": clock.steps, "tokens": tokens,
                   "seconds": clock.seconds, "real_tokens_per_row": tokens / rows,
                   "last_5_steps_tokens_per_s": sum(clock.batches[steps - 5:steps]) / sum(clock.step_seconds[-5:]),
                   "real_tokens_per_sample": tokens / sum(clock.samples[:steps]),
                   "row_width": max(clock.widths[:steps]), "base_dtype": clock.model_dtype, "attention": clock.attention,
                   "threads": torch.get_num_threads()}, f)


if __name__ == "__main__":
    main()
