"""A tiny Llama-shaped model (2 layers, hidden 64) with the SmolLM2 tokenizer, and small data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch


def build_tiny_model(target: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rayft.models import resolve_model_path

    if (target / "config.json").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


NAMES = ["Alice", "Bob", "Chen", "Dana", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Julia"]
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Rome", "Seoul"]


def write_alpaca(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 90)
        records.append({"instruction": "Extract the person as JSON.",
                        "input": f"{name} is {age} years old and lives in {city}.",
                        "output": json.dumps({"name": name, "age": age, "city": city})})
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path
