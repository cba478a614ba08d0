"""NumLLM: corpus, numeric choice questions, continual pre-training, checked adapter merges."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fin_tasks.config import CorpusConfig, QuestionsConfig, parse_params
from fin_tasks.corpus import build_corpus, chunk, clean
from fin_tasks.errors import ConfigError, DataError, ModelError
from fin_tasks.questions import LETTERS, build_questions, number_distractors, questions_schema
from fin_tasks.runs import resolve_merge, resolve_run
from fin_tasks.tasks import task_from_config
from fin_tasks.encoding import encode_corpus
from fin_tasks.train import train

from conftest import ROOT, make_params, write_jsonl

TEXTBOOK = ROOT / "data/demo/textbook"


# ---------------------------------------------------------------- corpus


def test_corpus_is_cleaned_deduplicated_and_chunked(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw/a.md").write_text(
        "# Heading one\n\nThe **balance** sheet lists assets of 652 million.\nIt is wrapped.\n\n"
        "- A [linked](http://x) point about equity.\n\nRepeated boilerplate sentence here.\n",
        encoding="utf-8")
    (tmp_path / "raw/b.txt").write_text(
        "资产负债表反映企业的财务状况。\n利润表反映经营成果。\n\nRepeated boilerplate sentence "
        "here.\n\nok\n", encoding="utf-8")
    manifest = build_corpus("c", CorpusConfig(data=str(tmp_path / "raw"), min_chars=5,
                                              chunk_chars=64), tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out/chunks.jsonl").open(encoding="utf-8")]
    text = "\n".join(r["text"] for r in rows)
    assert "**" not in text and "#" not in text and "](" not in text
    assert "The balance sheet lists assets of 652 million. It is wrapped." in text
    # CJK lines join without a space
    assert "资产负债表反映企业的财务状况。利润表反映经营成果。" in text
    assert text.count("Repeated boilerplate sentence here.") == 1
    assert manifest["dropped"] == {"duplicate paragraph": 1, "shorter than min_chars": 1}
    assert all(len(r["text"]) <= 64 for r in rows)
    assert [r["numeric"] for r in rows].count(True) >= 1


def test_chunks_end_at_sentence_boundaries_and_lose_no_text() -> None:
    paragraph = " ".join(f"Sentence {n} says something." for n in range(20))
    chunks = chunk([paragraph], 80)
    assert all(len(c) <= 80 for c in chunks)
    assert all(c.endswith(".") for c in chunks)
    assert " ".join(chunks) == paragraph


def test_clean_removes_invisible_characters() -> None:
    assert clean("a\u200bb\ufeff\x07c\r\nd\u00a0e") == "abc\nd e"


def test_corpus_errors_name_file_line_and_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "fine"}, {"body": "wrong field"}])
    with pytest.raises(DataError) as error:
        build_corpus("c", CorpusConfig(data=str(path)), tmp_path / "out")
    assert str(path) in str(error.value) and "line 2" in str(error.value)
    assert "'text'" in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no text files"):
        build_corpus("c", CorpusConfig(data=str(tmp_path / "empty")), tmp_path / "out")
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1/x.txt").write_bytes("first line\nbad \xe9 byte\n".encode("latin-1"))
    with pytest.raises(DataError, match="line 2.*UTF-8"):
        build_corpus("c", CorpusConfig(data=str(tmp_path / "latin1")), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- questions


@pytest.fixture(scope="module")
def question_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("questions")
    build_corpus("textbook", CorpusConfig(data=str(TEXTBOOK), chunk_chars=400), root / "corpus")
    config = QuestionsConfig(corpus="textbook", count=40, non_numeric_share=0.25, seed=5)
    manifest = build_questions("q", config, root / "corpus", root / "q")
    return root, manifest


def _rows(folder: Path) -> list[dict[str, str]]:
    return [row for path in sorted(folder.rglob("*.csv"))
            for row in csv.DictReader(path.open(encoding="utf-8"))]


def test_questions_are_valid_and_the_answer_restores_the_number(question_set) -> None:
    root, manifest = question_set
    rows = _rows(root / "q")
    assert len(rows) == manifest["built"] == 40
    assert manifest["numeric"] == 30 and manifest["non_numeric"] == 10  # the set share
    numeric = 0
    for row in rows:
        options = [row[letter] for letter in LETTERS]
        assert len(set(options)) == 4 and all(o.strip() for o in options)
        assert row["answer"] in LETTERS
        masked = row["question"].split("：", 1)[-1].split("? ", 1)[-1]
        start = masked.index("____")
        original = row["explanation"]
        correct = row[row["answer"]]
        assert original == masked[:start] + correct + masked[start + 4:]
        # no other option restores the sentence
        assert sum(masked.replace("____", o) == original for o in options) == 1
        if any(ch.isdigit() for ch in correct):
            numeric += 1
            assert original[start:start + len(correct)] == correct
    assert numeric == 30


def test_questions_are_seeded_and_written_in_the_fineval_layout(question_set,
                                                                tmp_path: Path) -> None:
    root, _ = question_set
    config = QuestionsConfig(corpus="textbook", count=40, non_numeric_share=0.25, seed=5)
    build_questions("q", config, root / "corpus", tmp_path / "again")
    for path in sorted((root / "q").rglob("*.csv")):
        assert path.read_bytes() == (tmp_path / "again" / path.relative_to(root / "q")).read_bytes()
    assert sorted(p.relative_to(root / "q").as_posix() for p in (root / "q").rglob("*.csv")) == [
        "dev/textbook_dev.csv", "val/textbook_val.csv"]
    params = parse_params({"tasks": {"mcq": {"type": "fineval", "data": str(root / "q"),
                                             "splits": {"train": "dev", "test": "val"}}}})
    from fin_tasks.prepare import prepare_task

    manifest = prepare_task("mcq", params.tasks["mcq"], params.prepare, tmp_path / "prepared")
    assert manifest["splits"]["test"]["rows"] == 8
    assert manifest["splits"]["test"]["numeric_rows"] + manifest["splits"]["train"][
        "numeric_rows"] + manifest["splits"]["valid"]["numeric_rows"] == 30


def test_number_distractors_perturb_scale_digits_sign_and_unit() -> None:
    rng = np.random.default_rng(0)
    made = number_distractors("652", "", "万元", rng)
    texts = [t for t, _ in made]
    assert "652万元" not in texts and len(set(texts)) == len(texts) >= 3
    kinds = {k for _, k in made}
    assert {"scale", "digit_swap", "sign", "unit"} <= kinds
    assert {"6520万元", "65.2万元"} & set(texts) and {"652元", "652亿元"} & set(texts)
    assert all(t != "1,200" for t, _ in number_distractors("1,200", "", "", rng))
    assert "12,000" in [t for t, _ in number_distractors("1,200", "", "", rng)] or \
        "120" in [t for t, _ in number_distractors("1,200", "", "", rng)]


def test_the_schema_rejects_an_invalid_question() -> None:
    good = {"id": 0, "question": "Q: The rate is ____.", "A": "5%", "B": "50%", "C": "0.5%",
            "D": "-5%", "answer": "A", "explanation": "The rate is 5%."}
    questions_schema().validate(pd.DataFrame([good]))
    from pandera.errors import SchemaError

    for bad, check in (({"B": "5%"}, "four distinct options"),
                       ({"answer": "B"}, "restores the original sentence"),
                       ({"answer": "E"}, "isin"), ({"question": "no blank"}, "one blank")):
        with pytest.raises(SchemaError, match=check):  # each refused by its own check
            questions_schema().validate(pd.DataFrame([good | bad]))


# ---------------------------------------------------------------- continual pre-training


def test_corpus_encoding_learns_every_token_in_windows(workspace) -> None:
    from fin_tasks.models import load_tokenizer, read_base_ref

    tokenizer = load_tokenizer(read_base_ref(workspace / "base" / "tiny"))
    text = "The present value of 1,000 dollars received in three years is 793.8 dollars. " * 8
    examples = encode_corpus([{"text": text}], tokenizer, max_length=32)
    full = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    assert [t for e in examples for t in e.input_ids] == full
    assert all(e.labels == e.input_ids and e.tokens <= 32 for e in examples)


def test_continual_pre_training_of_an_encoder_is_a_config_error() -> None:
    base = make_params().model_dump(mode="json")
    base["tasks"]["c"] = {"type": "corpus", "data": "x", "splits": {"train": "c.jsonl"}}
    base["train"]["runs"]["minilm-c"] = {"model": "minilm", "task": "c"}
    with pytest.raises(ConfigError, match="minilm-c: continual pre-training .* not an encoder"):
        parse_params(base)
    base["train"]["runs"]["minilm-c"]["model"] = "tiny"
    parse_params(base)


def test_perplexity_is_the_exponent_of_the_mean_token_loss() -> None:
    task = task_from_config("c", parse_params({"tasks": {"c": {
        "type": "corpus", "data": "x", "splits": {"train": "c.jsonl"}}}}).tasks["c"])
    settings = make_params().evaluate.model_copy(update={"bootstrap": 0})
    result = task.kind.score(task, [{}, {}], [{"nll": 6.0, "tokens": 3}, {"nll": 2.0, "tokens": 1}],
                   settings)
    assert result["perplexity"] == pytest.approx(math.exp(2.0))
    assert result["tokens"] == 4


# ---------------------------------------------------------------- merges


def _numllm_params(method: str = "sequential", **merge) -> object:
    """make_params plus a second LoRA run on another task and a merge of both adapters."""
    base = make_params().model_dump(mode="json")
    base["train"]["runs"]["tiny-s"] = {"model": "tiny", "task": "sentiment",
                                       "hyper": {"lr": 2e-2}}
    base["train"]["runs"]["tiny-t1"]["hyper"] = {"lr": 2e-2}
    base["merge"] = {"m": {"adapters": ["tiny-t1", "tiny-s"], "method": method,
                           "evaluate_on": "finarg_ecc", "weights": [1.0, 0.5]} | merge}
    return parse_params(base)


@pytest.fixture(scope="module")
def trained_pair(workspace, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two adapters on the same tiny 4-bit base, trained separately on two tasks."""
    root = tmp_path_factory.mktemp("pair")
    params = _numllm_params()
    for run, task in (("tiny-t1", "finarg_ecc"), ("tiny-s", "sentiment")):
        train(resolve_run(params, run), workspace / "prepare" / task, workspace / "base" / "tiny",
              root / "train" / run, checkpoint_root=root / "ckpt")
    return root


def _merge(params, workspace: Path, root: Path, out: Path) -> dict:
    from fin_tasks.merge import merge_adapters

    return merge_adapters(resolve_merge(params, "m"), workspace / "base" / "tiny", root / "train",
                          workspace / "prepare" / "finarg_ecc", out)


def _unmerged_reference(params, workspace: Path, root: Path, probe: dict) -> torch.Tensor:
    """Logits of the dequantized base carrying both adapters, computed here by hand."""
    from peft import PeftModel

    from fin_tasks.models import dequantized, load_base, read_base_ref

    config = params.models["tiny"]
    base = dequantized(load_base(config, read_base_ref(workspace / "base" / "tiny")), config)
    model = PeftModel.from_pretrained(base, str(root / "train/tiny-t1/adapter"), adapter_name="x")
    model.load_adapter(str(root / "train/tiny-s/adapter"), adapter_name="y")
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and "y" in module.scaling:
            module.scaling["y"] *= 0.5
    model.base_model.set_adapter(["x", "y"])
    model.eval()
    with torch.no_grad():
        return model(**probe).logits


def _probe(workspace: Path) -> dict[str, torch.Tensor]:
    from fin_tasks.models import load_tokenizer, read_base_ref

    tokenizer = load_tokenizer(read_base_ref(workspace / "base" / "tiny"))
    texts = ["Revenue grew 12% to 1,200 million.", "We expect margins to improve next year."]
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


@pytest.mark.parametrize("method", ["sequential", "cat"])
def test_exact_merges_match_the_unmerged_adapters(method, workspace, trained_pair,
                                                  tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    params = _numllm_params(method)
    record = _merge(params, workspace, trained_pair, tmp_path / "merged")
    assert record["check"]["passed"] and record["check"]["max_abs_diff"] <= 1e-4
    assert record["check"]["adapter_effect_max"] > 1e-2  # the adapters matter: a real check
    probe = _probe(workspace)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "model").eval()
    with torch.no_grad():
        logits = merged(**probe).logits
    reference = _unmerged_reference(params, workspace, trained_pair, probe)
    mask = probe["attention_mask"].bool()
    assert (logits[mask] - reference[mask]).abs().max() <= 1e-4
    assert merged.dtype == torch.float32


def test_merged_model_reloads_with_plain_transformers_and_no_peft(workspace, trained_pair,
                                                                  tmp_path: Path) -> None:
    _merge(_numllm_params(), workspace, trained_pair, tmp_path / "merged")
    files = sorted(p.name for p in (tmp_path / "merged" / "model").iterdir())
    assert "model.safetensors" in files and not any("adapter" in f for f in files)
    assert "quantization_config" not in json.loads(
        (tmp_path / "merged/model/config.json").read_text())
    script = ("import sys; sys.modules['peft'] = None; sys.modules['bitsandbytes'] = None\n"
              "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
              f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged/model')!r})\n"
              f"t = AutoTokenizer.from_pretrained({str(tmp_path / 'merged/tokenizer')!r})\n"
              "out = m(**t(['Revenue grew.'], return_tensors='pt')).logits\n"
              "print('ok', tuple(out.shape))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")


def test_an_approximate_merge_reports_its_error_and_fails_above_max_error(
        workspace, trained_pair, tmp_path: Path) -> None:
    record = _merge(_numllm_params("svd", svd_rank=1), workspace, trained_pair, tmp_path / "svd")
    assert not record["check"]["exact_method"] and record["check"]["limit"] is None
    assert record["check"]["max_abs_diff"] > 1e-4  # rank 1 cannot hold two rank-4 updates
    strict = _numllm_params("svd", svd_rank=1, max_error=1e-6)
    with pytest.raises(ModelError, match="failed its check"):
        _merge(strict, workspace, trained_pair, tmp_path / "strict")
    assert not (tmp_path / "strict").exists()


def test_merging_adapters_of_different_bases_is_refused(workspace, trained_pair,
                                                        tmp_path: Path) -> None:
    from fin_tasks.base import build_base

    other = make_params({"tiny": {"tokenizer_tasks": ["finarg_ecc"], "seed": 7}})
    build_base("tiny", other.models["tiny"], workspace / "prepare", tmp_path / "other-base")
    params = _numllm_params()
    train(resolve_run(params, "tiny-s"), workspace / "prepare" / "sentiment",
          tmp_path / "other-base", tmp_path / "train" / "tiny-s", checkpoint_root=tmp_path / "ckpt")
    (tmp_path / "train" / "tiny-t1").symlink_to(trained_pair / "train" / "tiny-t1")
    with pytest.raises(ModelError, match="'tiny-s' was trained on base .*different bases"):
        _merge(params, workspace, tmp_path, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_merge_of_runs_on_different_base_models_is_a_config_error() -> None:
    base = _numllm_params().model_dump(mode="json")
    base["models"]["other"] = base["models"]["tiny"] | {"tiny": base["models"]["tiny"]["tiny"]
                                                        | {"seed": 3}}
    base["train"]["runs"]["tiny-s"]["model"] = "other"
    with pytest.raises(ConfigError, match="different bases"):
        parse_params(base)
    base["train"]["runs"]["tiny-s"]["model"] = "tiny"
    base["merge"]["m"]["weights"] = [1.0]
    with pytest.raises(ConfigError, match="weights has 1 values for 2 adapters"):
        parse_params(base)


def _merged_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model" / "model.safetensors")


def _differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_weighted_combinations_follow_weights_and_density_and_their_error_limit(
        method, workspace, trained_pair, tmp_path: Path) -> None:
    record = _merge(_numllm_params(method, density=0.5), workspace, trained_pair, tmp_path / "a")
    check = record["check"]
    assert check["limit"] is None and 1e-6 < check["max_abs_diff"] < math.inf
    merged = _merged_weights(tmp_path / "a")
    swapped = _merge(_numllm_params(method, density=0.5, weights=[0.5, 1.0]), workspace,
                     trained_pair, tmp_path / "b")
    assert swapped["weights"] == [0.5, 1.0] and _differ(merged, _merged_weights(tmp_path / "b"))
    if method != "linear":  # density: the share of each update's values that ties keeps
        _merge(_numllm_params(method, density=1.0), workspace, trained_pair, tmp_path / "c")
        assert _differ(merged, _merged_weights(tmp_path / "c"))
    strict = _numllm_params(method, density=0.5, max_error=check["max_abs_diff"] / 2)
    with pytest.raises(ModelError, match="failed its check"):
        _merge(strict, workspace, trained_pair, tmp_path / "strict")
    assert not (tmp_path / "strict").exists()
