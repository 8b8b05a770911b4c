"""What the soft-prompt methods (prompt tuning, P-tuning, prefix tuning) share, through peft.

Their virtual tokens belong to a row, not to a sample: packed samples would share them and see
one another through them. So they keep one sample per row (`packs = False`): the pre-flight
turns data.packing off and says so. The output is what inference needs: the virtual tokens'
embeddings (prompt tuning, P-tuning: the prompt encoder's output) or the key/value prefixes
(prefix tuning), in peft's format, so that `PeftModel.from_pretrained` loads it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file

from rayft.methods.base import Method

PEFT_ADAPTER = "default"


class SoftPromptMethod(Method):
    equals_base_at_init = False  # the virtual tokens change every output from the start
    output = "adapter"
    packs = False
    merge_refusal = "virtual tokens are extra inputs, not a change of any weight"

    def peft_config(self, opts, model):
        raise NotImplementedError

    def apply(self, opts, model, run):
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(opts, model))

    def export(self, opts, module, state, directory: Path):
        """The encoder is rebuilt on the CPU from the gathered weights (under ZeRO-3 the live one
        holds only this rank's shard) and run once over the virtual tokens."""
        encoder = module.prompt_encoder[PEFT_ADAPTER]
        prefix = f"prompt_encoder.{PEFT_ADAPTER}."
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        encoder = self.cpu_encoder(module, encoder, weights)
        config = copy.deepcopy(module.peft_config[PEFT_ADAPTER])
        tokens = torch.arange(config.num_virtual_tokens)[None]
        with torch.no_grad():
            embeddings = encoder(tokens)[0].float().contiguous()
        config.inference_mode = True  # what from_pretrained expects of saved prompt embeddings
        directory.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(directory)
        save_file({"prompt_embeddings": embeddings}, directory / "adapter_model.safetensors", metadata={"format": "pt"})

    def cpu_encoder(self, module, encoder, weights):
        """A CPU copy of the prompt encoder holding `weights` (prompt tuning overrides this)."""
        fresh = type(encoder)(module.peft_config[PEFT_ADAPTER])
        fresh.load_state_dict(weights)
        return fresh.eval()
