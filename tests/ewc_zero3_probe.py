"""EWC under ZeRO-3 against the same steps taken whole: two DeepSpeed ZeRO-3 processes (gloo,
world size 2, every parameter partitioned) train LoRA on the tiny model for 3 steps of 2
micro-batches with EWC, and rank 0 takes the same steps on a plain copy of the model with the
penalty as a term of each micro-batch's loss (what ZeRO 0-2 do). Run by tests/test_forgetting.py in
a subprocess (a process group is process-wide); rank 0 prints one JSON line."""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

STEPS, ACCUMULATION, WEIGHT, LR, CLIP = 3, 2, 50.0, 2e-2, 1.0


def batches(step: int):
    """The same 2 micro-batches on both ranks: DeepSpeed's average over the ranks is then each one."""
    for micro in range(ACCUMULATION):
        ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(100 * step + micro))
        yield {"input_ids": ids, "labels": ids, "position_ids": torch.arange(12).repeat(2, 1)}


def run(rank: int, model_dir: str, port: str) -> None:
    import deepspeed

    from rayft.config import MethodConfig
    from rayft.methods import Run
    from rayft.models.loading import load_for_training
    from rayft.train.deepspeed_config import skip_the_inference_comm_build
    from rayft.train.ewc import ElasticWeightConsolidation
    from rayft.train.loop import token_losses

    skip_the_inference_comm_build()  # as the training workers do: a fresh environment would compile it first

    torch.set_num_threads(1)  # two ranks on the test machine's cores, as Ray's one-CPU workers are
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg = MethodConfig.model_validate({"type": "lora", "lora": {"r": 4, "dropout": 0.0}})
    torch.manual_seed(0)
    model = load_for_training(model_dir, cfg, torch.device("cpu"), "sdpa", Run(total_steps=STEPS))
    with torch.no_grad():  # B off zero: every factor then has a gradient (LoRA's B starts at 0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.05)
    plain = copy.deepcopy(model)
    # a Fisher of the whole parameters, the same on both ranks (what the estimate's all-reduce gives)
    generator = torch.Generator().manual_seed(1)
    fisher = {name: torch.rand(p.shape, generator=generator) for name, p in model.named_parameters() if p.requires_grad}

    def loss(module, batch):
        loss_sum, count = token_losses(module, batch, "fp32")
        return loss_sum / count

    ewc = ElasticWeightConsolidation(WEIGHT, {name: f.clone() for name, f in fisher.items()})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, dist_init_required=False, config={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": ACCUMULATION, "gradient_clipping": CLIP,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    ewc.anchor(engine.module)
    for step in range(STEPS):
        for batch in batches(step):
            assert ewc.penalty(engine.module) is None  # its gradient goes in at the boundary
            engine.backward(loss(engine, batch))
            if engine.is_gradient_accumulation_boundary():
                ewc.before_optimizer_step(engine)
            engine.step()
    partitioned_penalties = ewc._window
    with deepspeed.zero.GatheredParameters([p for p in engine.module.parameters() if p.requires_grad]):
        trained = {name: p.detach().clone() for name, p in engine.module.named_parameters() if p.requires_grad}

    if rank == 0:
        results = {}
        for weight in (WEIGHT, 0.0):  # and without EWC: the penalty must have changed the outcome
            whole, plain_ewc = copy.deepcopy(plain), ElasticWeightConsolidation(weight, fisher)
            plain_ewc.anchor(whole)
            params = [p for p in whole.parameters() if p.requires_grad]
            plain_optimizer = torch.optim.AdamW(params, lr=LR)
            for step in range(STEPS):
                for batch in batches(step):
                    ((loss(whole, batch) + plain_ewc.penalty(whole)) / ACCUMULATION).backward()
                torch.nn.utils.clip_grad_norm_(params, CLIP)
                plain_optimizer.step()
                plain_optimizer.zero_grad()
            penalties = [sum(plain_ewc._window[i:i + ACCUMULATION]) / ACCUMULATION
                         for i in range(0, len(plain_ewc._window), ACCUMULATION)]
            results[weight] = ({name: p.detach() for name, p in whole.named_parameters() if p.requires_grad}, penalties)
        (expected, expected_penalties), (unpenalised, _) = results[WEIGHT], results[0.0]
        print(json.dumps({
            "names": sorted(trained) == sorted(expected),
            "max_difference": max((trained[n] - expected[n]).abs().max().item() for n in expected),
            "ewc_effect": max((unpenalised[n] - expected[n]).abs().max().item() for n in expected),
            "penalties": partitioned_penalties, "expected_penalties": expected_penalties,
            "partitioned": ewc.partitioned,
            "partition_numel": sum(f.numel() for f in ewc.fisher.values()),
            "whole_numel": sum(f.numel() for f in fisher.values())}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    torch.multiprocessing.spawn(run, args=(sys.argv[1], sys.argv[2]), nprocs=2)
