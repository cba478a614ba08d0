"""Chat-model correctness on tiny tokenizers: the training sequence is what the template
renders, the end-of-turn token is learned and stops generation, no BOS is doubled, and a
template without a system role or a base model without a template both work."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from fin_tasks.models import load_tokenizer, read_base_ref
from fin_tasks.predict import _stop_ids, generate
from fin_tasks.prompting import (IGNORE, answer_separator, encode_example, encode_text,
                                 end_of_turn_id, render_prompt)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Gemma's shape: writes its own BOS, has no system role (refuses one), ends with <end_of_turn>.
GEMMA = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
         "{{ raise_exception('System role not supported') }}{% endif %}"
         "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
         "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
RECORD = {"query": "Analyze.\nText: Revenue rose 12%.\nAnswer:", "answer": "premise"}


@pytest.fixture
def tokenizer(workspace: Path):
    """The tiny model's byte-level BPE tokenizer (a fresh copy each test)."""
    return copy.deepcopy(load_tokenizer(read_base_ref(workspace / "base/tiny")))


def _with_template(tokenizer, template: str, specials: list[str], bos_by_default: bool = False):
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = template
    if bos_by_default:  # the tokenizer itself puts a BOS before every text, like Gemma's
        from tokenizers.processors import TemplateProcessing

        tokenizer._tokenizer.post_processor = TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    return tokenizer


def _learned(ids: list[int], labels: list[int]) -> list[int]:
    return [i for i, label in zip(ids, labels) if label != IGNORE]


def test_a_chatml_example_is_exactly_the_rendered_conversation(tokenizer) -> None:
    tokenizer = _with_template(tokenizer, CHATML, ["<|im_start|>", "<|im_end|>"])
    ids, labels = encode_example(RECORD, tokenizer, 512, use_chat_template=True)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": RECORD["query"]},
         {"role": "assistant", "content": RECORD["answer"]}], tokenize=False)
    assert tokenizer.decode(ids) == rendered
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    learned = _learned(ids, labels)
    assert tokenizer.decode(learned) == "premise<|im_end|>\n"
    assert end in learned and tokenizer.eos_token_id not in learned  # the template's end
    prompt = render_prompt(RECORD, tokenizer, True)
    assert ids[: len(ids) - len(learned)] == encode_text(tokenizer, prompt)  # = predict's prompt


def test_generation_stops_at_the_templates_end_of_turn(tokenizer) -> None:
    tokenizer = _with_template(tokenizer, CHATML, ["<|im_start|>", "<|im_end|>"])
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tokenizer) == end

    class Config:
        eos_token_id = None

    class Model:
        generation_config = Config()

    assert end in _stop_ids(Model(), tokenizer)
    assert answer_separator(tokenizer, True) == "" and answer_separator(tokenizer, False) == " "


def test_a_template_that_writes_its_bos_gets_no_second_one(tokenizer) -> None:
    tokenizer = _with_template(tokenizer, GEMMA, ["<start_of_turn>", "<end_of_turn>"],
                               bos_by_default=True)
    bos = tokenizer.bos_token_id
    assert tokenizer("x")["input_ids"][0] == bos  # the tokenizer adds one by default
    ids, labels = encode_example(RECORD, tokenizer, 512, use_chat_template=True)
    assert ids[0] == bos and ids[1] != bos and ids.count(bos) == 1
    assert tokenizer.decode(_learned(ids, labels)) == "premise<end_of_turn>\n"
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<end_of_turn>")
    # a prompt without the template still gets the tokenizer's BOS, once
    plain = encode_text(tokenizer, RECORD["query"])
    assert plain[0] == bos and plain.count(bos) == 1


def test_a_base_model_without_template_learns_answer_and_eos(tokenizer) -> None:
    assert not tokenizer.chat_template
    ids, labels = encode_example(RECORD, tokenizer, 512, use_chat_template=True)
    assert tokenizer.decode(ids[: len(ids) - len(_learned(ids, labels))]) == RECORD["query"]
    learned = _learned(ids, labels)
    assert learned[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(learned[:-1]) == " premise"


def test_a_long_answer_keeps_its_end_of_turn(tokenizer) -> None:
    tokenizer = _with_template(tokenizer, CHATML, ["<|im_start|>", "<|im_end|>"])
    record = {"query": "Q " * 200, "answer": "word " * 200}
    ids, labels = encode_example(record, tokenizer, 64, use_chat_template=True)
    assert len(ids) <= 64
    learned = _learned(ids, labels)
    assert tokenizer.decode(learned).endswith("<|im_end|>\n")
    assert tokenizer.decode(ids).rstrip().endswith("<|im_end|>")


def test_the_parser_sees_only_the_new_text(tokenizer, workspace: Path) -> None:
    from fin_tasks.models import load_base

    from conftest import make_params

    tokenizer = _with_template(tokenizer, CHATML, ["<|im_start|>", "<|im_end|>"])
    model = load_base(make_params({"quantization": None}).models["tiny"],
                      read_base_ref(workspace / "base/tiny"))
    model.resize_token_embeddings(len(tokenizer))
    prompt = render_prompt(RECORD, tokenizer, True)
    (text,) = generate(model, tokenizer, [prompt], max_new_tokens=6)
    assert "Analyze" not in text and "<|im_start|>" not in text and "<|im_end|>" not in text
