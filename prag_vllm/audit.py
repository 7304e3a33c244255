"""Is an answer clean? Template leaks and answers cut off at ``max_tokens``, counted per row.

A *template leak* is an answer that carries text the model should never say: the chat
template's own markup or default system prompt ("You are Qwen, created by Alibaba
Cloud..."), a role name run on after the answer (``Ostrevikuser``,
``userassistantassistant``), the project's prompt instructions ("Answer the question
with a short phrase", "Context:", "Question:"), or a special token other than the end of
turn among the generated token ids (decoding with special tokens skipped hides those).
Adapters that learned the chat template produce exactly these.

*Hit max_tokens*: generation stopped because the budget ran out (vLLM's finish reason
``length``), i.e. the model never ended its turn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from prag_vllm.modes import CONTEXT_TEMPLATE, QUESTION_TEMPLATE

ROLE_NAMES = ("system", "user", "assistant")
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>", "<|end|>")
"""Tokens that end a generation in common chat templates (allowed as the last token)."""
_CONTEXT_NUMBER = re.compile(r"(?:^|\n)\s*\[\d+\]")
"""The numbering of the passages in the prompt's context block (modes.context_block)."""
_ROLE_RUN_ON = re.compile(r"(?:\S(?:system|user|assistant)\s*$)|(?:^|\n)\s*(?:system|user|assistant)\s*(?:\n|$)"
                          r"|(?:system|user|assistant)(?:system|user|assistant)", re.IGNORECASE)


def _instruction_fragments() -> list[str]:
    out = []
    for template in (QUESTION_TEMPLATE, CONTEXT_TEMPLATE):
        for part in re.split(r"\{[a-z]+\}", template):
            out += [line.strip() for line in part.splitlines() if len(line.strip()) >= 6]
    return out


def template_fragments(tokenizer) -> list[str]:
    """Literal text of the tokenizer's chat template around the messages (e.g. Qwen's
    default system prompt), one fragment per line, special tokens and role names removed."""
    mark = "\x00PRAG\x00"
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": mark}], tokenize=False,
                                                 add_generation_prompt=True)
    except Exception:  # no chat template
        return []
    special = sorted(getattr(tokenizer, "all_special_tokens", []) or [], key=len, reverse=True)
    for tok in special:
        rendered = rendered.replace(tok, "\n")
    out = []
    for line in rendered.replace(mark, "\n").splitlines():
        line = line.strip()
        if len(line) >= 6 and line.lower() not in ROLE_NAMES:
            out.append(line)
            # each sentence of a system prompt alone too ("You are Qwen, created by Alibaba Cloud.")
            out += [s.strip() for s in re.split(r"(?<=[.!?])\s+", line) if len(s.strip()) >= 12 and s.strip() != line]
    return out


@dataclass
class AnswerAudit:
    """Checks generations for template leaks (build one per tokenizer with :meth:`for_tokenizer`)."""

    fragments: list[str] = field(default_factory=_instruction_fragments)
    """Text that must not appear in an answer (matched case-insensitively)."""
    special_ids: frozenset[int] = frozenset()
    """Special token ids that must not be generated."""
    end_ids: frozenset[int] = frozenset()
    """Ids that end a turn (allowed, as the last token)."""

    @classmethod
    def for_tokenizer(cls, tokenizer) -> AnswerAudit:
        if tokenizer is None:
            return cls()
        fragments = _instruction_fragments() + template_fragments(tokenizer)
        ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        ids |= {i for i, t in added.items() if getattr(t, "special", False)}
        end = {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set()
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        end |= {vocab[t] for t in END_TOKENS if t in vocab}
        return cls(fragments=list(dict.fromkeys(fragments)), special_ids=frozenset(ids), end_ids=frozenset(end))

    def leak(self, text: str, token_ids: list[int] | None = None) -> str | None:
        """What leaked (a short reason), or None for a clean answer."""
        low = text.lower()
        for frag in self.fragments:
            if frag.lower() in low:
                return f"template text {frag[:40]!r}"
        if _ROLE_RUN_ON.search(text):
            return "role name after the answer"
        if _CONTEXT_NUMBER.search(text):
            return "context numbering ([1] ...)"
        if token_ids:
            body = token_ids[:-1] if token_ids[-1] in self.end_ids else token_ids
            bad = [t for t in body if t in self.special_ids]
            if bad:
                return f"special token id {bad[0]}"
        return None

    def check(self, text: str, token_ids: list[int] | None = None, finish_reason: str | None = None) -> dict:
        """The audit fields of an answer row."""
        reason = self.leak(text, token_ids)
        row = {"template_leak": reason is not None, "hit_max_tokens": finish_reason == "length"}
        if reason:
            row["leak"] = reason
        return row


def count(rows: list[dict]) -> dict:
    """Template leaks and answers cut at max_tokens among ``rows``."""
    return {"template_leaks": sum(bool(r.get("template_leak")) for r in rows),
            "hit_max_tokens": sum(bool(r.get("hit_max_tokens")) for r in rows)}
