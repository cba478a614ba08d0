"""The machine side of a run: which device it uses, the dtype it computes in there, and the
processes of a data-parallel training. What params say is resolved here against the hardware,
and recorded (`numerics`) so that a run says what it actually computed with."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

from fin_tasks.config import ModelConfig, QuantConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_for(config: ModelConfig) -> torch.device:
    """CUDA when the entry asks for a GPU and one is present (this process's own GPU under a
    multi-process launch: LOCAL_RANK), else the CPU."""
    if config.gpu and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def device_kind(device: torch.device) -> str:
    """The device as it matters for numerics: `cpu`, or `cuda` with the GPU's model name."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere torch
    emulates it, about 20x slower than float32 in 4-bit training on a 2-core AVX2 machine."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def compute_dtype(quant: QuantConfig, device: torch.device) -> torch.dtype:
    """The dtype a quantized model computes in: as pinned, or for `auto` bfloat16 where the
    hardware has it natively, float16 on an older GPU, float32 on a CPU without bf16."""
    if quant.compute_dtype != "auto":
        return DTYPES[quant.compute_dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def numerics(config: ModelConfig) -> dict[str, str]:
    """What a model computes with on this machine: the resolved compute dtype (params may say
    `auto`) and the device kind. Part of a checkpoint's fingerprint and of every run's record."""
    device = device_for(config)
    dtype = (compute_dtype(config.quantization, device) if config.quantization is not None
             else DTYPES[config.dtype])
    return {"compute_dtype": str(dtype).removeprefix("torch."), "device": device_kind(device)}


def resolved_quantization(config: ModelConfig) -> dict[str, Any] | None:
    """The quantization settings as this machine runs them (recorded with each run)."""
    if config.quantization is None:
        return None
    dtype = compute_dtype(config.quantization, device_for(config))
    return config.quantization.model_dump(mode="json") | {
        "compute_dtype": str(dtype).removeprefix("torch.")}


def data_parallel(device: torch.device) -> tuple[int, int]:
    """(rank, world size) of this training process. Under `accelerate launch` or `torchrun`
    (WORLD_SIZE > 1) the process group starts here: NCCL between GPUs, gloo on CPUs. Each
    rank's GPU is made its current device first, so that NCCL, barriers and any tensor
    created without a device land on the rank's own GPU, not all on GPU 0."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), world


def barrier(device: torch.device) -> None:
    """Wait for every process of the group, on this rank's own GPU under NCCL."""
    import torch.distributed as dist

    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def leave_data_parallel(world: int, device: torch.device) -> None:
    """Wait for every process of a data-parallel run, then leave the process group."""
    if world > 1:
        import torch.distributed as dist

        barrier(device)
        dist.destroy_process_group()


def sum_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Add up every process's gradients (each computed its share of the same window)."""
    import torch.distributed as dist

    for parameter in parameters:
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
