"""`rayft data replay CONFIG --from-base N`: self-generated replay data, for a user who has no
general data to mix into training.

N distinct user prompts are drawn (seeded) from the config's training sources, the BASE model
answers them (batched on the serving engine, serve/engine.py, inside a Ray task on the cluster the
config names), and prompt + answer are written as JSONL records. Mixed into data.train as a source,
they pull the fine-tuned model back toward what the base said on those prompts: replay without
anyone's general data.

A record's prompt is its leading system message(s) and its first user turn, without the task
template and without tools: general behaviour, not the task's form.
"""

from __future__ import annotations

import heapq
import json
from pathlib import Path
from typing import Optional

import numpy as np

from rayft.config import TrainJobConfig
from rayft.errors import DataError, RayftError

Messages = list[dict]
FORMATS = ("messages", "alpaca")
PARSE_CHUNK = 1024  # records parsed at a time: memory stays flat over a large source


def first_prompt(messages: Messages) -> Optional[Messages]:
    """The leading system messages and the first user turn (None when a non-user turn comes first)."""
    prompt = []
    for message in messages:
        if message["role"] == "system":
            prompt.append({"role": "system", "content": message["content"]})
        elif message["role"] == "user":
            return prompt + [{"role": "user", "content": message["content"]}]
        else:
            return None
    return None


def draw_prompts(cfg: TrainJobConfig, n: int, seed: int) -> list[Messages]:
    """N distinct prompts of the training sources, a seeded uniform draw in one streaming pass:
    every record gets a random key and the N smallest keys are kept."""
    from rayft.data.formats import Problems
    from rayft.data.sources import resolve_sources, source_label, stream_source
    from rayft.objectives import general_objective

    conversations = general_objective()  # the stage that reads conversations
    rng = np.random.default_rng([seed, 11])
    kept: list[tuple[float, str]] = []  # a max-heap of (-key, prompt as JSON)
    in_heap: set[str] = set()

    def offer(prompt: Messages) -> None:
        text = json.dumps(prompt, ensure_ascii=False)
        key = rng.random()
        if text in in_heap:
            return
        if len(kept) < n:
            heapq.heappush(kept, (-key, text))
            in_heap.add(text)
        elif key < -kept[0][0]:
            in_heap.discard(heapq.heapreplace(kept, (-key, text))[1])
            in_heap.add(text)

    for source in resolve_sources(cfg.data):
        label = source_label(source)
        if not Path(source.path).exists():
            raise DataError(f"{label}: file not found")
        problems = Problems()
        chunk: list[dict] = []
        offset = 0

        def parse(records: list[dict], offset: int) -> None:
            if not conversations.recognises(records[0]):
                raise DataError(f"{label}: replay takes the user prompts of conversations; these records "
                                f"(fields: {', '.join(sorted(records[0]))}) are not conversations")
            for conversation in conversations.parse(records, source.format, label, offset, problems):
                prompt = first_prompt(conversation.messages) if conversation is not None else None
                if prompt is not None:
                    offer(prompt)

        for index, record in stream_source(source, seed, problems):
            if not chunk:
                offset = index
            chunk.append(record)
            if len(chunk) == PARSE_CHUNK:
                parse(chunk, offset)
                chunk = []
        if chunk:
            parse(chunk, offset)
        problems.raise_first(label)
    if len(kept) < n:
        raise RayftError(f"--from-base {n}: the training data has {len(kept)} distinct user prompts")
    return [json.loads(text) for _, text in sorted(kept, reverse=True)]  # by key: a seeded order


def generate_answers(model_dir: str, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                     seed: int, max_batch_size: int, use_gpu: bool) -> list[list[int]]:
    """The base model's answer (token ids) to each prompt, on the serving engine: batches of up to
    max_batch_size rows, finished rows replaced by waiting ones. Runs inside a Ray task."""
    import asyncio

    import torch

    from transformers.utils import logging as hf_logging

    from rayft.serve.engine import Engine, GenerationRequest, batched_lora_model, load_base_model, serving_dtype

    # Ray forwards the task's output to the driver, at times after the driver has put its console
    # back: the loading bar is the only line it prints
    hf_logging.disable_progress_bar()
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    model = load_base_model(Path(model_dir), serving_dtype("auto", device), device)
    eos = model.generation_config.eos_token_id
    eos = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    pad = model.generation_config.pad_token_id
    engine = Engine(model, batched_lora_model(model), eos, pad if pad is not None else eos[0], max_batch_size,
                    batch_wait_ms=0)

    async def run() -> list[list[int]]:
        requests = [GenerationRequest(ids, max_new_tokens, "base", None, temperature, 1.0, seed + i)
                    for i, ids in enumerate(prompts)]
        answers: list[list[int]] = [[] for _ in requests]
        async for row, event in engine.generate_rows(requests):
            if event[0] == "token":
                answers[row].append(event[1])
        return answers

    return asyncio.run(run())


def replay_record(prompt: Messages, answer: str, fmt: str) -> dict:
    if fmt == "messages":
        return {"messages": prompt + [{"role": "assistant", "content": answer}]}
    system = "\n\n".join(m["content"] for m in prompt if m["role"] == "system")
    record = {"instruction": prompt[-1]["content"], "input": "", "output": answer}
    return {**record, "system": system} if system else record


def write_replay(cfg: TrainJobConfig, n: int, out: Path, overwrite: bool = False, max_new_tokens: int = 256,
                 temperature: float = 0.0, seed: Optional[int] = None, fmt: str = "messages",
                 batch_size: int = 16, verbose: bool = False) -> Path:
    """Draw N prompts, answer them with the base model on Ray, write the records to `out` (JSONL,
    atomically). Bad input is a RayftError of one line, before Ray is touched; Ray's and the
    libraries' output goes to a log file unless `verbose` (rayft.console)."""
    from transformers import AutoConfig, AutoTokenizer

    from rayft.console import RunConsole
    from rayft.data.tools import render
    from rayft.models import resolve_model_path
    from rayft.train.runner import write_atomic

    if n <= 0:
        raise RayftError(f"--from-base {n}: the number of records must be at least 1")
    for name, value in (("--max-tokens", max_new_tokens), ("--batch-size", batch_size)):
        if value <= 0:
            raise RayftError(f"{name} {value}: must be at least 1")
    if temperature < 0:
        raise RayftError(f"--temperature {temperature}: must be >= 0 (0: greedy)")
    if fmt not in FORMATS:
        raise RayftError(f"--format {fmt}: one of {', '.join(FORMATS)}")
    if out.is_dir():
        raise RayftError(f"--out {out}: is a directory; name the JSONL file to write")
    if out.exists() and not overwrite:
        raise RayftError(f"--out {out}: exists; pass --overwrite to replace it")
    seed = cfg.train.seed if seed is None else seed

    model_dir = resolve_model_path(cfg.model.name_or_path)
    prompts = draw_prompts(cfg, n, seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [render(tokenizer, prompt, add_generation_prompt=True) for prompt in prompts]
    prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    context = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
    longest = max(len(ids) for ids in prompt_ids)
    if context and longest + max_new_tokens > context:
        raise RayftError(f"--max-tokens {max_new_tokens}: a drawn prompt is {longest} tokens, and both exceed the "
                         f"model's context of {context} tokens")

    with RunConsole(verbose):
        answers = answers_on_ray(cfg, str(model_dir), prompt_ids, max_new_tokens, temperature, seed, batch_size)
    records = [replay_record(prompt, tokenizer.decode(ids, skip_special_tokens=True), fmt)
               for prompt, ids in zip(prompts, answers)]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return out


def answers_on_ray(cfg: TrainJobConfig, model_dir: str, prompt_ids: list[list[int]], max_new_tokens: int,
                   temperature: float, seed: int, batch_size: int) -> list[list[int]]:
    """generate_answers in one Ray task (1 CPU, or 1 GPU where the cluster has GPUs) on the cluster
    the config names, as training connects to it."""
    import ray

    from rayft.raycluster import connect_ray
    from rayft.train.runner import resolve_use_gpu

    connect_ray(cfg.distributed.ray_address)
    use_gpu = resolve_use_gpu(cfg)
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(generate_answers)
    return ray.get(task.remote(model_dir, prompt_ids, max_new_tokens, temperature, seed, batch_size, use_gpu))
