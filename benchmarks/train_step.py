"""One rayft LoRA training step in one process, timed under each attention implementation
and each way of computing the output head's loss.

    .venv/bin/python benchmarks/train_step.py [--threads 1] [--steps 6] [--rounds 2]
    .venv/bin/python benchmarks/train_step.py --attention packed --head fused logits --rounds 3
    .venv/bin/python benchmarks/train_step.py --attention packed --lora-layers fused peft --rounds 3
    python3 benchmarks/train_step.py --device cuda --cutoff 2048 --batch 8 --attention packed buckets sdpa --compile

The step is rayft's own (`token_losses`, backward, AdamW) on SmolLM2-135M-Instruct with LoRA
r=16 all-linear, on 4 packed rows of the demo task (cutoff 256; --batch, --cutoff), in the
precision that `precision: auto` picks on the device (--device cuda: a GPU, each timing ended by a
synchronize; `--host-reads` reads the loss and its token count back every step, as the training
loop did until 2026-12-04: it now reads its logging window's sums once per window). `--attention packed` is rayft's packed attention as training
runs it (on a CUDA device in bf16: the flash kernel's variable-length attention), `buckets` the
same with that kernel switched off (its per-length buckets, as on the CPU), `sdpa` and `eager`
transformers' own under the block-diagonal mask. `--compile` also times each with the decoder
layers compiled (train.compile), after a warm-up step that compiles them. `--head fused` is rayft's head returning the summed loss chunk by
chunk (train/head_loss.py); `--head logits` is the full logits followed by cross-entropy.
`--lora-layers fused` is rayft's plain LoRA layer (the adapter's output added in one addmm:
methods/lora.py), `peft` peft's own forward. Each
round times every combination in turn (the first step of each is a warm-up and not counted)
and prints real tokens/s; `--profile` adds the top operators of one step.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rayft.config import MethodConfig  # noqa: E402
from rayft.data.formats import read_records, to_messages  # noqa: E402
from rayft.data.packing import collate, pack  # noqa: E402
from rayft.data.tokenize import tokenize_conversation  # noqa: E402
from rayft.demo import write_demo_data  # noqa: E402
from rayft.models import resolve_model_path  # noqa: E402
from rayft.methods import Run  # noqa: E402
from rayft.models.loading import compile_decoder_layers, load_for_training  # noqa: E402
from rayft.train.loop import fused_head_loss_applies as FUSED_HEAD_APPLIES, resolve_precision, to_device, token_losses  # noqa: E402


def batches(model_dir: Path, count: int, batch: int = 4, cutoff: int = 256) -> list[dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_demo_data(Path(tmp) / "people.jsonl", n=40 * count * max(1, batch * cutoff // 1024))
        conversations = to_messages(read_records(path), "auto", str(path))
    samples = [tokenize_conversation(tokenizer, m, cutoff, False) for m in conversations]
    rows = list(pack(samples, cutoff))
    return [collate(rows[i:i + batch], tokenizer.pad_token_id) for i in range(0, batch * count, batch)]


def lora_model_and_optimizer(model_dir: Path, attention: str, precision: str, device=torch.device("cpu")):
    """SmolLM2 with LoRA r=16 all-linear, prepared as rayft's training loop prepares it, and AdamW
    over the adapter (also used by train_overhead.py)."""
    from rayft.train import attention as packed

    packed.USE_FLASH_VARLEN = attention != "buckets"
    attention = "packed" if attention == "buckets" else attention
    torch.manual_seed(0)
    model = load_for_training(model_dir, MethodConfig(type="lora", lora={"r": 16, "alpha": 32, "dropout": 0.0}),
                              device, attention, Run(precision=precision)).to(device)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                    fused=device.type == "cuda" or None)  # as build_optimizer picks


def time_steps(attention: str, head: str, lora_layers: str, model_dir: Path, data: list[dict], precision: str,
               profile: bool, device=torch.device("cpu"), host_reads: bool = False, compiled: bool = False) -> float:
    from rayft.train import loop

    loop.fused_head_loss_applies = FUSED_HEAD_APPLIES if head == "fused" else (lambda *args: False)
    model, optimizer = lora_model_and_optimizer(model_dir, attention, precision, device)
    if compiled:
        compile_decoder_layers(model)
    data = [to_device(batch, device) for batch in data]  # as the loop's batches: with their host copy
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if lora_layers == "peft":
        for module in model.modules():
            vars(module).pop("forward", None)  # rayft binds its fused forward per layer

    def step(batch):
        loss, tokens = token_losses(model, batch, precision)
        (loss / tokens).backward()
        if host_reads:
            loss.item(), tokens.item()
        optimizer.step()
        optimizer.zero_grad()

    step(data[0])  # warm-up
    synchronize()
    start = time.perf_counter()
    for batch in data[1:]:
        step(batch)
    synchronize()
    seconds = time.perf_counter() - start
    if profile:
        from torch.profiler import profile as torch_profile

        from torch.profiler import ProfilerActivity

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        synchronize()
        with torch_profile(activities=activities) as prof:
            begin = time.perf_counter()
            step(data[1])
            synchronize()
            wall = time.perf_counter() - begin
        events = prof.key_averages()
        print(events.table(sort_by="self_cpu_time_total", row_limit=12))
        if device.type == "cuda":
            # the GPU's busy time against the step's wall time: how far the host keeps it fed
            from torch.autograd import DeviceType

            busy = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e6
            launches = sum(e.count for e in events if e.name.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
            print(events.table(sort_by="self_device_time_total", row_limit=15))
            print(f"profiled step: wall {wall * 1e3:.1f} ms, device busy {busy * 1e3:.1f} ms, "
                  f"{launches} kernel launches", flush=True)
    return sum(int(b["real_tokens"]) for b in data[1:]) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--attention", nargs="+", choices=["sdpa", "eager", "packed", "buckets"],
                        default=["sdpa", "eager", "packed"])
    parser.add_argument("--compile", action="store_true", help="also time each with the decoder layers compiled")
    parser.add_argument("--head", nargs="+", choices=["fused", "logits"], default=["fused"])
    parser.add_argument("--lora-layers", nargs="+", choices=["fused", "peft"], default=["fused"])
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--host-reads", action="store_true", help="read the loss back every step, as the loop did until 2026-12-04")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = resolve_precision("auto", device)
    model_dir = resolve_model_path("smollm2-135m-instruct")
    data = batches(model_dir, args.steps + 1, args.batch, args.cutoff)
    print(f"precision {precision}, {args.device}, {args.threads} thread(s), rows {tuple(data[1]['input_ids'].shape)}"
          f"{', host reads' if args.host_reads else ''}", flush=True)
    for index in range(args.rounds):
        for attention in args.attention:
            for head in args.head:
                for lora_layers in args.lora_layers:
                    for compiled in [False, True] if args.compile else [False]:
                        rate = time_steps(attention, head, lora_layers, model_dir, data, precision,
                                          args.profile and index == 0, device, args.host_reads, compiled)
                        print(f"round {index + 1} attention {attention:7s} head {head:6s} lora layers {lora_layers:5s} "
                              f"{'compiled ' if compiled else ''}{rate:7.1f} real tokens/s", flush=True)


if __name__ == "__main__":
    main()
