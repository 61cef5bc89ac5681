"""Where LoraAggregator's per-layer linear algebra runs: NumPy on the host, or torch on a device.

The math (stacking the factors, their Gram matrices, the truncation) is written once in
aggregator.py against the few primitives here. Both backends compute in float64. The torch one
keeps a layer's factors where the inputs are (a GPU: the stacked factors, the R x R Gram matrices
and their factorizations never leave it; only the n x n Gram matrix of the updates, which the rule
sees, and the per-layer discarded share come back to the host).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np


def _is_torch(x: Any) -> bool:
    return hasattr(x, "detach") and hasattr(x, "dtype") and type(x).__module__.startswith("torch")


class NumpyLinalg:
    """float64 NumPy on the host."""

    name = "numpy"

    def empty(self, shape, fortran: bool = False):
        return np.empty(shape, order="F" if fortran else "C")

    def zeros(self, shape):
        return np.zeros(shape)

    def put(self, dst, x: Any, where: str) -> None:
        """dst[...] = x widened to float64 (exactly), refusing non-floating or non-finite values."""
        if _is_torch(x):
            import torch

            if not x.dtype.is_floating_point:
                raise TypeError(f"{where}: floating-point values expected, got {x.dtype}")
            x = x.detach().to("cpu")
            x = (x.float() if x.dtype == torch.bfloat16 else x).numpy()  # bfloat16 widens exactly to float32
        a = np.asarray(x)
        if a.dtype.kind != "f":
            raise TypeError(f"{where}: floating-point values expected, got {a.dtype}")
        if not np.isfinite(a).all():  # checked on the (contiguous) input: dst may be a strided block
            raise ValueError(f"{where} holds NaN or Inf")
        np.copyto(dst, a, casting="safe")

    def check_finite(self, X) -> bool:
        return True  # put() checked every input already

    def cholesky(self, K):
        """The lower Cholesky factor of K, or None where K is not (numerically) positive definite."""
        try:
            return np.linalg.cholesky(K)
        except np.linalg.LinAlgError:
            return None

    def solve_lower_t(self, L, X):
        """Y with L^T Y = X (L lower triangular)."""
        return np.linalg.solve(L.T, X)

    eigh = staticmethod(np.linalg.eigh)

    def nonneg(self, x):
        return np.clip(x, 0.0, None)

    def block_sums(self, P, edges: Sequence[int]) -> np.ndarray:
        """The n x n sums of P's blocks [edges[i]:edges[i+1], edges[j]:edges[j+1]], on the host."""
        starts = np.asarray(edges[:-1])
        return np.add.reduceat(np.add.reduceat(P, starts, axis=0), starts, axis=1)

    def host(self, x) -> np.ndarray:
        return np.asarray(x, dtype=np.float64)

    def like(self, a, ref: Any) -> Any:
        """a in the type, dtype and device of ref."""
        if _is_torch(ref):
            import torch

            return torch.from_numpy(np.ascontiguousarray(a)).to(dtype=ref.dtype, device=ref.device)
        return np.asarray(a).astype(np.asarray(ref).dtype)


class TorchLinalg:
    """float64 torch on `device` (a GPU, or the CPU for tests)."""

    name = "torch"

    def __init__(self, device: Any):
        import torch

        self.torch = torch
        self.device = torch.device(device)

    def empty(self, shape, fortran: bool = False):
        t = self.torch.empty(tuple(shape)[::-1] if fortran else tuple(shape), dtype=self.torch.float64,
                             device=self.device)
        return t.T if fortran else t

    def zeros(self, shape):
        return self.torch.zeros(tuple(shape), dtype=self.torch.float64, device=self.device)

    def put(self, dst, x: Any, where: str) -> None:
        torch = self.torch
        if _is_torch(x):
            if not x.dtype.is_floating_point:
                raise TypeError(f"{where}: floating-point values expected, got {x.dtype}")
            src = x.detach()
        else:
            a = np.asarray(x)
            if a.dtype.kind != "f":
                raise TypeError(f"{where}: floating-point values expected, got {a.dtype}")
            src = torch.from_numpy(np.ascontiguousarray(a))
        dst.copy_(src.to(self.device, non_blocking=True))  # widened on the device, exactly
        # finiteness is checked on the whole stacked block by check_finite (one sync per layer)

    def check_finite(self, X) -> bool:
        return bool(self.torch.isfinite(X).all())

    def cholesky(self, K):
        L, info = self.torch.linalg.cholesky_ex(K)
        return None if int(info) != 0 else L

    def solve_lower_t(self, L, X):
        return self.torch.linalg.solve_triangular(L.T, X, upper=True)

    def eigh(self, S):
        return self.torch.linalg.eigh(S)

    def nonneg(self, x):
        return x.clamp(min=0.0)

    def block_sums(self, P, edges: Sequence[int]) -> np.ndarray:
        torch = self.torch
        e = torch.as_tensor(np.asarray(edges), device=self.device)
        seg = torch.bucketize(torch.arange(P.shape[0], device=self.device), e[1:], right=True)
        n = len(edges) - 1
        rows = torch.zeros((n, P.shape[1]), dtype=P.dtype, device=self.device).index_add_(0, seg, P)
        out = torch.zeros((n, n), dtype=P.dtype, device=self.device).index_add_(1, seg, rows)
        return out.cpu().numpy()

    def host(self, x) -> np.ndarray:
        return x.detach().cpu().numpy() if _is_torch(x) else np.asarray(x, dtype=np.float64)

    def like(self, a, ref: Any) -> Any:
        if _is_torch(ref):
            return a.to(dtype=ref.dtype, device=ref.device)
        return a.cpu().numpy().astype(np.asarray(ref).dtype)


def choose(device: Optional[Any], tensors: Sequence[Any]):
    """The backend for `device` (None: torch on the inputs' GPU when they are CUDA tensors, else
    NumPy on the host)."""
    if device is None:
        for x in tensors:
            if _is_torch(x) and x.device.type != "cpu":
                return TorchLinalg(x.device)
        return NumpyLinalg()
    return TorchLinalg(device)
