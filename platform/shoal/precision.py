"""Mixed precision: fp32, bf16 and fp16 differ only inside this class.

fp16 scales the loss with a GradScaler; `unscale` must run before clipping and before any look
at the gradients (clipping scaled gradients is off by the scale, ~65,000x).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """autocast(), backward(loss), unscale(opt), step(opt, ok), state_dict()."""

    def __init__(self, kind: str, device: torch.device):
        self.kind = kind
        self.device = device
        self.dtype = DTYPES[kind]
        self.scaler = torch.amp.GradScaler(device.type) if kind == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Forward-pass context: autocast to bf16/fp16, nothing for fp32."""
        if self.kind == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), scaled under fp16."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring the gradients back to their true values (fp16); call once per step before clipping."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, ok: bool) -> bool:
        """Step if every rank found finite gradients; fp16 adapts its scale. Returns whether it stepped."""
        if self.scaler is None:
            if ok:
                optimizer.step()
            return ok
        if ok:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            # another rank (or this one) saw inf/NaN: skip and back off the scale on every rank alike
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        return ok

    @property
    def scale(self) -> float:
        return self.scaler.get_scale() if self.scaler is not None else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
