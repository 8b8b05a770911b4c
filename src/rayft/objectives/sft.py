"""Supervised fine-tuning: next-token loss on the assistant's tokens of each conversation."""

from __future__ import annotations

from typing import Iterator

from rayft.objectives.base import Objective, register


@register
class SupervisedFineTuning(Objective):
    name = "sft"
    reports_perplexity = True
    measures_general_ability = True
    eval_metrics = ("eval_loss", "eval_ppl")

    def recognises(self, record):
        return not ("chosen" in record and "rejected" in record)  # preference pairs are not conversations

    def parse(self, records, fmt, source):
        from rayft.data.formats import to_conversations

        return to_conversations(records, fmt, source)

    def rows(self, tokenizer, conversations, cfg, counts) -> Iterator[dict]:
        from rayft.data.packing import pack, single_row
        from rayft.data.tokenize import IGNORE_INDEX, tokenize_conversation

        samples = []
        for conversation in conversations:
            sample = tokenize_conversation(tokenizer, conversation.messages, cfg.cutoff_len, cfg.train_on_prompt,
                                           conversation.tools)
            if all(label == IGNORE_INDEX for label in sample.labels):
                counts["dropped"] += 1  # truncation removed every learned token
                continue
            counts["kept"] += 1
            samples.append(sample)
        if cfg.packing:
            return pack(samples, cfg.cutoff_len)
        return (single_row(sample) for sample in samples)

    def loss(self, opts, model, batch, precision, method, method_opts):
        from rayft.train.loop import token_losses

        loss_sum, label_tokens = token_losses(model, batch, precision, method.virtual_tokens(method_opts),
                                              method.fused_head)
        return loss_sum, label_tokens, {}
