"""Prediction: batched generation equals one-by-one, choice scoring, variants, baselines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fin_tasks.artifacts import read_jsonl
from fin_tasks.baselines import lead
from fin_tasks.evaluate import evaluate_run
from fin_tasks.metrics import MISSING
from fin_tasks.models import load_base, load_tokenizer, read_base_ref
from fin_tasks.forward import shared_prefix_length
from fin_tasks.predict import (_batches, _left_padded, generate,
                               predict_run, score_choices)
from fin_tasks.runs import resolve_run
from fin_tasks.train import train

from conftest import make_params

PROMPTS = ["Analyze this sentence.\nText: Revenue rose 12%.\nAnswer:",
           "Text: We believe demand stays strong for the rest of the year, and beyond.\nAnswer:",
           "Text: Margins.\nAnswer:"]


@pytest.fixture(scope="module")
def tiny(workspace: Path):
    params = make_params({"quantization": None})
    ref = read_base_ref(workspace / "base/tiny")
    return load_base(params.models["tiny"], ref), load_tokenizer(ref)


def test_batched_left_padded_generation_equals_one_by_one(tiny) -> None:
    model, tokenizer = tiny
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=3)
    single = [generate(model, tokenizer, [p], max_new_tokens=8, batch_size=1)[0]
              for p in PROMPTS]
    assert batched == single and all(isinstance(t, str) for t in batched)


def test_a_shared_prompt_prefix_runs_once_and_changes_no_output(tiny) -> None:
    """The instruction every prompt starts with is computed once per batch: generations and
    choice scores are those of each prompt alone."""
    model, tokenizer = tiny
    instruction = ("Analyze sentences from earnings conference calls and identify their "
                   "argumentative function. Return only premise or claim.")
    prompts = [f"{instruction}\nText: {p.split('Text: ')[-1]}" for p in PROMPTS]
    ids, mask = _left_padded([tokenizer(p)["input_ids"] for p in prompts], tokenizer.pad_token_id)
    lengths = mask.sum(-1)
    assert shared_prefix_length(ids, mask, ids.shape[1] - lengths, int(lengths.min()) - 1) >= 8
    batched = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    assert batched == [generate(model, tokenizer, [p], max_new_tokens=8, batch_size=1)[0]
                       for p in prompts]
    choices = ["premise", "claim", "neither of the two"]
    together = score_choices(model, tokenizer, prompts, choices, batch_size=3)
    for prompt, row in zip(prompts, together):
        alone = score_choices(model, tokenizer, [prompt], choices, batch_size=1)[0]
        assert row == pytest.approx(alone, abs=1e-4)


def test_batches_cap_rows_and_padded_tokens() -> None:
    sizes = [300, 2400, 1800, 1700, 40, 50]
    assert _batches(sizes, 16, None) == [[1, 2, 3, 0, 5, 4]]
    # 2,400 alone; 1,800 + 1,700 pad to 3,600; then 300, 50, 40 (900 tokens)
    assert _batches(sizes, 16, 4096) == [[1], [2, 3], [0, 5, 4]]
    assert _batches(sizes, 2, 4096) == [[1], [2, 3], [0, 5], [4]]
    assert _batches(sizes, 16, 100) == [[1], [2], [3], [0], [5, 4]]  # a longer row: alone


def test_a_token_cap_on_batches_changes_no_output(tiny) -> None:
    model, tokenizer = tiny
    widths = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert len(_batches(widths, 3, max(widths))) == 3  # each prompt alone under this cap
    capped = generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=3,
                      batch_tokens=max(widths))
    assert capped == generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=3)
    choices = ["premise", "claim"]
    capped_scores = score_choices(model, tokenizer, PROMPTS, choices, 3,
                                  batch_tokens=max(widths))
    for row, expected in zip(capped_scores, score_choices(model, tokenizer, PROMPTS, choices, 3)):
        assert row == pytest.approx(expected, abs=1e-4)


def test_prediction_cuts_a_long_prompt_exactly_as_training_does(tiny) -> None:
    """One truncation for both: the prompt tokens generation and choice scoring read are the
    prompt tokens of the training example."""
    from fin_tasks.encoding import encode_causal
    from fin_tasks.prompting import prompt_budget

    model, tokenizer = tiny
    record = {"query": "Text: " + "revenue grew again " * 150 + "\nAnswer:", "answer": "claim"}
    (example,) = encode_causal([record], tokenizer, max_length=96, use_chat_template=False)
    trained_prompt = [t for t, label in zip(example.input_ids, example.labels) if label == -100]
    seen = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()), with_kwargs=True)
    try:
        budget = prompt_budget(96, 20)
        generate(model, tokenizer, [record["query"]], max_new_tokens=2, budget=budget)
        score_choices(model, tokenizer, [record["query"]], ["claim", "premise"],
                      budget=budget)
    finally:
        hook.remove()
    assert len(trained_prompt) < 96 and seen[0] == trained_prompt  # generation's prefill
    assert seen[2] == trained_prompt  # choice scoring's prefill (after generation's step)


def test_a_zero_shot_run_cuts_prompts_only_to_the_context(tiny) -> None:
    """No training saw these prompts: a run's `max_length` does not cut them."""
    from fin_tasks.config import PredictConfig
    from fin_tasks.predict import outputs_for
    from fin_tasks.tasks import task_from_config

    model, tokenizer = tiny
    params = make_params()
    task = task_from_config("finarg_ecc", params.tasks["finarg_ecc"])
    record = {"query": "Text: " + "revenue grew again " * 60 + "\nAnswer:"}
    seen = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        for trained in (True, False):
            outputs_for(task, params.models["tiny"], model, tokenizer, [record],
                        PredictConfig(mode="score"), 64, trained=trained)
    finally:
        hook.remove()
    assert seen[0] <= 64 - 20 < 150 < seen[-2]  # the zero-shot prefill keeps every token


def test_choice_scores_equal_separate_log_likelihoods(tiny) -> None:
    model, tokenizer = tiny
    choices = ["premise", "claim", "neither of the two"]  # one to several tokens each
    lengths = {len(tokenizer(" " + c, add_special_tokens=False)["input_ids"]) for c in choices}
    assert len(lengths) > 1 and max(lengths) > 1
    ending = [tokenizer.eos_token_id]  # the answer's closing, as training teaches it
    scores = score_choices(model, tokenizer, PROMPTS, choices, batch_size=2, ending=ending)
    for prompt, row in zip(PROMPTS, scores):
        for choice, value in zip(choices, row):
            ids = tokenizer(prompt)["input_ids"]
            tail = tokenizer(" " + choice, add_special_tokens=False)["input_ids"] + ending
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids + tail])).logits[0]
            logprobs = torch.log_softmax(logits.float(), -1)
            expected = sum(float(logprobs[len(ids) - 1 + k, t]) for k, t in enumerate(tail))
            # the mean per token, closing included: labels of any length compare fairly, and
            # a label that is a prefix of another pays for its end
            assert value == pytest.approx(expected / len(tail), abs=1e-4)


def test_lead_baseline() -> None:
    text = "DENVER -- Acme Corp. posted record sales. Shares rose 5%. More text follows."
    assert lead(text, None) == "DENVER -- Acme Corp."
    assert lead(text, 4) == "DENVER -- Acme Corp."
    assert lead("One two three", 10) == "One two three"


@pytest.fixture(scope="module")
def trained(workspace: Path, tmp_path_factory) -> tuple[Path, object]:
    params = make_params(hyper={"max_steps": 4})
    out = tmp_path_factory.mktemp("trained")
    train(resolve_run(params, "tiny-t1"), workspace / "prepare/finarg_ecc", workspace / "base/tiny",
          out / "tiny-t1", checkpoint_root=out / "ck")
    return out, params


@pytest.mark.parametrize("mode", ["generate", "score"])
def test_predict_and_evaluate_a_qlora_run(workspace, trained, tmp_path, mode) -> None:
    out, params = trained
    raw = params.model_dump(mode="json")
    raw["predict"] = {"mode": mode, "variants": ["base", "adapter", "merged"],
                      "splits": ["valid", "test"], "batch_size": 4}
    raw["evaluate"] = {"bootstrap": 50, "bertscore_model": None}
    from fin_tasks.config import parse_params

    params = parse_params(raw)
    info = predict_run(resolve_run(params, "tiny-t1"), workspace / "prepare/finarg_ecc",
                       workspace / "base/tiny", out / "tiny-t1", tmp_path / "predict")
    assert info["mode"] == mode and set(info["variants"]) == {"base", "adapter", "merged"}
    test_ids = [r["id"] for r in read_jsonl(workspace / "prepare/finarg_ecc/test.jsonl")]
    for variant in ("base", "adapter", "merged"):
        rows = read_jsonl(tmp_path / "predict" / variant / "test.jsonl")
        assert [r["id"] for r in rows] == test_ids
        if mode == "score":
            assert all(r["label"] != MISSING and len(r["scores"]) == 2 for r in rows)
    # Merging the adapter into a dequantized base predicts what base + adapter predicts, in
    # either mode: the same label probabilities, and in generate mode the same greedy text;
    # the base alone predicts otherwise (so the comparison can fail).
    base, adapter, merged = (read_jsonl(tmp_path / "predict" / variant / "valid.jsonl")
                             for variant in ("base", "adapter", "merged"))
    for a, m in zip(adapter, merged):
        assert a["probs"] == pytest.approx(m["probs"], abs=1e-4)
        assert a["output"] == m["output"] and a["label"] == m["label"]
        if mode == "score":
            assert a["scores"] == pytest.approx(m["scores"], abs=1e-4)
    assert max(abs(p - q) for b, a in zip(base, adapter)
               for p, q in zip(b["probs"], a["probs"])) > 1e-3
    result = evaluate_run(resolve_run(params, "tiny-t1"), workspace / "prepare/finarg_ecc",
                          tmp_path / "predict", tmp_path / "evaluate")
    metrics = json.loads((tmp_path / "evaluate/evaluation.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    valid = metrics["metrics"]["adapter"]["valid"]
    assert set(valid) >= {"accuracy", "f1_weighted", "f1_macro", "mcc", "missing_rate",
                          "f1_weighted_ci95"}
    assert "test" in metrics["metrics"]["adapter"]  # the demo test split is labeled
    headline = json.loads((tmp_path / "evaluate/headline/adapter.json").read_text())
    low, high = valid["f1_weighted_ci95"]  # dvc metrics show: the ranking metric and its CI
    assert headline == {"valid": valid["f1_weighted"], "valid_low": low, "valid_high": high,
                        "test": metrics["metrics"]["adapter"]["test"]["f1_weighted"],
                        "test_low": metrics["metrics"]["adapter"]["test"]["f1_weighted_ci95"][0],
                        "test_high": metrics["metrics"]["adapter"]["test"]["f1_weighted_ci95"][1]}


def test_greedy_decoding_equals_transformers_generate(tiny) -> None:
    """Our decoder (rows leave the batch when they stop) gives what model.generate gives."""
    from fin_tasks.predict import _left_padded, greedy

    model, tokenizer = tiny
    # a stop token the untrained model emits early for some rows: rows finish at different steps
    encoded = [tokenizer(p)["input_ids"] for p in PROMPTS]
    ids, mask = _left_padded(encoded, tokenizer.pad_token_id)
    first = model(input_ids=ids, attention_mask=mask,
                  position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1].argmax(-1)
    stop = int(first[0])
    ours = greedy(model, ids, mask, 12, {stop})
    reference = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                               max_new_tokens=12, eos_token_id=stop,
                               pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:].tolist()
    for row, tokens in zip(reference, ours):
        expected = row[: row.index(stop) + 1] if stop in row else row
        assert tokens == expected
    assert len(ours[0]) == 1 and any(len(t) > 1 for t in ours)  # rows did finish apart


def test_a_zero_shot_run_predicts_with_its_base_only(workspace, tmp_path) -> None:
    from fin_tasks.config import parse_params

    raw = make_params().model_dump(mode="json")
    raw["train"]["runs"]["tiny-zero"] = {"model": "tiny", "task": "finarg_ecc",
                                         "zero_shot": True}
    raw["predict"] = {"variants": ["base", "adapter"], "base_splits": ["valid"],
                      "batch_size": 4}
    params = parse_params(raw)
    metrics = train(resolve_run(params, "tiny-zero"), workspace / "prepare/finarg_ecc",
                    workspace / "base/tiny", tmp_path / "train", checkpoint_root=tmp_path / "ck")
    assert metrics["steps"] == 0 and not (tmp_path / "train" / "adapter").exists()
    info = predict_run(resolve_run(params, "tiny-zero"), workspace / "prepare/finarg_ecc",
                       workspace / "base/tiny", tmp_path / "train", tmp_path / "predict")
    # the base is the only variant, so it predicts every split (base_splits is for comparisons)
    assert set(info["variants"]) == {"base"} and set(info["variants"]["base"]) == {"valid", "test"}
    raw["models"]["minilm"]["kind"] = "encoder"
    raw["train"]["runs"]["bad"] = {"model": "minilm", "task": "sentiment", "zero_shot": True}
    with pytest.raises(ValueError, match="zero_shot: only a causal LM"):
        parse_params(raw)


def test_base_splits_and_a_runs_predict_splits_limit_what_is_predicted(
        workspace, trained, tmp_path) -> None:
    from fin_tasks.config import parse_params

    out, params = trained
    raw = params.model_dump(mode="json")
    raw["predict"] = {"variants": ["base", "adapter"], "splits": ["valid", "test"],
                      "base_splits": ["valid"], "batch_size": 4, "mode": "score"}
    info = predict_run(resolve_run(parse_params(raw), "tiny-t1"), workspace / "prepare/finarg_ecc",
                       workspace / "base/tiny", out / "tiny-t1", tmp_path / "predict")
    assert set(info["variants"]["base"]) == {"valid"}
    assert set(info["variants"]["adapter"]) == {"valid", "test"}
    assert not (tmp_path / "predict/base/test.jsonl").exists()
    raw["train"]["runs"]["tiny-t1"]["predict_splits"] = ["valid"]  # a run ranked, not submitted
    info = predict_run(resolve_run(parse_params(raw), "tiny-t1"), workspace / "prepare/finarg_ecc",
                       workspace / "base/tiny", out / "tiny-t1", tmp_path / "valid-only")
    assert {v: set(s) for v, s in info["variants"].items()} == {"base": {"valid"},
                                                                "adapter": {"valid"}}


def test_weights_changed_after_training_are_refused(workspace, trained, tmp_path) -> None:
    import shutil

    from fin_tasks.errors import ModelError

    out, params = trained
    copy = tmp_path / "tiny-t1"
    shutil.copytree(out / "tiny-t1", copy)
    weights = copy / "adapter" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated, as a full disk would leave it
    with pytest.raises(ModelError, match=r"adapter_model\.safetensors is not the file `train` "
                                         r"wrote .*dvc checkout"):
        predict_run(resolve_run(params, "tiny-t1"), workspace / "prepare/finarg_ecc",
                    workspace / "base/tiny", copy, tmp_path / "predict")
    assert not (tmp_path / "predict").exists()


def test_nan_logits_are_an_error_not_an_empty_answer(tiny) -> None:
    import copy

    from fin_tasks.errors import ModelError

    model, tokenizer = tiny
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.lm_head.weight.fill_(float("nan"))
    with pytest.raises(ModelError, match="NaN logits"):
        generate(broken, tokenizer, PROMPTS[:1], max_new_tokens=4)
    with pytest.raises(ModelError, match="NaN logits"):
        score_choices(broken, tokenizer, PROMPTS[:1], ["premise", "claim"])


@pytest.mark.parametrize("mode", ["generate", "score"])
def test_a_dequantized_base_predicts_what_the_4bit_base_predicts(
        workspace, trained, tmp_path, mode) -> None:
    """`predict.dequantize` computes from the values the 4-bit layers use: the same outputs."""
    from fin_tasks.config import parse_params

    out, params = trained
    raw = params.model_dump(mode="json")
    predicted = {}
    for dequantize in (False, True):
        raw["predict"] = {"mode": mode, "variants": ["base", "adapter"], "splits": ["valid"],
                          "batch_size": 4, "dequantize": dequantize}
        predict_run(resolve_run(parse_params(raw), "tiny-t1"), workspace / "prepare/finarg_ecc",
                    workspace / "base/tiny", out / "tiny-t1", tmp_path / str(dequantize))
        predicted[dequantize] = {v: read_jsonl(tmp_path / str(dequantize) / v / "valid.jsonl")
                                 for v in ("base", "adapter")}
    for variant in ("base", "adapter"):
        quantized, plain = predicted[False][variant], predicted[True][variant]
        assert [r["output"] for r in quantized] == [r["output"] for r in plain]
        for q, p in zip(quantized, plain):
            assert q.get("scores") == pytest.approx(p.get("scores"), abs=1e-4)
    from fin_tasks.predict import load_variant

    model = load_variant("adapter", params.models["tiny"], ("premise", "claim"),
                         workspace / "base/tiny", out / "tiny-t1", dequantize=True)
    layers = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" not in layers and "Linear" in layers
