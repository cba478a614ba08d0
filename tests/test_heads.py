"""Label heads on causal LMs: pooling, training, an exact save/load round trip, the same
numerics in training and prediction, probabilities, and a probe that trains the head alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fin_tasks.artifacts import read_jsonl
from fin_tasks.config import ConfigError, Params, parse_params
from fin_tasks.encoding import collate, encode_head
from fin_tasks.heads import LabelHead, last_real_token, with_label_head
from fin_tasks.models import load_base, load_tokenizer, read_base_ref
from fin_tasks.predict import load_variant, predict_run
from fin_tasks.predictions import is_distribution
from fin_tasks.runs import resolve_run
from fin_tasks.train import train

from conftest import QUANT, make_params

LABELS = ("premise", "claim")


def head_params(body: str = "lora", model: dict | None = None, **head) -> Params:
    """The test params with a label-head run `tiny-head` on Task 1."""
    raw = make_params(model, hyper={"max_steps": 4}).model_dump(mode="json")
    raw["train"]["runs"]["tiny-head"] = {"model": "tiny", "task": "finarg_ecc",
                                         "head": {"body": body} | head}
    raw["predict"] = {"splits": ["valid", "test"], "batch_size": 3}
    return parse_params(raw)


def _head(workspace: Path, params: Params) -> tuple[LabelHead, object]:
    config = params.models["tiny"]
    ref = read_base_ref(workspace / "base/tiny")
    torch.manual_seed(0)
    model = with_label_head(load_base(config, ref), config, params.train.runs["tiny-head"].head,
                            LABELS)
    return model.eval(), load_tokenizer(ref)


def test_the_last_real_token_is_found_whatever_the_padding() -> None:
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_real_token(right).tolist() == [2, 4, 0]
    assert last_real_token(left).tolist() == [4, 4, 4]


def test_a_row_gets_the_same_logits_padded_left_right_or_alone_when_pad_is_eos(
        workspace) -> None:
    model, tokenizer = _head(workspace, head_params(model={"quantization": None}))
    pad = tokenizer.eos_token_id  # the pad token of models without one (SmolLM2, Llama)
    rows = [[5, 9, 12, 7, pad], [5, 9], [5, 9, 12, 30, 31, 32, 33]]  # the first ends with eos
    alone = [model(input_ids=torch.tensor([r]), attention_mask=torch.ones(1, len(r),
                                                                          dtype=torch.long)
                   ).logits[0] for r in rows]
    width = max(map(len, rows))
    for side in ("left", "right"):
        ids = torch.full((len(rows), width), pad)
        mask = torch.zeros_like(ids)
        for n, r in enumerate(rows):
            span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[n, span], mask[n, span] = torch.tensor(r), 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        for n in range(len(rows)):
            assert torch.allclose(logits[n], alone[n], atol=1e-5), (side, n)


def test_the_head_input_follows_its_template_and_is_cut_at_max_length(workspace) -> None:
    tokenizer = load_tokenizer(read_base_ref(workspace / "base/tiny"))
    record = {"text": "Revenue rose " + "strongly " * 200, "query": "Q", "gold": 1}
    head = head_params(template="Sentence: {text}\nLabel:").train.runs["tiny-head"].head
    (example,) = encode_head([record], tokenizer, head, 32)
    assert len(example.input_ids) == 32 and example.labels == 1
    assert tokenizer.decode(example.input_ids).rstrip().endswith("Label:")
    (unlabeled,) = encode_head([record | {"gold": None}], tokenizer, head, 32)
    assert unlabeled.labels == -100


@pytest.mark.parametrize("mistake, message", [
    ({"template": "{sentence}"}, "may name {text} and {query}"),
    ({"body": "all"}, "body"),
])
def test_a_head_mistake_in_params_is_named(mistake: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        head_params(**mistake)


def test_a_head_needs_a_causal_lm_and_a_label_task() -> None:
    raw = head_params().model_dump(mode="json")
    raw["train"]["runs"]["tiny-head"]["model"] = "minilm"
    with pytest.raises(ConfigError, match="a label head goes on a causal LM"):
        parse_params(raw)


BF16 = {"dtype": "bfloat16", "quantization": QUANT | {"compute_dtype": "bfloat16"}}


def train_keeping_logits(params: Params, run: str, workspace: Path, out: Path) -> torch.Tensor:
    """Train `run` into `out / "train"`; the logits its trained model (the weights it saves)
    gives for the valid rows, taken at the end of training."""
    import fin_tasks.train as training

    captured, save = [], training._save

    def keep_logits(run, loop, progress, tokenizer, out_dir, record):
        metrics = save(run, loop, progress, tokenizer, out_dir, record)
        batch = collate(loop.valid_set, loop.pad_id, torch.device("cpu"))
        loop.model.eval()
        with torch.no_grad():
            captured.append(loop.model(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"]).logits)
        return metrics

    training._save = keep_logits
    try:
        inputs = resolve_run(params, run)
        train(inputs, workspace / "prepare" / inputs.entry.task, workspace / "base/tiny",
              out / "train", checkpoint_root=out / "ck")
    finally:
        training._save = save
    return captured[0]


@pytest.fixture(scope="module")
def trained_head(workspace: Path, tmp_path_factory) -> tuple[Path, Params, torch.Tensor]:
    """A QLoRA head run on the tiny 4-bit model with bf16-stored unquantized weights and bf16
    compute, and the logits it gave for the valid rows at the end of training."""
    params = head_params(model=BF16)
    out = tmp_path_factory.mktemp("head")
    return out, params, train_keeping_logits(params, "tiny-head", workspace, out)


def test_a_qlora_head_trains_its_head_and_adapter_and_saves_them_together(trained_head) -> None:
    out, _, _ = trained_head
    folder = out / "train" / "head"
    assert {"head.safetensors", "head.json", "adapter_model.safetensors",
            "adapter_config.json"} <= {p.name for p in folder.iterdir()}
    from safetensors.torch import load_file

    adapter = load_file(str(folder / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())


def test_predict_computes_the_logits_training_computed(workspace, trained_head) -> None:
    """The head reloaded on a fresh 4-bit, bf16-stored base scores the valid rows as the
    trained model did at the end of training: norms and biases in float32 as in training."""
    out, params, captured = trained_head
    config = params.models["tiny"]
    model = load_variant("head", config, LABELS, workspace / "base/tiny", out / "train")
    tokenizer = load_tokenizer(read_base_ref(out / "train" / "tokenizer"))
    records = [r for r in read_jsonl(workspace / "prepare/finarg_ecc/valid.jsonl")]
    examples = encode_head(records, tokenizer, params.train.runs["tiny-head"].head,
                           params.train.hyper("tiny-head").max_length)
    batch = collate(examples, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, captured, atol=1e-5, rtol=0)


def test_predict_computes_the_logits_training_computed_with_an_lm_adapter(
        workspace, tmp_path) -> None:
    """The same for a generative QLoRA adapter (bf16 storage and compute): prediction gives
    the base the float32 norms and vocabulary compute of training."""
    params = head_params(model=BF16)
    captured = train_keeping_logits(params, "tiny-t1", workspace, tmp_path)
    model = load_variant("adapter", params.models["tiny"], LABELS, workspace / "base/tiny",
                         tmp_path / "train")
    tokenizer = load_tokenizer(read_base_ref(tmp_path / "train" / "tokenizer"))
    from fin_tasks.encoding import encode

    examples = encode(read_jsonl(workspace / "prepare/finarg_ecc/valid.jsonl"), tokenizer,
                      params.models["tiny"], params.train.hyper("tiny-t1").max_length)
    batch = collate(examples, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, captured, atol=1e-5, rtol=0)


def test_a_head_run_predicts_probabilities_and_is_scored(workspace, trained_head,
                                                         tmp_path) -> None:
    out, params, _ = trained_head
    info = predict_run(resolve_run(params, "tiny-head"), workspace / "prepare/finarg_ecc",
                       workspace / "base/tiny", out / "train", tmp_path)
    assert list(info["variants"]) == ["head"]
    for split in ("valid", "test"):
        rows = read_jsonl(tmp_path / "head" / f"{split}.jsonl")
        assert rows and all(is_distribution(r["probs"], 2) for r in rows)
        assert all(r["label"] == LABELS[max(range(2), key=r["probs"].__getitem__)]
                   for r in rows)


def test_a_probe_trains_the_head_alone(workspace, tmp_path) -> None:
    params = head_params(body="frozen")
    model, _ = _head(workspace, params)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["score.weight",
                                                                            "score.bias"]
    train(resolve_run(params, "tiny-head"), workspace / "prepare/finarg_ecc",
          workspace / "base/tiny", tmp_path / "train", checkpoint_root=tmp_path / "ck")
    names = {p.name for p in (tmp_path / "train" / "head").iterdir()}
    assert "head.safetensors" in names and "adapter_model.safetensors" not in names


def test_a_head_run_resumes_exactly_after_a_kill(workspace, tmp_path) -> None:
    """Head and adapter both come back from the checkpoint: the resumed run's files equal
    the uninterrupted run's."""
    params = head_params()
    run = resolve_run(params, "tiny-head")
    args = (run, workspace / "prepare/finarg_ecc", workspace / "base/tiny")
    train(*args, tmp_path / "straight", checkpoint_root=tmp_path / "ck1")

    def crash(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt("simulated kill at step 3")

    with pytest.raises(KeyboardInterrupt):
        train(*args, tmp_path / "resumed", checkpoint_root=tmp_path / "ck2", on_step=crash)
    resumed = train(*args, tmp_path / "resumed", checkpoint_root=tmp_path / "ck2")
    assert resumed["steps"] == 4
    from safetensors.torch import load_file

    for name in ("head.safetensors", "adapter_model.safetensors"):
        a = load_file(str(tmp_path / "straight/head" / name))
        b = load_file(str(tmp_path / "resumed/head" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_head_learns_a_three_label_task_defined_in_params(workspace, tmp_path) -> None:
    """Sentiment (negative / neutral / positive, a task added by params) through train and
    predict: three probabilities a row."""
    raw = head_params(model={"quantization": None}).model_dump(mode="json")
    raw["train"]["runs"]["tiny-head"]["task"] = "sentiment"
    params = parse_params(raw)
    train(resolve_run(params, "tiny-head"), workspace / "prepare/sentiment",
          workspace / "base/tiny", tmp_path / "train", checkpoint_root=tmp_path / "ck")
    predict_run(resolve_run(params, "tiny-head"), workspace / "prepare/sentiment",
                workspace / "base/tiny", tmp_path / "train", tmp_path / "predict")
    rows = read_jsonl(tmp_path / "predict/head/valid.jsonl")
    assert rows and all(is_distribution(r["probs"], 3) for r in rows)
    assert {r["label"] for r in rows} <= {"negative", "neutral", "positive"}


def test_a_multiple_choice_head_must_read_the_options() -> None:
    raw = head_params().model_dump(mode="json")
    raw["tasks"]["fineval"] = {"type": "fineval", "data": "data/demo/fineval",
                               "splits": {"train": "dev", "test": "val"}}
    raw["train"]["runs"]["tiny-head"]["task"] = "fineval"
    with pytest.raises(ConfigError, match=r"options are in its \{query\}"):
        parse_params(raw)
    raw["train"]["runs"]["tiny-head"]["head"]["template"] = "{query}"
    assert parse_params(raw).train.runs["tiny-head"].head.template == "{query}"
