"""LoRA adapters aggregated with any fedagg rule: the factors averaged (FedIT), the products
aggregated exactly and re-factored to rank r, or the factors stacked (FLoRA).

An update is a mapping name -> array as PEFT's ``get_peft_model_state_dict`` gives it: for every
adapted layer X, ``X.lora_A.weight`` (r x in) and ``X.lora_B.weight`` (out x r), whose update of
the layer's weight is ``scaling * B @ A``; any other entry (biases, ``modules_to_save``) is dense
and taken as it is. Arrays are NumPy or torch (float32, float64, float16 or bfloat16); results
come back in the first update's type, dtype and device. Computation is float64, layer by layer (a
layer's n factors at a time, never n dense d_out x d_in products, except for coordinate-wise rules
in ``"exact"`` mode, which need them a block of rows at a time, on the host): NumPy on the host, or
torch where the adapters are when they are CUDA tensors (``device=`` chooses: "cuda:1", or "cpu"
for torch on the host, slower than NumPy there). On a GPU a layer's stacked factors, their Gram
matrices and the truncation stay on the device; the rule sees the n x n Gram matrix on the host.

Modes (``LoraAggregator(mode=...)``):

``"factors"``
    Each tensor aggregated on its own, A with A and B with B (FedIT, Zhang et al. 2023;
    OpenFedLLM). Cheap, and not the aggregate of the updates: mean(B) mean(A) != mean(B A).
    Needs one rank and one scaling for all.
``"exact"``
    The rule over the updates' products dW_i = s_i B_i A_i (and dense entries), then the
    aggregate's best rank-r factorization (truncated SVD, Eckart-Young): ``info.discarded``
    gives, per layer, the share of the aggregate's squared Frobenius norm left out.
``"stacked"``
    FLoRA (Wang et al. 2024): the participants' factors concatenated, [c_1 s_1 A_1; ...] and
    [B_1, ...], so B A is the aggregate exactly, at rank sum(r_i). Heterogeneous ranks welcome.
    Rules whose result combines whole updates only (not median, trimmed mean, Bulyan).

How the rules see the updates: a rule that decides from distances (mean, Krum, Multi-Krum,
geometric median, centered clipping; Bulyan's selection) runs on an n x n embedding of the
updates with the same inner products (the Gram matrix of all their layers, from the factors:
<B_i A_i, B_j A_j> = sum((B_i^T B_j) * (A_i A_j^T))), so one participant is in or out for the
whole model and no dense product is formed; the aggregate is then the combination its weights
give. Coordinate-wise rules (median, trimmed mean, Bulyan's averaging) run on the tensors
themselves ("factors") or on the products a block of rows at a time ("exact").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..rules import RULES, AggregationInfo
from . import backend

MODES = ("factors", "exact", "stacked")
_A, _B = ".lora_A.weight", ".lora_B.weight"
_COORDINATE = ("median", "trimmed_mean", "bulyan")  # rules that look at each coordinate
_ROW_BLOCK = 1 << 18  # entries of a product formed at once per participant ("exact", coordinate-wise rules)


@dataclass
class LoraResult:
    """The new adapters (``adapters``: name -> array, the inputs' type and dtype; LoRA layers at
    ``rank`` with scaling ``scaling``: load them with lora_alpha = rank * scaling), the rule's
    ``info`` (its weights or selection, indices as the updates were given), and for ``"exact"``
    the share of each layer's aggregate its truncation left out (``discarded``)."""

    adapters: Dict[str, Any]
    info: AggregationInfo
    rank: Dict[str, int]
    scaling: float
    discarded: Dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- inputs

_HOST = backend.NumpyLinalg()


def _to_float64(x: Any, where: str) -> np.ndarray:
    """x widened to a float64 NumPy array (exactly), refusing non-floating or non-finite values."""
    out = np.empty(tuple(x.shape) if hasattr(x, "shape") else np.shape(x))
    _HOST.put(out, x, where)
    return out


_like = _HOST.like  # a float64 array in the type, dtype and device of a reference


def _shape(x: Any, where: str) -> Tuple[int, ...]:
    shape = getattr(x, "shape", None)
    if shape is None:
        x = np.asarray(x)
        shape = x.shape
    dtype = getattr(x, "dtype", None)
    floating = getattr(dtype, "is_floating_point", None)  # torch
    if floating is None:
        floating = np.dtype(dtype).kind == "f" if dtype is not None else False
    if not floating:
        raise TypeError(f"{where}: floating-point values expected, got {dtype}")
    return tuple(int(v) for v in shape)


@dataclass
class _Layer:
    """One adapted layer across the updates: the inputs as given, widened to float64 when used (a
    layer at a time: the whole set is never held in float64)."""

    name: str  # the prefix X of X.lora_A.weight
    raw_A: List[Any]  # per participant, r_i x in
    raw_B: List[Any]  # per participant, out x r_i
    ranks: List[int]
    shape: Tuple[int, int]  # (out, in)

    def factors(self) -> Tuple[List[np.ndarray], List[np.ndarray]]:
        A = [_to_float64(a, f"update {i}'s {self.name + _A}") for i, a in enumerate(self.raw_A)]
        B = [_to_float64(b, f"update {i}'s {self.name + _B}") for i, b in enumerate(self.raw_B)]
        return A, B

    def stacked(self, use: Sequence[int], coef: Optional[np.ndarray], xb) -> Tuple[Any, Any]:
        """Bs = [B_i, ...] (out x R) and As = [c_i A_i; ...] (R x in) in float64 on backend `xb`, for
        the updates in `use`: each factor widened straight into its block (no per-update copy)."""
        out_dim, in_dim = self.shape
        edges = np.concatenate([[0], np.cumsum([self.ranks[i] for i in use])]).astype(int)
        Bs = xb.empty((out_dim, edges[-1]), fortran=True)  # each B_i one contiguous block (2x faster to fill)
        As = xb.empty((edges[-1], in_dim))
        for k, i in enumerate(use):
            xb.put(Bs[:, edges[k]:edges[k + 1]], self.raw_B[i], f"update {i}'s {self.name + _B}")
            xb.put(As[edges[k]:edges[k + 1]], self.raw_A[i], f"update {i}'s {self.name + _A}")
            if coef is not None:
                As[edges[k]:edges[k + 1]] *= float(coef[k])
        if not (xb.check_finite(Bs) and xb.check_finite(As)):
            for i in use:  # name the first non-finite input (its float64 copy on the host raises)
                _to_float64(self.raw_B[i], f"update {i}'s {self.name + _B}")
                _to_float64(self.raw_A[i], f"update {i}'s {self.name + _A}")
        return Bs, As


def _split(updates: Sequence[Mapping[str, Any]]) -> Tuple[List[_Layer], Dict[str, List[Any]]]:
    if isinstance(updates, Mapping) or not isinstance(updates, Sequence) or len(updates) == 0:
        raise TypeError("updates must be a non-empty sequence of mappings name -> array (one per participant)")
    keys = None
    for i, u in enumerate(updates):
        if not isinstance(u, Mapping):
            raise TypeError(f"update {i} is a {type(u).__name__}, not a mapping name -> array")
        if keys is None:
            keys = list(u)
        elif set(u) != set(keys):
            diff = sorted(set(u) ^ set(keys))[:3]
            raise ValueError(f"update {i} has other entries than update 0 (e.g. {diff})")
    names = sorted({k[: -len(_A)] for k in keys if k.endswith(_A)} | {k[: -len(_B)] for k in keys if k.endswith(_B)})
    layers = []
    for name in names:
        if name + _A not in keys or name + _B not in keys:
            raise ValueError(f"layer {name!r} needs both {name + _A!r} and {name + _B!r}")
        sa = [_shape(u[name + _A], f"update {i}'s {name + _A}") for i, u in enumerate(updates)]
        sb = [_shape(u[name + _B], f"update {i}'s {name + _B}") for i, u in enumerate(updates)]
        for i, (a, b) in enumerate(zip(sa, sb)):
            if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[0] < 1:
                raise ValueError(f"update {i}'s layer {name!r}: A {a} and B {b} are not r x in and out x r")
            if (a[1], b[0]) != (sa[0][1], sb[0][0]):
                raise ValueError(f"update {i}'s layer {name!r} maps {a[1]} -> {b[0]}, update 0's "
                                 f"{sa[0][1]} -> {sb[0][0]}")
        layers.append(_Layer(name, [u[name + _A] for u in updates], [u[name + _B] for u in updates],
                             [a[0] for a in sa], (sb[0][0], sa[0][1])))
    lora = {n + s for n in names for s in (_A, _B)}
    dense: Dict[str, List[Any]] = {}
    for k in keys:
        if k in lora:
            continue
        if k.endswith("lora_magnitude_vector") or ".lora_magnitude_vector." in k:
            raise ValueError(f"{k!r}: DoRA adapters are not a product B A; LoraAggregator refuses them")
        shapes = [_shape(u[k], f"update {i}'s {k}") for i, u in enumerate(updates)]
        if any(sh != shapes[0] for sh in shapes):
            raise ValueError(f"entry {k!r} has different shapes across updates")
        dense[k] = [u[k] for u in updates]
    return layers, dense


# --------------------------------------------------------------------------- the rule on a Gram matrix

def _embedding(G: np.ndarray) -> np.ndarray:
    """Rows e_i with <e_i, e_j> = G_ij (G symmetric positive semi-definite)."""
    w, V = np.linalg.eigh((G + G.T) / 2)
    return V * np.sqrt(np.clip(w, 0.0, None))


def _rule_on_gram(G: np.ndarray, rule: str, f: int, weights, params: Dict[str, Any]):
    """The rule run on an embedding of the updates: (coefficients, selection, info). Coefficients
    are None for a coordinate-wise rule (then `selection` is Bulyan's, or None)."""
    from .. import aggregate

    rows = _embedding(G).astype(np.float32)  # not rescaled: tau and nu are absolute distances
    if rule in ("median", "trimmed_mean"):
        # for the precondition checks and the info (n, f) only
        _, info = aggregate(rows, rule, f, weights=weights, return_info=True, **params)
        return None, None, info
    _, info = aggregate(rows, rule, f, weights=weights, return_info=True, **params)
    if rule == "bulyan":
        return None, np.asarray(info.selected, dtype=np.int64), info
    n = G.shape[0]
    if info.weights is not None:
        coef = np.asarray(info.weights, dtype=np.float64)
    elif info.selected is not None:  # Krum: the selected update itself
        coef = np.zeros(n)
        coef[np.asarray(info.selected, dtype=np.int64)] = 1.0 / len(info.selected)
    else:  # pragma: no cover - every non-coordinate rule reports weights or a selection
        raise ValueError(f"rule {rule!r} reports no weights")
    return coef, None, info


def _product_gram(layer: _Layer, s: np.ndarray, xb) -> np.ndarray:
    """<s_i B_i A_i, s_j B_j A_j>_F for all i, j, from the factors: the blocks of the stacked
    factors' Gram matrices, multiplied entrywise and summed per block."""
    n = len(layer.ranks)
    Bs, As = layer.stacked(range(n), None, xb)
    G = xb.block_sums((Bs.T @ Bs) * (As @ As.T), np.concatenate([[0], np.cumsum(layer.ranks)]))
    G = (G + G.T) / 2
    return G * np.outer(s, s)


def _tensor_gram(raw: List[Any], where: str) -> np.ndarray:
    F = np.stack([_to_float64(v, f"update {i}'s {where}").reshape(-1) for i, v in enumerate(raw)])
    return F @ F.T


# --------------------------------------------------------------------------- re-factorization

def _truncate(Bs: Any, As: Any, rank: int, xb) -> Tuple[Any, Any, float]:
    """The best rank-`rank` factorization B' A' of M = Bs @ As (out x R, R x in) without forming M,
    from the two R x R Gram matrices (one pass over each factor: (out + in) R^2 / 2 multiply-adds
    each, BLAS syrk): As = L Q^T (L the Cholesky factor of As As^T, or its eigenvectors where As is
    rank-deficient; Q orthonormal), so M = (Bs L) Q^T, and the SVD of Bs L comes from its Gram
    matrix L^T (Bs^T Bs) L. Returns (B', A', share of ||M||_F^2 discarded); the singular values
    split evenly between B' and A'."""
    KA = As @ As.T
    L = xb.cholesky(KA)
    if L is not None and bool((xb.host(L.diagonal()) > np.sqrt(max(float(xb.host(KA.diagonal()).max()), 0.0))
                               * 1e-7).all()):
        def qt(X):  # X^T Q^T = X^T L^-1 As, from a solve with the few columns of X (no inverse formed)
            return xb.solve_lower_t(L, X).T @ As
    else:  # rank-deficient (repeated updates): As = V sqrt(lam) (V / sqrt(lam))^T As
        lam, V = xb.eigh(KA)
        lam_h = xb.host(lam)
        keep = np.flatnonzero(lam_h > lam_h.max() * 1e-13) if lam_h.size and lam_h.max() > 0 else np.zeros(0, int)
        if keep.size == 0:
            return xb.zeros((Bs.shape[0], rank)), xb.zeros((rank, As.shape[1])), 0.0
        root_lam = lam[keep] ** 0.5
        L, Linv = V[:, keep] * root_lam, (V[:, keep] / root_lam).T  # As = L Q^T, Q^T = Linv As

        def qt(X):
            return (X.T @ Linv) @ As
    sig2, W = xb.eigh(L.T @ (Bs.T @ Bs) @ L)  # the Gram matrix of Bs L, eigenvalues ascending
    sig2_h = np.clip(xb.host(sig2)[::-1], 0.0, None)  # largest first
    total = float(sig2_h.sum())
    k = min(rank, int(np.sum(sig2_h > 0)))
    order = list(range(len(sig2_h) - 1, len(sig2_h) - 1 - k, -1))
    Wk = W[:, order]
    root = xb.nonneg(sig2[order]) ** 0.25
    # U_k = Bs L W_k / sig and V_k^T = W_k^T Q^T; each factor takes sqrt(sig)
    B = xb.zeros((Bs.shape[0], rank))
    A = xb.zeros((rank, As.shape[1]))
    B[:, :k] = Bs @ ((L @ Wk) / root)
    A[:k] = root[:, None] * qt(Wk)
    discarded = float(sig2_h[k:].sum()) / total if total > 0 else 0.0
    return B, A, discarded


# --------------------------------------------------------------------------- the aggregator

class LoraAggregator:
    """Aggregates LoRA adapter updates (module doc). ``rule``, ``f`` and rule options as in
    ``fedagg.aggregate`` (``clip_norm``: each update scaled to that L2 norm at most, the norm of
    its whole product set in ``"exact"``/``"stacked"``, of its factors in ``"factors"``).
    ``rank``: the output rank of ``"exact"`` (default: the largest input rank). ``scaling``: the
    output factors' scaling (their update is ``scaling * B @ A``; default 1, i.e. lora_alpha =
    rank)."""

    def __init__(self, mode: str = "exact", rule: str = "mean", f: int = 0, *, rank: Optional[int] = None,
                 scaling: float = 1.0, clip_norm: Optional[float] = None, device: Any = None, **rule_params: Any):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; one of {sorted(RULES)}")
        if mode == "stacked" and rule in _COORDINATE:
            raise ValueError(f"'stacked' keeps whole updates: {rule} (coordinate-wise) has no stacked form; use "
                             "'exact'")
        for bad in ("nnm", "dp", "center", "nonfinite"):
            if bad in rule_params:
                raise ValueError(f"LoraAggregator does not take {bad!r} (yet)")
        if rank is not None and not (isinstance(rank, int) and rank >= 1):
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if not (isinstance(scaling, (int, float)) and np.isfinite(scaling) and scaling > 0):
            raise ValueError(f"scaling must be a positive number, got {scaling!r}")
        if clip_norm is not None and not (isinstance(clip_norm, (int, float)) and clip_norm > 0):
            raise ValueError(f"clip_norm must be a positive number, got {clip_norm!r}")
        if device is not None:
            try:
                import torch
            except ImportError as e:
                raise ImportError("LoraAggregator(device=...) computes with torch: pip install 'fedagg[torch]'") from e
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"device must name a torch device ('cpu', 'cuda', 'cuda:1'), got {device!r}") from e
        self.device = device
        self.mode, self.rule, self.f, self.rank, self.scaling = mode, rule, int(f), rank, float(scaling)
        self.clip_norm, self.params = clip_norm, dict(rule_params)

    def aggregate(self, updates: Sequence[Mapping[str, Any]], *, weights: Any = None,
                  scalings: Any = 1.0) -> LoraResult:
        """`updates`: one mapping per participant; `weights`: per participant (rules that take them);
        `scalings`: each participant's LoRA scaling (lora_alpha / r), one number or one per update."""
        layers, dense = _split(updates)
        n = len(updates)
        s = np.broadcast_to(np.asarray(scalings, dtype=np.float64), (n,)).copy()
        if not (np.isfinite(s).all() and (s > 0).all()):
            raise ValueError("scalings must be positive numbers")
        w = None if weights is None else np.asarray(weights, dtype=np.float64)
        if w is not None and w.shape != (n,):
            raise ValueError(f"weights must have one entry per update ({n}), got shape {w.shape}")
        if self.mode == "factors":
            if any(len(set(layer.ranks)) > 1 for layer in layers):
                raise ValueError("'factors' averages A with A and B with B: every update needs the same rank per "
                                 "layer (use 'exact' or 'stacked' for heterogeneous ranks)")
            if len(set(s)) > 1:
                raise ValueError("'factors' needs one scaling for all updates (their factors are averaged as they "
                                 "are); use 'exact' or 'stacked'")
            return self._factors(updates, layers, dense, w, float(s[0]))
        return self._products(updates, layers, dense, w, s)

    # ------------------------------------------------------------------ factors
    def _needs_gram(self) -> bool:
        """The mean and the coordinate-wise median and trimmed mean decide nothing from distances:
        no Gram matrix for them (one pass over the updates), unless clip_norm needs the norms."""
        return self.rule not in ("mean", "median", "trimmed_mean") or self.clip_norm is not None

    def _factors(self, updates, layers, dense, w, s0) -> LoraResult:
        tensors: Dict[str, List[Any]] = {}
        for layer in layers:
            tensors[layer.name + _A], tensors[layer.name + _B] = layer.raw_A, layer.raw_B
        tensors.update(dense)
        n = len(updates)
        G = np.zeros((n, n))
        if self._needs_gram():
            G = sum((_tensor_gram(v, k) for k, v in tensors.items()), G)
        scale = self._clip_scales(G)
        G = G * np.outer(scale, scale)
        coef, sel, info = _rule_on_gram(G, self.rule, self.f, w, self.params)
        ref = updates[0]
        out: Dict[str, Any] = {}
        for k, raw in tensors.items():
            vals = [_to_float64(v, f"update {i}'s {k}") * c for i, (v, c) in enumerate(zip(raw, scale))]
            if coef is not None:
                agg = sum((c * v for c, v in zip(coef, vals)), np.zeros_like(vals[0]))
            else:
                agg = self._coordinatewise(vals, sel)
            if k.endswith(_B):  # the factors' product carries s0; the output's carries self.scaling
                agg = agg * (s0 / self.scaling)
            out[k] = _like(agg, ref[k])
        return LoraResult(out, info, {layer.name: layer.ranks[0] for layer in layers}, self.scaling)

    def _coordinatewise(self, vals: List[np.ndarray], sel: Optional[np.ndarray]) -> np.ndarray:
        from .. import aggregate

        shape = vals[0].shape
        X = np.stack([v.reshape(-1) for v in vals])
        if self.rule == "bulyan":  # the selection (from the whole update), then the trimmed mean of it
            res = aggregate(X[sel].astype(np.float32), "trimmed_mean", self.f)
        else:
            res = aggregate(X.astype(np.float32), self.rule, self.f, **self.params)
        return np.asarray(res, dtype=np.float64).reshape(shape)

    def _clip_scales(self, G: np.ndarray) -> np.ndarray:
        norms = np.sqrt(np.clip(np.diag(G), 0.0, None))
        if self.clip_norm is None:
            return np.ones(len(norms))
        return np.minimum(1.0, self.clip_norm / np.maximum(norms, np.finfo(np.float64).tiny))

    # ------------------------------------------------------------------ products
    def _products(self, updates, layers, dense, w, s) -> LoraResult:
        xb = backend.choose(self.device, [t for layer in layers for t in layer.raw_A + layer.raw_B])
        G = np.zeros((len(s), len(s)))
        if self._needs_gram():
            G = sum((_product_gram(layer, s, xb) for layer in layers), G)
            G = G + sum((_tensor_gram(v, k) for k, v in dense.items()), np.zeros_like(G))
        scale = self._clip_scales(G)
        G = G * np.outer(scale, scale)
        cs = s * scale  # each update's factor: its LoRA scaling and its clipping
        coef, sel, info = _rule_on_gram(G, self.rule, self.f, w, self.params)
        ref = updates[0]
        out: Dict[str, Any] = {}
        ranks: Dict[str, int] = {}
        discarded: Dict[str, float] = {}
        for layer in layers:
            if coef is not None:
                use = [i for i in range(len(s)) if coef[i] != 0]
                Bs, As = layer.stacked(use, np.array([coef[i] * cs[i] for i in use]), xb)
                if self.mode == "stacked":
                    B, A, lost = Bs, As, 0.0
                else:
                    B, A, lost = _truncate(Bs, As, self.rank or max(layer.ranks), xb)
                conv = xb
            else:  # coordinate-wise rules: dense products a block of rows at a time, on the host
                M = self._dense_product(layer, cs, sel)
                B, A, lost = _svd_truncate(M, self.rank or max(layer.ranks))
                conv = _HOST
            root = float(np.sqrt(self.scaling))  # scaling * B' A' = the aggregate
            if root != 1.0:  # in place: A and B are this call's own arrays (stacked: n times the input's size)
                A /= root
                B /= root
            out[layer.name + _A] = conv.like(A, ref[layer.name + _A])
            out[layer.name + _B] = conv.like(B, ref[layer.name + _B])
            ranks[layer.name], discarded[layer.name] = A.shape[0], lost
        for k, raw in dense.items():
            vals = [_to_float64(v, f"update {i}'s {k}") * c for i, (v, c) in enumerate(zip(raw, scale))]
            agg = (sum((c * v for c, v in zip(coef, vals)), np.zeros_like(vals[0])) if coef is not None
                   else self._coordinatewise(vals, sel))
            out[k] = _like(np.asarray(agg, dtype=np.float64), ref[k])
        return LoraResult(out, info, ranks, self.scaling, discarded if self.mode == "exact" else {})

    def _dense_product(self, layer: _Layer, cs: np.ndarray, sel: Optional[np.ndarray]) -> np.ndarray:
        """A coordinate-wise rule over the products s_i B_i A_i, a block of rows at a time."""
        out_dim, in_dim = layer.shape
        A, B = layer.factors()
        M = np.empty((out_dim, in_dim))
        step = max(1, _ROW_BLOCK // in_dim)
        for r0 in range(0, out_dim, step):
            rows = [cs[i] * (B[i][r0:r0 + step] @ A[i]) for i in range(len(cs))]
            M[r0:r0 + step] = self._coordinatewise(rows, sel)
        return M


def _svd_truncate(M: np.ndarray, rank: int) -> Tuple[np.ndarray, np.ndarray, float]:
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    total = float(np.sum(S ** 2))
    k = min(rank, S.size)
    B = np.zeros((M.shape[0], rank))
    A = np.zeros((rank, M.shape[1]))
    root = np.sqrt(S[:k])
    B[:, :k] = U[:, :k] * root
    A[:k] = root[:, None] * Vt[:k]
    return B, A, (float(np.sum(S[k:] ** 2)) / total if total > 0 else 0.0)
