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

    def units(self, tokenizer, conversations, cfg, counts):
        from rayft.data.tokenize import tokenize_conversations

        units = []
        samples = tokenize_conversations(tokenizer, [(c.messages, c.tools) for c in conversations], cfg.cutoff_len,
                                         cfg.train_on_prompt)
        for sample in samples:
            if not _learns(sample):
                counts["dropped"] += 1  # truncation removed every learned token
                units.append(None)
                continue
            counts["kept"] += 1
            units.append([sample])
        return units

    def answer_issues(self, conversation):
        issues, prompt = [], None
        for message in conversation.messages:
            text = (message.get("content") or "").strip()
            if message["role"] == "assistant":
                if not text and not message.get("tool_calls"):
                    issues.append("empty answer")
                elif text and text == prompt:
                    issues.append("answer equals its prompt")
            elif message["role"] == "user":
                prompt = text
        return sorted(set(issues))

    def score_samples(self, tokenizer, conversations, cfg):
        from rayft.data.tokenize import tokenize_conversations

        # Without the prompt: every turn but the answers emptied (tools left out), so the template
        # renders the same structure and the same answer tokens are learned, after no prompt text.
        bare = [[m if m["role"] == "assistant" else {**m, "content": ""} for m in c.messages] for c in conversations]
        samples = tokenize_conversations(tokenizer, [(c.messages, c.tools) for c in conversations] +
                                         [(messages, None) for messages in bare], cfg.cutoff_len, False)
        n = len(conversations)
        return [(with_prompt, without) if _learns(with_prompt) and _learns(without) else None
                for with_prompt, without in zip(samples[:n], samples[n:])]

    def loss(self, opts, model, batch, precision, method, method_opts):
        from rayft.train.loop import token_losses

        loss_sum, label_tokens = token_losses(model, batch, precision, method.virtual_tokens(method_opts),
                                              method.fused_head)
        return loss_sum, label_tokens, {}


def _learns(sample) -> bool:
    from rayft.data.tokenize import IGNORE_INDEX

    return sample.labels.count(IGNORE_INDEX) != len(sample.labels)  # counted in C, not a label at a time
