"""On a CUDA GPU: QLoRA trains through the same loading code, and the benchmark script runs.
Skipped without a GPU (CI machines have none); run them where one is lent."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_qlora_trains_on_the_gpu_and_leaves_the_base_frozen(workspace, tmp_path) -> None:
    from fin_tasks.config import parse_params
    from fin_tasks.runs import resolve_run
    from fin_tasks.train import train

    from conftest import make_params

    raw = make_params().model_dump(mode="json")
    raw["models"]["tiny"] |= {"gpu": True}
    raw["models"]["tiny"]["quantization"]["compute_dtype"] = "bfloat16"
    params = parse_params(raw)
    metrics = train(resolve_run(params, "tiny-t1"), workspace / "prepare" / "finarg_ecc",
                    workspace / "base" / "tiny", tmp_path / "out", checkpoint_root=tmp_path / "c")
    assert metrics["steps"] == params.train.hyper("tiny-t1").max_steps
    assert metrics["peak_memory_bytes"] > 0  # CUDA allocator figure, not the process RSS
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()


def test_the_gpu_benchmark_runs_on_a_tiny_shape(tmp_path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench/gpu_train.py"), "--tiny",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| 4-bit NF4 + LoRA r16 |" in done.stdout and "GiB" in done.stdout
