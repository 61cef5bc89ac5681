"""NVFlare backend: a ``ModelAggregator`` that aggregates with fedagg's rules.

>>> import numpy as np
>>> from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
>>> from fedagg.integrations.nvflare import FedaggAggregator
>>> agg = FedaggAggregator(rule="median")
>>> for name, x in [("site-1", 1.0), ("site-2", 2.0), ("site-3", 90.0)]:
...     _ = agg.accept_model(FLModel(params_type=ParamsType.DIFF, params={"w": np.full(2, x, np.float32)},
...                                  meta={"client_name": name}))
>>> out = agg.aggregate_model()
>>> out.params["w"], out.params_type, out.meta["fedagg"]["clients"]
(array([2., 2.], dtype=float32), <ParamsType.DIFF: 'DIFF'>, ['site-1', 'site-2', 'site-3'])

Use it wherever NVFlare takes a ``ModelAggregator``, e.g. the ``FedAvg``
controller (``nvflare.app_common.workflows.fedavg.FedAvg(aggregator=...)``) or a
``FedAvgRecipe(aggregator=...)``. When a job is exported (``FedJob.export_job``,
``simulator_run``), call ``job.set_app_packages(["fedagg"])`` so that fedagg (a
compiled package that must be installed on the server) is imported, not copied
into the job's ``custom`` folder; give ``dp`` as a dict of ``CentralDP``
arguments there, since the job config is JSON. A complete job (``FedJob`` with
``FedAvg(model=<dict>, persistor_id="", aggregator=FedaggAggregator(...))``,
a NumPy client script through ``ScriptRunner(..., framework="numpy")``,
``simulator_run(workspace, n_clients=...)``, and where the saved model lands)
is in examples/nvflare.

What happens to a client's model (``accept_model``):

- Its ``params`` (a dict of name -> NumPy array or torch tensor; lazy
  references with ``materialize()`` are loaded first) are checked against the
  first model of the round: the same keys (after ``exclude_vars``), shapes,
  array kind and dtype (float16, bfloat16, float32 or float64), and the same
  ``params_type`` (FULL or DIFF). A client name (``meta["client_name"]``, set by
  NVFlare's controllers, or ``meta["site_name"]``) may contribute once a round.
- The values are written straight into one preallocated ``(n, d)`` float32
  buffer (a float32 array is copied and checked for NaN/Inf in one pass; other
  dtypes are converted on the way in), so the round holds one float32 copy of
  each update and nothing else. The buffer is kept across rounds.
- NaN or Inf: ``nonfinite="raise"`` raises ``ValueError`` naming the client and
  the parameter (NVFlare's controllers log it and leave the client out of the
  round); ``"exclude"`` drops the model quietly and reports the client in the
  result's ``meta["fedagg"]["excluded"]``. Any other check failing raises
  (``TypeError`` for wrong types, ``ValueError`` otherwise) and leaves the
  state unchanged.

Weights (``weighted``): the weight of a client is NVFlare's FedAvg weight,
``aggregation_weights.get(client, 1.0) * meta["NUM_STEPS_CURRENT_ROUND"]``, the
step count read exactly as ``FedAvg`` reads it (missing, not a number, not
finite or <= 0: 1.0). By default only ``rule="mean"`` without ``dp`` is weighted
(FedAvg); the robust rules are not, since the step count is whatever a client
claims. ``weighted=True`` works with the rules that take weights (mean,
multi_krum, geometric_median, centered_clipping). Client metrics (numeric
scalars) are averaged with the same weights, as FedAvg does, so early stopping
and model selection keep working.

``aggregate_model`` runs ``fedagg.aggregate`` on the rows ordered by client name
(arrival order for unnamed models), so the result does not depend on the order
in which the clients answered: it is bit-for-bit ``fedagg.aggregate`` of the
updates in that order. It returns an ``FLModel`` with the keys, shapes, dtypes,
array kind and ``params_type`` of the inputs, and ``meta["fedagg"]``: rule, f,
clients, weights, selected, excluded, clipped, and with ``dp`` the round's
privacy record. Then the round's state is cleared (``reset_stats``).
``centered_clipping`` starts each round from the previous round's result, as
``fedagg.Aggregator`` does.

Differential privacy (``dp``: a ``fedagg.privacy.CentralDP`` or a dict of its
arguments) and ``clip_norm`` bound the norm of each update, which is meaningful
for model differences only: they require ``params_type`` DIFF (clients sending
``ParamsType.DIFF``, e.g. ``params_transfer_type=TransferType.DIFF`` in
NVFlare's client API).
"""

from __future__ import annotations

import math
import re
import sys
import threading
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from .. import _core
from ..rules import RULES, _check_f_used, _check_float, _check_int, _check_policy, _params, aggregate

__all__ = ["FedaggAggregator", "num_steps_weight"]

_NUMPY_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_META_KEY = "fedagg"


def num_steps_weight(meta: Optional[dict]) -> float:
    """``meta["NUM_STEPS_CURRENT_ROUND"]`` as NVFlare's FedAvg weighs it (default 1.0)."""
    value = (meta or {}).get(FLMetaKey.NUM_STEPS_CURRENT_ROUND)
    if value is None or isinstance(value, bool):
        return 1.0
    try:
        weight = float(value)
    except (TypeError, ValueError, OverflowError):
        return 1.0
    if not math.isfinite(weight) or weight <= 0:
        return 1.0
    return weight


def _client_name(meta: Optional[dict]) -> Optional[str]:
    meta = meta or {}
    for key in ("client_name", FLMetaKey.SITE_NAME):
        value = meta.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _torch():
    return sys.modules.get("torch")


def _spec(value: Any) -> Tuple:
    """(kind, dtype, device) of a parameter; raises TypeError for what cannot be aggregated."""
    torch = _torch()
    if torch is not None and isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"dtype {value.dtype} is not floating point")
        return ("torch", value.dtype, value.device)
    if isinstance(value, np.ndarray):
        if value.dtype not in _NUMPY_FLOATS:
            raise TypeError(f"dtype {value.dtype} is not float16, float32 or float64")
        return ("numpy", value.dtype, None)
    raise TypeError(f"{type(value).__name__} is not a NumPy array or torch tensor")


def _describe(spec: Tuple) -> str:
    kind, dtype, device = spec
    return f"torch {dtype} on {device}" if kind == "torch" else f"numpy {dtype}"


def _fill(dst: np.ndarray, value: Any) -> bool:
    """Copy `value` into the float32 slice `dst` (converting); True if every value written is finite."""
    torch = _torch()
    if torch is not None and isinstance(value, torch.Tensor):
        t = value.detach()
        if t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous():
            value = t.numpy()  # a view: the one-pass copy below
        else:  # converted (and moved to the host) by torch, straight into the buffer
            torch.from_numpy(dst).view(t.shape).copy_(t)
            return not _core.nonfinite_rows([dst])[0]
    if value.dtype == np.float32 and value.flags.c_contiguous:
        return bool(_core.copy_crc32c(dst, value.reshape(-1), check_finite=True)[1])
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes Inf, caught next
        np.copyto(dst.reshape(value.shape), value, casting="same_kind")
    return not _core.nonfinite_rows([dst])[0]


def _plain(value: Any) -> Any:
    """NumPy scalars and arrays as Python values (the meta travels through FOBS and logs)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _metric_value(value: Any) -> Optional[float]:
    if isinstance(value, (bool, int, float, np.integer, np.floating, np.bool_)):
        value = float(value)
        return value if math.isfinite(value) else None
    return None


class FedaggAggregator(ModelAggregator):
    """An NVFlare ``ModelAggregator`` running a fedagg rule on the clients' models.

    Args:
        rule: one of ``fedagg.RULES`` ("mean", "median", "trimmed_mean", "krum", ...).
        f: the number of Byzantine clients the rule must tolerate.
        weighted: weigh clients by NVFlare's FedAvg weight. None: only for
            ``rule="mean"`` without ``dp``. True needs a rule that takes weights.
        aggregation_weights: per-client factors of the weight (client name -> number >= 0).
        exclude_vars: regular expression; matching parameter names are left out of
            the aggregation and of the result (as in NVFlare's aggregators).
        nonfinite: "raise" or "exclude" (see the module docstring).
        clip_norm: static L2 clipping of each update before the rule (DIFF only).
        nnm: nearest-neighbour mixing before the rule.
        dp: a ``fedagg.privacy.CentralDP``, or a dict of its keyword arguments (DIFF only).
        params: the rule's own parameters (``beta``, ``m``, ``nu``, ``maxiter``,
            ``tol``, ``tau``, ``iterations``), as a dict.
        expected_clients: rows to reserve when the first model arrives (the buffer
            grows by doubling beyond that, and is kept for the next rounds).
    """

    def __init__(self, rule: str = "mean", f: int = 0, *, weighted: Optional[bool] = None,
                 aggregation_weights: Optional[Dict[str, float]] = None, exclude_vars: Optional[str] = None,
                 nonfinite: str = "raise", clip_norm: Optional[float] = None, nnm: bool = False,
                 dp: Any = None, params: Optional[Dict[str, Any]] = None,
                 expected_clients: Optional[int] = None):
        super().__init__()
        # Public attributes carry the constructor's arguments as given: NVFlare's job
        # export reads them back by name to write the JSON config.
        self.rule = rule
        self.f = f
        self.weighted = weighted
        self.aggregation_weights = aggregation_weights
        self.exclude_vars = exclude_vars
        self.nonfinite = nonfinite
        self.clip_norm = clip_norm
        self.nnm = nnm
        self.dp = dp
        self.params = params
        self.expected_clients = expected_clients

        if not isinstance(rule, str):
            raise TypeError(f"rule must be a string, got {type(rule).__name__}")
        _check_policy(nonfinite)
        if not isinstance(nnm, bool):
            raise TypeError("nnm must be True or False")
        if params is not None and not isinstance(params, dict):
            raise TypeError(f"params must be a dict of the rule's parameters, got {type(params).__name__}")
        self._rule_params = dict(params or {})
        if "center" in self._rule_params:
            raise ValueError("centered_clipping's center is the previous round's result here; do not pass it")
        _params(rule, f, None, None, None, self._rule_params)  # rule, f and the rule's parameters
        _check_f_used(rule, f, nnm)  # the mean refuses an f it would ignore
        if weighted is not None and not isinstance(weighted, bool):
            raise TypeError("weighted must be True, False or None")
        if weighted and not RULES[rule].weights:
            raise ValueError(f"rule {rule!r} does not take per-update weights; use weighted=False")
        if dp is not None and weighted:
            raise ValueError("dp needs weights in [0, 1] (bounded sensitivity); NVFlare's step-count "
                             "weights are not: use weighted=False")
        self._weighted = (rule == "mean" and dp is None) if weighted is None else weighted
        self._factors: Dict[str, float] = {}
        if aggregation_weights:
            if not isinstance(aggregation_weights, dict):
                raise TypeError("aggregation_weights must be a dict of client name -> weight")
            if not self._weighted:
                raise ValueError("aggregation_weights are used only by a weighted aggregator (weighted=True)")
            for name, w in aggregation_weights.items():
                self._factors[name] = _check_float(w, f"aggregation_weights[{name!r}]", positive=False)
                if self._factors[name] < 0:
                    raise ValueError(f"aggregation_weights[{name!r}] must be >= 0, got {w}")
        self._exclude = re.compile(exclude_vars) if exclude_vars else None
        if clip_norm is not None:
            if dp is not None:
                raise ValueError("dp sets the clipping norm; do not pass clip_norm with it")
            _check_float(clip_norm, "clip_norm")
        if isinstance(dp, dict):
            from ..privacy import CentralDP

            self._dp = CentralDP(**dp)
        else:
            if dp is not None and not (hasattr(dp, "release") and hasattr(dp, "check_weights")):
                raise TypeError("dp must be a fedagg.privacy.CentralDP or a dict of its arguments")
            self._dp = dp
        if self._dp is not None:
            self._dp.check_weights(rule, None)
        if expected_clients is not None:
            _check_int(expected_clients, "expected_clients", 1)

        self._lock = threading.RLock()
        self._storage: Optional[np.ndarray] = None  # flat float32, capacity * d, kept across rounds
        self._center: Optional[np.ndarray] = None  # centered_clipping: the previous round's result
        self.reset_stats()

    # ------------------------------------------------------------------ round state
    def reset_stats(self) -> None:
        """Forget this round's models (the buffer's memory is kept for the next round)."""
        with self._lock:
            self._layout: Optional[List[Tuple[str, int, int, tuple, Tuple]]] = None  # key, offset, size, shape, spec
            self._d = 0
            self._params_type: Optional[ParamsType] = None
            self._count = 0
            self._names: List[Optional[str]] = []
            self._seen: set = set()
            self._weights: List[float] = []
            self._metrics: List[Tuple[Dict[str, float], float]] = []
            self._excluded: List[Optional[str]] = []

    # No __len__: NVFlare tests components for truth (FedAvg: `if self.aggregator:`), and an
    # empty round must not make the aggregator falsy.
    @property
    def num_accepted(self) -> int:
        """Client models accepted this round so far."""
        return self._count

    def _rows(self, capacity: int) -> np.ndarray:
        """The (capacity, d) view of the buffer, growing it (rows so far kept) if needed."""
        d = self._d
        have = 0 if self._storage is None else self._storage.size // d
        if have < capacity:
            new = max(capacity, 2 * have, self.expected_clients or 1)
            storage = np.empty(new * d, dtype=np.float32)
            if self._count:
                storage[: self._count * d] = self._storage[: self._count * d]
            self._storage = storage
            have = new
        return self._storage[: have * d].reshape(have, d)

    def _layout_of(self, params: Dict[str, Any]) -> List[Tuple[str, int, int, tuple, Tuple]]:
        layout, offset = [], 0
        for key, value in params.items():
            try:
                spec = _spec(value)
            except TypeError as e:
                raise TypeError(f"params[{key!r}]: {e}; only floating-point arrays are aggregated "
                                "(leave other params out with exclude_vars)") from None
            shape = tuple(value.shape)
            size = int(math.prod(shape))
            layout.append((key, offset, size, shape, spec))
            offset += size
        if offset == 0:
            raise ValueError("the model has no values to aggregate")
        return layout

    # ------------------------------------------------------------------ accept
    def accept_model(self, model: FLModel) -> bool:
        """Add one client's model to the round; returns False if dropped by nonfinite="exclude"."""
        if not isinstance(model, FLModel):
            raise TypeError(f"expected an FLModel, got {type(model).__name__}")
        name = _client_name(model.meta)
        who = f"client {name!r}" if name is not None else "the model"
        params = model.params
        if not isinstance(params, dict):
            raise TypeError(f"{who}: params must be a dict of name -> array, got {type(params).__name__}")
        if not params:
            raise ValueError(f"{who} has no params")
        try:
            params_type = ParamsType(model.params_type) if model.params_type is not None else ParamsType.FULL
        except ValueError:
            raise ValueError(f"{who}: params_type must be FULL or DIFF, got {model.params_type!r}") from None
        if params_type == ParamsType.FULL and (self._dp is not None or self.clip_norm is not None):
            raise ValueError(f"{who} sent FULL params: dp and clip_norm bound the norm of model updates, "
                             "so they need params_type DIFF")
        if self._exclude is not None:
            params = {k: v for k, v in params.items() if not self._exclude.search(k)}
            if not params:
                raise ValueError(f"{who}: exclude_vars leaves no params to aggregate")
        params = {k: (v.materialize() if callable(getattr(v, "materialize", None)) else v)
                  for k, v in params.items()}
        weight = self._factors.get(name, 1.0) * num_steps_weight(model.meta)
        metrics = {}
        for k, v in (model.metrics or {}).items():
            value = _metric_value(v)
            if value is not None:
                metrics[k] = value

        with self._lock:
            if name is not None and name in self._seen:
                raise ValueError(f"client {name!r} already contributed to this round")
            layout = self._layout
            if layout is None:
                layout = self._layout_of(params)
            else:
                self._check(who, params, params_type, layout)
            d = layout[-1][1] + layout[-1][2]
            first = self._layout is None
            if first:
                self._d = d
                if self._storage is not None and self._storage.size % d:
                    self._storage = None  # another model size: let the buffer go
            rows = self._rows(self._count + 1)
            row = rows[self._count]
            for key, offset, size, shape, spec in layout:
                if size and not _fill(row[offset:offset + size], params[key]):
                    if first:
                        self._d = 0
                    if self.nonfinite == "raise":
                        raise ValueError(f"{who}: params[{key!r}] contains NaN or Inf "
                                         "(pass nonfinite='exclude' to drop such models quietly)")
                    self._excluded.append(name)
                    if name is not None:
                        self._seen.add(name)
                    self.warning(f"{who}: params[{key!r}] contains NaN or Inf; excluded from this round")
                    return False
            if first:
                self._layout = layout
                self._params_type = params_type
            self._names.append(name)
            if name is not None:
                self._seen.add(name)
            self._weights.append(weight)
            self._metrics.append((metrics, weight))
            self._count += 1
        return True

    def accept(self, shareable, fl_ctx) -> bool:
        """Called by ScatterAndGather: False when the model was dropped (nonfinite="exclude")."""
        self.fl_ctx = fl_ctx
        return self.accept_model(FLModelUtils.from_shareable(shareable, fl_ctx)) is not False

    def _check(self, who: str, params: Dict[str, Any], params_type: ParamsType, layout) -> None:
        if params_type != self._params_type:
            raise ValueError(f"{who} sent params_type {params_type.value}, this round has {self._params_type.value}")
        keys = {entry[0] for entry in layout}
        if set(params) != keys:
            missing = sorted(keys - set(params))
            extra = sorted(set(params) - keys)
            raise ValueError(f"{who}: params keys differ from this round's first model "
                             f"(missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                             f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''})")
        for key, _offset, _size, shape, spec in layout:
            value = params[key]
            try:
                got = _spec(value)
            except TypeError as e:
                raise TypeError(f"{who}: params[{key!r}]: {e}") from None
            if got != spec:
                raise TypeError(f"{who}: params[{key!r}] is {_describe(got)}, this round has {_describe(spec)}")
            if tuple(value.shape) != shape:
                raise ValueError(f"{who}: params[{key!r}] has shape {tuple(value.shape)}, this round has {shape}")

    # ------------------------------------------------------------------ aggregate
    def aggregate_model(self) -> FLModel:
        """Aggregate the round's models with the rule; clears the round (``reset_stats``) on success."""
        with self._lock:
            n = self._count
            if n == 0:
                excluded = f" ({len(self._excluded)} excluded for NaN/Inf)" if self._excluded else ""
                raise ValueError(f"no client model was accepted this round{excluded}")
            # Rows by client name (unnamed ones after, in arrival order): the result does not
            # depend on the order the clients answered in. A list of row views: nothing copied.
            order = sorted(range(n), key=lambda i: (self._names[i] is None, self._names[i] or "", i))
            rows = self._storage[: n * self._d].reshape(n, self._d)
            updates = [rows[i] for i in order]
            names = [self._names[i] for i in order]
            weights = np.array([self._weights[i] for i in order]) if self._weighted else None
            params = dict(self._rule_params)
            if self.rule == "centered_clipping" and self._center is not None and self._center.size == self._d:
                params["center"] = self._center
            try:
                out, info = aggregate(updates, self.rule, self.f, weights=weights, nonfinite="raise",
                                      clip_norm=self.clip_norm, nnm=self.nnm, dp=self._dp, return_info=True,
                                      **params)
            except ValueError as e:
                raise ValueError(f"{self.rule} over {n} accepted client model(s) "
                                 f"({len(self._excluded)} excluded for NaN/Inf): {e}") from e
            if self.rule == "centered_clipping":
                self._center = np.array(out, copy=True)  # the returned params are views of out
            result = FLModel(params_type=self._params_type, params=self._unflatten(out),
                             metrics=self._mean_metrics(), meta={_META_KEY: self._info(info, names)})
            self.reset_stats()
        return result

    def _unflatten(self, out: np.ndarray) -> Dict[str, Any]:
        params = {}
        torch = _torch()
        for key, offset, size, shape, (kind, dtype, device) in self._layout:
            part = out[offset:offset + size].reshape(shape)  # a view of the result
            if kind == "numpy":
                params[key] = part if dtype == np.float32 else part.astype(dtype)
            else:
                params[key] = torch.from_numpy(part).to(device=device, dtype=dtype)
        return params

    def _mean_metrics(self) -> Optional[Dict[str, float]]:
        totals: Dict[str, List[float]] = {}
        for metrics, w in self._metrics:
            for k, v in metrics.items():
                acc = totals.setdefault(k, [0.0, 0.0])
                acc[0] += w * v
                acc[1] += w
        return {k: s / w for k, (s, w) in totals.items() if w > 0} or None

    def _info(self, info, names: List[Optional[str]]) -> Dict[str, Any]:
        label = [name if name is not None else f"#{i}" for i, name in enumerate(names)]
        meta = {
            "rule": self.rule,
            "f": int(self.f),
            "n": len(names),
            "clients": label,
            "weights": None if info.weights is None else [float(w) for w in info.weights],
            "selected": None if info.selected is None else [label[int(i)] for i in info.selected],
            "excluded": list(self._excluded),
            "clipped": int(info.clipped),
            "details": {k: _plain(v) for k, v in info.details.items()},
        }
        if info.iterations is not None:
            meta["iterations"] = int(info.iterations)
        if info.privacy is not None:
            meta["privacy"] = {k: _plain(v) for k, v in info.privacy.as_dict().items()}
        return meta
