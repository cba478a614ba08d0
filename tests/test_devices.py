"""The machine side of a run, with CUDA mocked: each rank of a multi-GPU training takes its
own GPU before the process group starts, loads its 4-bit base there and waits there."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fin_tasks.devices import data_parallel, device_for, leave_data_parallel, numerics
from fin_tasks.models import load_base
from fin_tasks.sources import BaseRef

from conftest import make_params


class _Loaded(Exception):
    """Raised by the mocked loader with the arguments it was given."""


@pytest.fixture()
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Rank 1 of 2 on a machine whose CUDA calls are recorded, not made."""
    calls: list[tuple] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mock GPU")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(
        ("init_process_group", backend, kw.get("device_id"))))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "barrier", lambda **kw: calls.append(("barrier", kw)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    return calls


def test_each_rank_takes_its_own_gpu_before_the_process_group_starts(two_gpus) -> None:
    config = make_params({"gpu": True}).models["tiny"]
    device = device_for(config)
    assert device == torch.device("cuda", 1)
    assert data_parallel(device) == (1, 2)
    leave_data_parallel(2, device)
    assert two_gpus == [("set_device", device), ("init_process_group", "nccl", device),
                        ("barrier", {"device_ids": [1]}), ("destroy",)]
    assert numerics(config) == {"compute_dtype": "float32", "device": "cuda (Mock GPU)"}


@pytest.fixture()
def bitsandbytes_on_cpu() -> None:
    """bitsandbytes imported while CUDA is still absent (it picks its backend on import)."""
    pytest.importorskip("bitsandbytes")


def test_a_rank_loads_its_4bit_base_onto_its_own_gpu(bitsandbytes_on_cpu, two_gpus,
                                                     monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    def loader(name: str, **kwargs) -> None:
        raise _Loaded(kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", loader)
    config = make_params({"gpu": True}).models["tiny"]
    with pytest.raises(_Loaded) as loaded:
        load_base(config, BaseRef("some/model"))
    kwargs = loaded.value.args[0]
    assert kwargs["device_map"] == {"": "cuda:1"}
    assert kwargs["quantization_config"].load_in_4bit


def test_one_process_on_the_cpu_starts_no_process_group(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("started"))
    config = make_params().models["tiny"]
    assert device_for(config) == torch.device("cpu")
    assert data_parallel(torch.device("cpu")) == (0, 1)
    assert numerics(config) == {"compute_dtype": "float32", "device": "cpu"}
