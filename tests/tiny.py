"""Tiny models (Llama- and Qwen2-shaped, 2 layers, hidden 64) with the SmolLM2 tokenizer, and small data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch


def build_tiny_model(target: Path, seed: int = 0, arch: str = "llama") -> Path:
    """2 layers, hidden 64, the SmolLM2 tokenizer; arch "qwen2" has attention biases (for BitFit)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from rayft.models import resolve_model_path

    if (target / "config.json").is_file():
        return target
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    config = config_cls(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = model_cls(config)
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


def make_lora_adapter(model_dir: Path, target: Path, r: int = 8, seed: int = 0, target_modules="all-linear",
                      **lora_kwargs) -> Path:
    """A LoRA adapter for `model_dir` with random (non-zero) A and B, saved the way peft saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules,
                                      init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    model.save_pretrained(target)
    return target


def make_ia3_adapter(model_dir: Path, target: Path, seed: int = 0) -> Path:
    """An IA3 adapter (keys, values, the feed-forward input) with random vectors around 1."""
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.copy_(1 + torch.randn_like(param) * 0.5)
    model.save_pretrained(target)
    return target


def make_prompt_tuning_adapter(model_dir: Path, target: Path, virtual_tokens: int = 5, seed: int = 0) -> Path:
    """A prompt-tuning adapter (random virtual-token embeddings), saved the way peft saves it."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=virtual_tokens))
    with torch.no_grad():
        for param in model.prompt_encoder.parameters():
            param.normal_(0, 1.0)  # far from the vocabulary's small init: the output must change
    model.save_pretrained(target)
    return target


def build_other_tiny_model(target: Path, vocab_size: int) -> Path:
    """Like the tiny model but with intermediate size 96: its adapters do not fit the tiny model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (target / "config.json").is_file():
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             tie_word_embeddings=True)
        LlamaForCausalLM(config).save_pretrained(target, safe_serialization=True)
    return target


def packed_batches(tokenizer) -> list[dict]:
    """Two batches of packed rows (two short conversations per 96-token row) of different widths."""
    from rayft.data.packing import collate, pack
    from rayft.data.tokenize import tokenize_conversation

    samples = [tokenize_conversation(tokenizer, [{"role": "user", "content": "Name a city " * (i + 1)},
                                                 {"role": "assistant", "content": "Oslo " * (i + 2)}], 256, False)
               for i in range(6)]
    rows = list(pack(samples, 96))
    return [collate(rows[1:3], tokenizer.pad_token_id), collate([rows[0], rows[3]], tokenizer.pad_token_id)]
