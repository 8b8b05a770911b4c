"""Adapter kinds that `rayft serve` batches, one module each: how an adapter of the kind is
inspected (its files against its config, before any weight is loaded, giving the AdapterSpec
fields it knows) and loaded into the
per-row form that the wrapped linear layers apply (serve/lora.py):

    y_row = s_row * (W (x * i_row) + B_row A_row x) + t_row

- lora.py: plain LoRA (rsLoRA, LoRA+, PiSSA/OLoRA and PLoRA outputs) and per-module ranks
  (AdaLoRA's rank patterns): the B A term;
- dora.py: DoRA: the LoRA term and a per-column output scale s (and t = (1 - s) * bias);
- ia3.py: IA3: an output scale s (keys, values; t = 0) or an input scale i (the feed-forward);
- prompt_tuning.py: prompt tuning and P-tuning v1: per-row virtual-token embeddings before the
  prompt (the engine's prefill puts them there; no per-layer term).

The kind comes from the adapter's rayft.json (`serve_kind`, written by training) or else from its
peft config. Kinds that are not adapters of a linear layer are refused at publish, each with why.
"""

from __future__ import annotations

from types import ModuleType

from rayft.serve.kinds import dora, ia3, lora, prompt_tuning

SERVED: dict[str, ModuleType] = {"lora": lora, "lora_rank_pattern": lora, "dora": dora, "ia3": ia3,
                                 "prompt_tuning": prompt_tuning}

# Trained by rayft but not batched by its server, and why (one line each, shown at publish).
REFUSED = {
    "prefix_tuning": "its key/value prefixes would have to enter every row's KV cache; rayft serve does not batch them",
    "bottleneck": "bottleneck adapters (and AdapterDrop, Compacter) add modules inside each layer that rayft serve "
                  "does not batch yet",
    "adapter_fusion": "AdapterFusion attends over several adapters per layer; rayft serve does not batch it",
}
# What training writes for outputs that are not adapters of the base at all.
NOT_ADAPTERS = ("BitFit / LN-tuning deltas and full or freeze models are not adapters of the served base: serve a "
                "merged or trained model as its own base (serve config base_model: a model directory; "
                "rayft merge makes one from a delta)")


def kind_of(config: dict, meta: dict) -> str:
    """The adapter's kind: what training recorded, else what its peft config says."""
    if meta.get("serve_kind"):
        return meta["serve_kind"]
    peft_type = config.get("peft_type")
    if peft_type == "LORA":
        if config.get("use_dora"):
            return "dora"
        return "lora_rank_pattern" if config.get("rank_pattern") else "lora"
    if peft_type == "IA3":
        return "ia3"
    if peft_type in ("PROMPT_TUNING", "P_TUNING"):
        return "prompt_tuning"
    if peft_type == "PREFIX_TUNING":
        return "prefix_tuning"
    return f"peft_type={peft_type!r}"
