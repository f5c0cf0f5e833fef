"""SSM parameters stay fp32 whatever the model's dtype.

The S4 recipe keeps the SSM (its parameters, kernels and FFTs) in fp32: in bf16 the kernel of a loaded BST is off
by several per cent (exp of a rounded dt * A, raised to powers up to L). ``Module.to(torch.bfloat16)`` and
``.half()`` would cast every parameter, so these modules override ``_apply`` to move their parameters between
devices but never lower their precision; ``BSTForCausalLM._keep_in_fp32_modules_strict`` does the same for
``from_pretrained(dtype=...)``; and :meth:`FP32Parameters.check_fp32` refuses a forward if some other path cast
them anyway, so a bf16 SSM can never run silently.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from msrnn.errors import ConfigError

_LOW = (torch.float16, torch.bfloat16)


class FP32Parameters(nn.Module):
    """Mixin for modules whose parameters (and their children's) must stay fp32 or wider."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        def keep_precision(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.is_floating_point() and out.dtype in _LOW and t.dtype not in _LOW:
                return t.to(device=out.device)  # the original values on the new device, not a rounded copy
            return out

        return super()._apply(keep_precision, recurse)

    def check_fp32(self) -> None:
        """Raise if any parameter of this module was cast below fp32."""
        for name, p in self.named_parameters():
            if p.dtype in _LOW:
                raise ConfigError(f"SSM parameter {name} is {p.dtype}; the SSM must run in fp32 (load the model with "
                                  "msrnn, or call .float() on its SSM modules)")
