"""The vocabulary matrices (input embeddings, output layer) of a quantized causal LM, computing
in a wider dtype than its 4-bit body: float32 logits from bf16 weights without a float32 copy
of the matrix (a custom autograd function upcasts it block by block in both passes)."""

from __future__ import annotations

import functools
from typing import Any

import torch

VOCAB_CHUNK = 16_384  # output-layer rows upcast at a time: 56 MiB of float32 for a 896-wide model
VOCAB_DTYPE = "fin_tasks_vocab_dtype"  # attribute of the two modules: the dtype they compute in


def compute_in(model: Any, dtype: torch.dtype) -> None:
    """Make a quantized causal LM compute in `dtype`, the dtype of its 4-bit matrix multiplies,
    whatever dtype its unquantized weights are stored in (bfloat16 storage halves the
    vocabulary matrices where a CPU computes in float32).

    The 4-bit layers dequantize to `dtype` (bitsandbytes would use the dtype the weights had
    when quantized: in the backward pass, in a merge, in `predict.dequantize`). The input
    embeddings and the output layer compute in the wider of their stored dtype and `dtype`
    (`vocab_computes_in` can widen it): the embeddings' output is cast to it, and the output
    layer upcasts its weight a block of rows at a time, in the forward and the backward pass,
    so no full-size copy is made or kept for the gradient. Where the stored dtype is `dtype`
    nothing changes."""
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            state.dtype = dtype
            if hasattr(module, "compute_dtype"):  # bitsandbytes' Linear4bit casts inputs to it
                module.compute_dtype = dtype
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embeddings is not None:
        embeddings.register_forward_hook(_cast_embeddings)
    if head is not None and head.bias is None and head.weight.is_floating_point() \
            and not hasattr(head.weight, "quant_state"):  # a quantized head computes itself
        head.forward = functools.partial(_vocab_linear, head)
    vocab_computes_in(model, dtype)


def vocab_computes_in(model: Any, dtype: torch.dtype) -> None:
    """Set the dtype the vocabulary matrices compute in (at least their stored one)."""
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            setattr(module, VOCAB_DTYPE, dtype)


def _vocab_dtype(module: torch.nn.Module) -> torch.dtype:
    return torch.promote_types(module.weight.dtype, getattr(module, VOCAB_DTYPE))


def _cast_embeddings(module: torch.nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
    return output.to(_vocab_dtype(module))


def _vocab_linear(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """The output layer's logits computed in its vocabulary dtype."""
    dtype, weight = _vocab_dtype(head), head.weight
    hidden = hidden.to(dtype)
    if weight.dtype == dtype:
        return torch.nn.functional.linear(hidden, weight)
    if weight.requires_grad and torch.is_grad_enabled():
        return torch.nn.functional.linear(hidden, weight.to(dtype))
    return _UpcastLinear.apply(hidden, weight)


class _UpcastLinear(torch.autograd.Function):
    """`hidden @ weight.T` in hidden's dtype for a frozen weight stored in another dtype,
    upcasting `VOCAB_CHUNK` rows at a time in both passes: saves the stored weight only."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        out = hidden.new_empty(*hidden.shape[:-1], len(weight))  # no second copy of the logits
        for start in range(0, len(weight), VOCAB_CHUNK):
            rows = weight[start:start + VOCAB_CHUNK]
            out[..., start:start + len(rows)] = hidden @ rows.to(hidden.dtype).T
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        parts = zip(grad.split(VOCAB_CHUNK, dim=-1), weight.split(VOCAB_CHUNK))
        return sum(part @ rows.to(grad.dtype) for part, rows in parts), None


def upcast_vocab(model: Any) -> Any:
    """For inference: the vocabulary matrices that `compute_in` set up, converted once to the
    dtype they compute in, rather than upcast on every forward pass (generation makes one
    per new token; SmolLM2 spent a quarter of its time on it). Other models are unchanged."""
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None and hasattr(module, VOCAB_DTYPE):
            module.weight.data = module.weight.data.to(_vocab_dtype(module))
    return model
