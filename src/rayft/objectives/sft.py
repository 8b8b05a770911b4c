"""Supervised fine-tuning: next-token loss on the assistant's tokens of each conversation."""

from __future__ import annotations

from rayft.objectives.base import Objective, register


@register
class SupervisedFineTuning(Objective):
    name = "sft"
    reports_perplexity = True
    measures_general_ability = True
    eval_metrics = ("eval_loss", "eval_ppl")

    def recognises(self, record):
        return not ("chosen" in record and "rejected" in record)  # preference pairs are not conversations

    def source_format(self, fmt, first):
        from rayft.data.formats import detect_format

        return detect_format(first) if fmt == "auto" else fmt

    def parse(self, records, fmt, source, offset=0, problems=None):
        from rayft.data.formats import to_conversations

        return to_conversations(records, fmt, source, offset, problems)

    def units(self, tokenizer, conversations, cfg, counts) -> list[list]:
        from rayft.data.tokenize import IGNORE_INDEX, tokenize_conversations

        units = []
        samples = tokenize_conversations(tokenizer, [(c.messages, c.tools) for c in conversations], cfg.cutoff_len,
                                         cfg.train_on_prompt)
        for sample in samples:
            if all(label == IGNORE_INDEX for label in sample.labels):
                counts["dropped"] += 1  # truncation removed every learned token
                continue
            counts["kept"] += 1
            units.append([sample])
        return units

    def loss(self, opts, model, batch, precision, method, method_opts):
        from rayft.train.loop import token_losses

        loss_sum, label_tokens = token_losses(model, batch, precision, method.virtual_tokens(method_opts),
                                              method.fused_head)
        return loss_sum, label_tokens, {}
