"""Training examples: token ids plus which tokens carry loss, under a named loss policy.

A recipe (:mod:`prag_vllm.recipes`) describes each training sequence as a list
of :class:`Piece` s of text with a *role*:

- ``template``: the chat template's own text (role tags, the default system prompt,
  the end-of-turn markup) and the project's fixed instructions ("Answer the question
  with a short phrase ...", "Context:", "Question:");
- ``question``: the question asked;
- ``context``: a passage shown inside a prompt (as the standard and combined modes do);
- ``passage``: the document's own text (or a rewrite) trained as plain text;
- ``answer``: the answer, and the end-of-turn token right after it (trained, so that
  generation stops after the answer).

The whole sequence is rendered as one string and tokenised once (so the tokens are
those the model sees at inference); each token takes the role of the characters it
covers (from the tokenizer's offset mapping). A loss policy then says which roles are
targets:

========  =========================================================
policy    roles with loss
========  =========================================================
full      every token (PRAG's code: the chat template and system prompt too)
content   ``passage`` and ``answer``
answer    ``answer`` only
========  =========================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prag_vllm.errors import InputError

ROLES = ("template", "question", "context", "passage", "answer")
LOSS_POLICIES: dict[str, frozenset[str]] = {
    "full": frozenset(ROLES),
    "content": frozenset({"passage", "answer"}),
    "answer": frozenset({"answer"}),
}
"""Loss policy name -> the roles whose tokens are trained."""


def check_loss_policy(name: object) -> str:
    if not isinstance(name, str) or name not in LOSS_POLICIES:
        raise InputError(f"unknown loss policy {name!r}; choose from {', '.join(LOSS_POLICIES)}")
    return name


@dataclass(frozen=True)
class Piece:
    """A run of text in a training sequence and its role."""

    text: str
    role: str


@dataclass
class Example:
    """One tokenised training sequence."""

    input_ids: list[int]
    """Token ids of the whole sequence (truncated to the trainer's ``max_length``)."""
    targets: list[bool]
    """Per token: whether predicting it carries loss (token 0 never does: nothing predicts it)."""
    objective: str = "ce"
    """``ce``: next-token cross-entropy on the targets. ``kl``: KL divergence from the
    teacher's next-token distribution on the targets (context distillation)."""
    teacher_ids: list[int] | None = None
    """``kl`` only: the teacher's sequence (with the passage in its prompt)."""
    teacher_targets: list[bool] | None = None
    """``kl`` only: the teacher's target tokens (the same tokens as the student's targets)."""
    roles: list[str] = field(default_factory=list)
    """Per token role (for inspection and tests)."""

    @property
    def n_targets(self) -> int:
        """Positions whose next token carries loss (HF's shifted-label count)."""
        return sum(self.targets[1:])

    def __len__(self) -> int:
        return len(self.input_ids)


def _char_roles(pieces: list[Piece]) -> tuple[str, list[str]]:
    text, roles = [], []
    for p in pieces:
        if p.role not in ROLES:
            raise ValueError(f"unknown piece role {p.role!r}")
        text.append(p.text)
        roles += [p.role] * len(p.text)
    return "".join(text), roles


def tokenize_pieces(tokenizer, pieces: list[Piece], *, eot_after_answer: bool,
                    max_length: int, add_special_tokens: bool = False) -> tuple[list[int], list[str]]:
    """Token ids and per-token roles of ``pieces`` rendered as one string.

    A token covering characters of several roles takes the role of its first character
    that is not template. With ``eot_after_answer`` the first token after each answer
    (the template's end-of-turn token) is an ``answer`` token too.
    """
    text, char_roles = _char_roles(pieces)
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                    truncation=True, max_length=max_length)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    roles: list[str] = []
    for start, end in offsets:
        span = char_roles[start:end] or ["template"]
        roles.append(next((r for r in span if r != "template"), "template"))
    if eot_after_answer:
        ends = [i for i in range(1, len(roles)) if roles[i - 1] == "answer" and roles[i] == "template"]
        for i in ends:
            roles[i] = "answer"
    return ids, roles


def make_example(tokenizer, pieces: list[Piece], policy: str, *, max_length: int,
                 eot_after_answer: bool = True, add_special_tokens: bool = False) -> Example:
    """Tokenise ``pieces`` and mark the tokens ``policy`` trains."""
    trained = LOSS_POLICIES[check_loss_policy(policy)]
    ids, roles = tokenize_pieces(tokenizer, pieces, eot_after_answer=eot_after_answer, max_length=max_length,
                                 add_special_tokens=add_special_tokens)
    targets = [r in trained for r in roles]
    if targets:
        targets[0] = False
    return Example(input_ids=ids, targets=targets, roles=roles)


def chat_pieces(tokenizer, user_pieces: list[Piece], answer: str | None = None,
                assistant_prefix: str = "") -> list[Piece]:
    """The chat-templated turn ``user -> assistant`` as pieces.

    The template is rendered once with placeholders; the text around them is
    ``template``. ``answer`` None renders the generation prompt only (PRAG's code then
    appends its assistant text after it, with no end of turn).
    """
    user_mark, answer_mark = "\x00PRAG-USER\x00", "\x00PRAG-ANSWER\x00"
    messages = [{"role": "user", "content": user_mark}]
    if answer is None:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        messages.append({"role": "assistant", "content": assistant_prefix + answer_mark})
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    before, _, rest = rendered.partition(user_mark)
    out = [Piece(before, "template"), *user_pieces]
    if answer is None:
        return out + [Piece(rest, "template")] if rest else out
    middle, _, after = rest.partition(answer_mark)
    return out + [Piece(middle, "template"), Piece(answer, "answer"), Piece(after, "template")]
