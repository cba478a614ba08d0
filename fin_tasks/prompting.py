"""One way to turn a record into tokens, shared by `train`, `predict` and `merge`.

With a chat template, a prompt is what the template renders for the user turn plus the
generation prompt, and a training example is exactly what it renders for the user turn plus
the assistant turn: the answer, then the template's own end-of-turn token (ChatML's
`<|im_end|>`, Gemma's `<end_of_turn>`), which generation stops at. Without a template (a base
model, a tiny test model) the prompt is the organizers' raw query and the answer follows it
after a space, ended by the tokenizer's EOS. Special tokens that the template writes itself
(a BOS) are never added a second time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fin_tasks.errors import ModelError

IGNORE = -100  # label id that the loss skips (prompt and padding tokens)


@dataclass(frozen=True)
class Turn:
    """The texts of one exchange: the prompt, the answer as the model writes it (with any
    separator before it), and what closes the answer (end-of-turn or EOS)."""

    prompt: str
    answer: str
    closing: str


def uses_template(tokenizer: Any, use_chat_template: bool) -> bool:
    """Whether prompts go through the tokenizer's chat template."""
    return use_chat_template and bool(getattr(tokenizer, "chat_template", None))


def render_prompt(record: dict[str, Any], tokenizer: Any, use_chat_template: bool) -> str:
    """The prompt text: the chat template's user turn and generation prompt, or the query."""
    if uses_template(tokenizer, use_chat_template):
        return tokenizer.apply_chat_template([{"role": "user", "content": record["query"]}],
                                             tokenize=False, add_generation_prompt=True)
    return record["query"]


def head_text(record: dict[str, Any], tokenizer: Any, template: str,
              use_chat_template: bool) -> str:
    """What a label head reads for one record (`fin_tasks.heads`): its template filled with the
    record's `text` and `query`, rendered as the chat template's user turn if asked."""
    text = template.format_map({"text": record.get("text", ""), "query": record.get("query", "")})
    if uses_template(tokenizer, use_chat_template):
        return render_prompt({"query": text}, tokenizer, True)
    return text


def render_turn(query: str, answer: str, tokenizer: Any, use_chat_template: bool) -> Turn:
    """The prompt and the answer turn exactly as the template renders them (or, without
    one, the query, " answer" and the EOS token)."""
    prompt = render_prompt({"query": query}, tokenizer, use_chat_template)
    if not uses_template(tokenizer, use_chat_template):
        return Turn(prompt, " " + answer, tokenizer.eos_token or "")
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": query}, {"role": "assistant", "content": answer}],
        tokenize=False)
    rest = full[len(prompt):]
    at = rest.find(answer)
    if not full.startswith(prompt) or at < 0:
        raise ModelError("the tokenizer's chat template renders the user turn differently "
                         "once an assistant turn follows, so prompt and training example "
                         "would not agree; set `chat_template: false` for this model")
    return Turn(prompt, rest[:at + len(answer)], rest[at + len(answer):])


def answer_separator(tokenizer: Any, use_chat_template: bool) -> str:
    """What stands between the prompt and the answer's first word ("" after a template's
    generation prompt, " " after the organizers' `Answer:`)."""
    turn = render_turn("q", "a", tokenizer, use_chat_template)
    return turn.answer[:-1]


def answer_ending(tokenizer: Any, use_chat_template: bool) -> list[int]:
    """The token that closes an answer as training teaches it (the template's end-of-turn,
    else EOS): scored after each choice, so a label that is a prefix of another is not
    favoured."""
    closing = end_of_turn_id(tokenizer) if uses_template(tokenizer, use_chat_template) \
        else tokenizer.eos_token_id
    return [] if closing is None else [closing]


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The token a chat template closes the assistant's turn with (None without one)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    closing = render_turn("q", "a", tokenizer, True).closing
    ids = tokenizer(closing, add_special_tokens=False)["input_ids"] if closing.strip() else []
    return ids[0] if ids else None


def special_prefix(tokenizer: Any) -> list[int]:
    """Tokens the tokenizer puts before any text by default (a BOS, or nothing)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    return full[: len(full) - len(plain)] if full[len(full) - len(plain):] == plain else []


def encode_text(tokenizer: Any, text: str, prefix: list[int] | None = None) -> list[int]:
    """Token ids of a prompt: the tokenizer's special prefix (BOS) unless the text already
    starts with it (a template that writes its own BOS); never an EOS after it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = special_prefix(tokenizer) if prefix is None else prefix
    return ids if ids[: len(prefix)] == prefix else prefix + ids


def encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """`encode_text` of many texts in one tokenizer call."""
    if not texts:
        return []
    prefix = special_prefix(tokenizer)
    rows = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [ids if ids[: len(prefix)] == prefix else prefix + ids for ids in rows]


def keep_ends(ids: list[int], budget: int) -> list[int]:
    """At most `budget` tokens: a quarter from the start (the instruction), the rest from
    the end (the text's end and the answer cue); the middle goes."""
    if len(ids) <= budget:
        return ids
    head = budget // 4
    return ids[:head] + ids[len(ids) - (budget - head):]


ANSWER_TOKENS = 20  # generation budget of a classification answer (Task.max_new_tokens)


def answer_reserve(max_new_tokens: int, max_length: int) -> int:
    """Tokens of `max_length` kept for the answer: the task's generation budget, at most half
    (at least one). Whatever the answer, a prompt gets the rest, in training and prediction
    alike, so both see the same prompt tokens."""
    return max(1, min(max_new_tokens, max_length // 2))


def prompt_budget(max_length: int, max_new_tokens: int) -> int:
    """The most prompt tokens a run's examples keep (`keep_ends` cuts the rest), in training
    and prediction alike."""
    return max_length - answer_reserve(max_new_tokens, max_length)


def encode_example(record: dict[str, Any], tokenizer: Any, max_length: int,
                   use_chat_template: bool, max_new_tokens: int = ANSWER_TOKENS,
                   ) -> tuple[list[int], list[int]]:
    """Token ids and labels of one instruction record: the prompt (not learned), cut to
    `prompt_budget` as prediction cuts it, then the answer and its closing token(s) (learned),
    the answer cut to the reserve left, keeping its closing."""
    turn = render_turn(record["query"], record["answer"], tokenizer, use_chat_template)
    answer = tokenizer(turn.answer, add_special_tokens=False)["input_ids"]
    if uses_template(tokenizer, use_chat_template):
        closing = tokenizer(turn.closing, add_special_tokens=False)["input_ids"]
    else:
        closing = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    reserve = answer_reserve(max_new_tokens, max_length)
    answer = answer[: max(1, reserve - len(closing))] + closing
    budget = min(prompt_budget(max_length, max_new_tokens), max_length - len(answer))
    prompt = keep_ends(encode_text(tokenizer, turn.prompt), budget)
    return prompt + answer, [IGNORE] * len(prompt) + answer
