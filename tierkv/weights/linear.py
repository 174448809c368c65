"""A linear layer run where its weight lives: a CPU-computed layer's weights stay in host memory and only the
activations cross (issue 18 item 5). With weight and input on one device this is F.linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias), computed on weight's device, returned on x's device."""
    if weight.device == x.device:
        return F.linear(x, weight, bias)
    return F.linear(x.to(weight.device), weight, bias).to(x.device)
