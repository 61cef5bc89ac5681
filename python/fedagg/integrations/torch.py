"""Torch training-loop helpers: models as flat vectors, participant updates, server optimizers.

>>> import torch, fedagg.integrations.torch as ft
>>> net = torch.nn.Linear(3, 2)
>>> flat = ft.ParameterVector(net)
>>> v = flat.get()                      # one contiguous float32 vector (a copy)
>>> flat.set(v * 0); float(net.weight.detach().abs().sum())
0.0

``ParameterVector`` keeps the order and shapes of a module's parameters (and,
optionally, its floating-point buffers). The vector is float32, or float64 when
any parameter is float64, so module -> vector -> module is exact for every
floating-point dtype (float16 and bfloat16 widen to float32 exactly). Works on
CPU and CUDA modules (the vector lives on the module's device).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch


class ParameterVector:
    """A module's floating-point parameters (and optionally buffers) as one flat vector (float32 or float64)."""

    def __init__(self, module: torch.nn.Module, *, buffers: bool = False):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        tensors = [p for p in module.parameters()]
        if buffers:
            tensors += [b for b in module.buffers() if b.is_floating_point()]
        if not tensors:
            raise ValueError("the module has no floating-point parameters")
        odd = sorted({str(t.dtype) for t in tensors if not t.is_floating_point()})
        if odd:
            raise TypeError(f"parameters must be floating point, got {odd}")
        # float64 only where the module holds float64: every other float widens to float32 exactly.
        self.dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        devices = {t.device for t in tensors}
        if len(devices) != 1:
            raise ValueError(f"parameters live on several devices: {sorted(map(str, devices))}")
        self.tensors: List[torch.Tensor] = tensors
        self.device = devices.pop()
        self.sizes = [t.numel() for t in tensors]
        self.numel = sum(self.sizes)

    def get(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The parameters, concatenated into `out` (reused if given) or a new vector of self.dtype."""
        if out is None:
            out = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        elif out.shape != (self.numel,) or out.dtype != self.dtype or out.device != self.device:
            raise ValueError(f"out must be a {self.dtype} vector of {self.numel} on {self.device}")
        with torch.no_grad():
            torch.cat([t.detach().reshape(-1).to(self.dtype) for t in self.tensors], out=out)
        return out

    def grads(self) -> torch.Tensor:
        """The gradients as one vector (zeros where a parameter has none)."""
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(self.dtype)
                 for p in self.tensors]
        return torch.cat(parts)

    def set(self, vector: Any) -> None:
        """Write `vector` (numel long; NumPy or torch, any device and float dtype) into the parameters."""
        v = torch.as_tensor(vector).to(device=self.device, dtype=self.dtype).reshape(-1)
        if v.numel() != self.numel:
            raise ValueError(f"vector has {v.numel()} values, the module {self.numel}")
        if not bool(torch.isfinite(v).all()):
            raise ValueError("vector holds NaN or Inf")
        with torch.no_grad():
            for t, chunk in zip(self.tensors, torch.split(v, self.sizes)):
                t.copy_(chunk.view_as(t))


class Participant:
    """One participant's side of a round: update = trained - global, then compress and/or privatize.

    codec: a fedagg.compress codec (error feedback kept here across rounds) or None.
    dp: a fedagg.privacy.LocalDP or None (applied before compression).
    """

    def __init__(self, module: torch.nn.Module, *, codec: Any = None, dp: Any = None):
        self.params = ParameterVector(module)
        self.codec, self.dp = codec, dp
        self.state = None if codec is None else codec.state(self.params.numel)
        self.start: Optional[torch.Tensor] = None

    def begin(self, global_vector: Any) -> None:
        """Load the global model; training follows."""
        self.params.set(global_vector)
        self.start = self.params.get()

    def update(self):
        """The update to send: a vector (the ParameterVector's dtype), or a fedagg.compress Payload with a codec."""
        if self.start is None:
            raise RuntimeError("call begin() with the global model first")
        delta = self.params.get() - self.start
        if self.dp is not None:
            delta = torch.as_tensor(self.dp.privatize(delta))
        if self.codec is None:
            return delta
        return self.codec.encode(delta, self.state)


class ServerOptimizer:
    """Applies an aggregate to the global model: FedAvg (plain step), FedAvgM or FedAdam.

    kind "fedavg": x += lr * g; "fedavgm": m = beta1 m + g, x += lr m (Hsu et al. 2019);
    "fedadam": Adam on the aggregate as pseudo-gradient (Reddi et al. 2021), no bias correction,
    v0 = tau^2, as in the paper's Algorithm 2.
    """

    KINDS = ("fedavg", "fedavgm", "fedadam")

    def __init__(self, kind: str = "fedavg", lr: float = 1.0, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3):
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        if not lr > 0:
            raise ValueError("lr must be > 0")
        self.kind, self.lr, self.beta1, self.beta2, self.tau = kind, lr, beta1, beta2, tau
        self.state: Dict[str, torch.Tensor] = {}

    def step(self, model: torch.Tensor, aggregate: Any) -> torch.Tensor:
        """The new global vector (model is not modified)."""
        dtype = model.dtype if model.is_floating_point() else torch.float32
        g = torch.as_tensor(aggregate).to(device=model.device, dtype=dtype).reshape(model.shape)
        if not bool(torch.isfinite(g).all()):
            raise ValueError("aggregate holds NaN or Inf")
        if self.kind == "fedavg":
            return model + self.lr * g
        if self.kind == "fedavgm":
            m = self.state.get("m")
            m = g.clone() if m is None else self.beta1 * m + g
            self.state["m"] = m
            return model + self.lr * m
        m = self.state.get("m", torch.zeros_like(g))
        v = self.state.get("v", torch.full_like(g, self.tau ** 2))
        m = self.beta1 * m + (1 - self.beta1) * g
        v = self.beta2 * v + (1 - self.beta2) * g * g
        self.state["m"], self.state["v"] = m, v
        return model + self.lr * m / (v.sqrt() + self.tau)
