"""SparseLinear: an nn.Linear whose weight lives packed (formats.py) and is multiplied by the dispatcher;
`load_packed_model` builds a transformers model with SparseLinear for every packed weight of a folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from shears.kernels.dispatch import Dispatcher, PackedOperand, default_dispatcher
from shears.kernels.errors import PackedFormatError
from shears.kernels.formats import PackedWeight
from shears.kernels.registry import format_of, pack


class SparseLinear(nn.Module):
    """y = x @ W^T + b with W held as packed buffers (they move with .to(); values follow the model dtype)."""

    def __init__(
        self, packed: PackedWeight, bias: torch.Tensor | None = None, dispatcher: Dispatcher | None = None
    ):
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self.format = format_of(packed)
        self.layout = packed.layout
        self.n, self.m = packed.nm
        for name, tensor in packed.tensors().items():
            self.register_buffer(name, tensor)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.dispatcher = dispatcher
        self._operand: PackedOperand | None = None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, n: int, m: int, name: str = "linear", dispatcher: Dispatcher | None = None
    ) -> SparseLinear:
        """Pack a pruned nn.Linear (n = m = 0: bitmask); PackedFormatError if it breaks the pattern."""
        return cls(pack(linear.weight.detach(), n, m, name), linear.bias, dispatcher)

    @property
    def packed(self) -> PackedWeight:
        parts = {part: getattr(self, part) for part in self.format.parts}
        return self.format.assemble(parts, self.n, self.m, (self.out_features, self.in_features))

    def operand(self) -> PackedOperand:
        if self._operand is None or self._operand.packed.values is not self.values:
            self._operand = PackedOperand(self.packed)
        return self._operand

    def _apply(self, fn: Any, recurse: bool = True) -> SparseLinear:
        self._operand = None  # device or dtype changes: derived copies are rebuilt on next use
        return super()._apply(fn, recurse)

    def dense_weight(self) -> torch.Tensor:
        return self.format.unpack(self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.values.dtype:
            x2 = x2.to(self.values.dtype)
        y = (self.dispatcher or default_dispatcher()).matmul(x2, self.operand())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*leading, self.out_features)

    def extra_repr(self) -> str:
        packed = f"{self.n}:{self.m}" if self.m else self.layout
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, packed={packed}, dtype={self.values.dtype}"
        )


def swap_in_sparse(
    model: nn.Module, packed: dict[str, PackedWeight], dispatcher: Dispatcher | None = None
) -> list[str]:
    """Replace the nn.Linear of every packed weight name ("<module>.weight") by a SparseLinear."""
    swapped = []
    for name, weight in packed.items():
        module_name = name.removesuffix(".weight")
        try:
            linear = model.get_submodule(module_name)
        except AttributeError as exc:
            raise PackedFormatError(f"{name}: the model has no module {module_name}") from exc
        if not isinstance(linear, nn.Linear):
            raise PackedFormatError(f"{name}: {module_name} is a {type(linear).__name__}, not nn.Linear")
        if tuple(linear.weight.shape) != tuple(weight.shape):
            raise PackedFormatError(
                f"{name}: packed shape {weight.shape} but the model's weight is {tuple(linear.weight.shape)}"
            )
        if weight.dtype != linear.weight.dtype:
            weight = weight.with_values(weight.values.to(linear.weight.dtype))
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SparseLinear(weight, linear.bias, dispatcher))
        swapped.append(name)
    return swapped


def load_packed_model(
    folder: Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    dispatcher: Dispatcher | None = None,
    **from_pretrained: Any,
) -> nn.Module:
    """The folder's causal LM with every packed weight served by SparseLinear from packed/sparse*.safetensors.

    Builds the model from the folder on the CPU, swaps in the packed layers (their dense weights are
    dropped), then moves it to `device`: the device only ever holds packed weights.
    """
    from transformers import AutoModelForCausalLM

    from shears.kernels.sparse_file import read_packed

    packed = read_packed(Path(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or "auto", **from_pretrained)
    swap_in_sparse(model, packed, dispatcher)
    return model.to(device).eval()
