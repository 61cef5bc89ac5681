"""Flower strategies that aggregate with fedagg (Flower's Message API, ``flwr.serverapp``).

>>> from fedagg.integrations.flower import FedaggStrategy          # doctest: +SKIP
>>> strategy = FedaggStrategy("multi_krum", f=1, rule_params={"m": 3}, fraction_evaluate=0.0)
>>> strategy.min_nodes            # Multi-Krum needs n > 2f + 2: Flower waits for 5 nodes (logged)
5
>>> result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=10)   # in a ServerApp

A complete app (ServerApp, ClientApp, how to run it): examples/flower.

``FedaggStrategy`` subclasses Flower's ``FedAvg``: node sampling, configs,
evaluation and metric aggregation are Flower's; ``aggregate_train`` is
replaced. Each round it

1. checks every reply against the current global ``ArrayRecord`` (the one
   ``configure_train`` sent out): one ArrayRecord, the same keys, shapes and
   floating-point dtypes, one reply per node (``invalid="raise"`` raises
   ``ValueError`` naming the node, ``invalid="drop"`` leaves the reply out and
   reports it); replies are taken in node-id order, so the result does not
   depend on the order they arrived in;
2. decodes the replies into one preallocated ``(n, d)`` float32 buffer: each
   ``Array`` is read as a NumPy view of the message's own bytes (the ``.npy``
   header is parsed, the data is not copied) and written once into its row;
   a fedagg ``compress.Payload`` (see :func:`payload_to_arrays`) is decoded
   straight into its row;
3. runs ``fedagg.aggregate`` with the rule, ``f``, weights (the replies'
   ``num-examples``, for the rules that define weights), ``clip_norm``,
   ``nnm``, ``nonfinite`` and ``dp`` (a ``fedagg.privacy.CentralDP``);
4. splits the result back into an ``ArrayRecord`` with the global's keys,
   shapes and dtypes, and returns metrics saying what the rule did.

Deltas, not weights (``aggregate_on="deltas"``, the default). Flower's
clients return full model weights. The strategy subtracts the current global
model from each reply (in the same pass that decodes it), aggregates the
updates ``x_i = w_i - g`` and returns ``g + rule(x_1..x_n)``. For rules that
commute with translation (mean, median, trimmed mean, Krum, Multi-Krum,
Bulyan, geometric median, NNM) this equals aggregating the weights, up to
float32 rounding (which it improves: the distances are computed on small
deltas, not as differences of large weights). Clipping, central DP, centered
clipping (whose center is then the current model) and compressed updates
only make sense on updates, and need deltas; ``aggregate_on="weights"``
aggregates the weights as Flower's own strategies do and refuses them.

Flower's DP wrappers compose: ``DifferentialPrivacyServerSideFixedClipping(
FedaggStrategy(...), ...)`` clips each reply's update and calls this
strategy's ``aggregate_train``, then adds its noise. Their noise is calibrated
to the mean's sensitivity (C / m); a robust rule's aggregate can move by up to
2C when one participant changes, so with a robust rule prefer fedagg's own
``dp=CentralDP(...)``, which clips, aggregates, clips the aggregate and
calibrates the noise to 2C. See docs/integrations.md.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore import log
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fedagg.integrations.flower needs Flower with the Message API "
        "(flwr.serverapp.strategy, flwr >= 1.21): pip install 'fedagg[flower]'"
    ) from exc

from .. import compress
from ..compress import Payload, PayloadError
from ..rules import RULES, AggregationInfo, _check_f_used, _check_float, _params
from ..rules import aggregate as _aggregate

__all__ = [
    "FedaggStrategy",
    "Layout",
    "PAYLOAD_STYPE",
    "RoundReport",
    "arrays_to_payload",
    "arrays_to_vector",
    "is_payload",
    "payload_to_arrays",
    "vector_to_arrays",
]

NUMPY_STYPE = "numpy.ndarray"  # flwr.common.constant.SType.NUMPY
#: ``Array.stype`` of the arrays that carry a fedagg compress Payload
PAYLOAD_STYPE = "fedagg.payload"
_PAYLOAD_HEADER = "fedagg.payload"  # key of the header frame; buffers are "fedagg.payload.<i>"
_NPY_MAGIC = b"\x93NUMPY"


# ------------------------------------------------------------------ arrays <-> vectors
def _npy_view(arr: Any, where: str) -> np.ndarray:
    """The array an ``Array`` holds, as a read-only view of its ``.npy`` bytes (no copy)."""
    if not isinstance(arr, Array):
        raise TypeError(f"{where}: expected a flwr Array, got {type(arr).__name__}")
    if arr.stype != NUMPY_STYPE:
        raise ValueError(f"{where}: stype {arr.stype!r} is not {NUMPY_STYPE!r}")
    data = arr.data
    mv = memoryview(data)
    if mv.nbytes < 10 or bytes(mv[:6]) != _NPY_MAGIC:
        raise ValueError(f"{where}: data is not in .npy format")
    major = mv[6]
    if major == 1:
        start = 10 + int.from_bytes(mv[8:10], "little")
    elif major == 2:
        start = 12 + int.from_bytes(mv[8:12], "little") if mv.nbytes >= 12 else -1
    else:
        raise ValueError(f"{where}: .npy format version {major} is not supported")
    if start < 0 or start > mv.nbytes or start > (1 << 20):
        raise ValueError(f"{where}: truncated .npy header")
    fp = io.BytesIO(bytes(mv[:start]))  # the header only
    try:
        version = np.lib.format.read_magic(fp)
        reader = np.lib.format.read_array_header_1_0 if version[0] == 1 else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = reader(fp)
    except ValueError as e:
        raise ValueError(f"{where}: bad .npy header ({e})") from None
    if dtype.hasobject or dtype.kind not in "fiub" or dtype.fields is not None or dtype.subdtype is not None:
        raise TypeError(f"{where}: dtype {dtype} is not a plain numeric dtype")
    size = math.prod(shape)
    if mv.nbytes - start != size * dtype.itemsize:
        raise ValueError(f"{where}: {mv.nbytes - start} data bytes, the header says {size * dtype.itemsize}")
    view = np.frombuffer(data, dtype=dtype, count=size, offset=start)
    if fortran_order:
        return view.reshape(shape[::-1]).T
    return view.reshape(shape)


@dataclass(frozen=True)
class Layout:
    """Keys, shapes and dtypes of an ArrayRecord, and where each float array sits in the flat vector.

    Arrays of non-float dtype (e.g. BatchNorm's ``num_batches_tracked``) are not
    part of the vector (``offsets[i] == -1``): they are refused, or kept from the
    global model (``non_float="keep"``).
    """

    keys: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]
    dtypes: Tuple[np.dtype, ...]
    offsets: Tuple[int, ...]
    d: int

    @staticmethod
    def of(record: ArrayRecord, non_float: str = "raise") -> "Layout":
        if not isinstance(record, ArrayRecord):
            raise TypeError(f"expected a flwr ArrayRecord, got {type(record).__name__}")
        if non_float not in ("raise", "keep"):
            raise ValueError(f"non_float must be 'raise' or 'keep', got {non_float!r}")
        keys, shapes, dtypes, offsets, d = [], [], [], [], 0
        for key, arr in record.items():
            view = _npy_view(arr, f"array {key!r}")
            keys.append(key)
            shapes.append(tuple(int(s) for s in view.shape))
            dtypes.append(view.dtype.newbyteorder("="))
            if view.dtype.kind == "f":
                offsets.append(d)
                d += view.size
            elif non_float == "keep":
                offsets.append(-1)
            else:
                raise TypeError(
                    f"array {key!r} has dtype {view.dtype}, not floating point; aggregating it makes no "
                    "sense (pass non_float='keep' to carry the global model's value through)")
        if d == 0:
            raise ValueError("the ArrayRecord holds no floating-point array")
        return Layout(tuple(keys), tuple(shapes), tuple(dtypes), tuple(offsets), d)

    def check(self, record: Any, where: str) -> List[Optional[np.ndarray]]:
        """Views of `record`'s float arrays in layout order (None for kept non-float ones); raises ValueError/TypeError."""
        if not isinstance(record, ArrayRecord):
            raise TypeError(f"{where}: expected an ArrayRecord, got {type(record).__name__}")
        if set(record.keys()) != set(self.keys):
            missing = sorted(set(self.keys) - set(record.keys()))
            extra = sorted(set(record.keys()) - set(self.keys))
            raise ValueError(f"{where}: keys differ from the global model's (missing {missing[:5]}, "
                             f"unexpected {extra[:5]})")
        views: List[Optional[np.ndarray]] = []
        for key, shape, off in zip(self.keys, self.shapes, self.offsets):
            if off < 0:
                views.append(None)
                continue
            view = _npy_view(record[key], f"{where}, array {key!r}")
            if view.shape != shape:
                raise ValueError(f"{where}: array {key!r} has shape {view.shape}, the global model {shape}")
            if view.dtype.kind != "f":
                raise TypeError(f"{where}: array {key!r} has dtype {view.dtype}, expected floating point")
            views.append(view)
        return views

    def fill(self, views: Sequence[Optional[np.ndarray]], out: np.ndarray, minus: Optional[np.ndarray] = None) -> None:
        """Write the views into the float32 vector `out` (one pass; ``- minus`` on the way if given)."""
        for view, shape, off in zip(views, self.shapes, self.offsets):
            if view is None:
                continue
            size = view.size
            dst = out[off:off + size].reshape(shape)
            if minus is None:
                np.copyto(dst, view, casting="same_kind")
            else:
                np.subtract(view, minus[off:off + size].reshape(shape), out=dst, casting="same_kind")


def arrays_to_vector(record: ArrayRecord, out: Optional[np.ndarray] = None, *, layout: Optional[Layout] = None,
                     non_float: str = "raise") -> np.ndarray:
    """The float arrays of `record` as one flat float32 vector (into `out` if given): one copy.

    >>> import numpy as np
    >>> from flwr.app import ArrayRecord                                # doctest: +SKIP
    >>> arrays_to_vector(ArrayRecord([np.ones((2, 2)), np.zeros(1)]))  # doctest: +SKIP
    array([1., 1., 1., 1., 0.], dtype=float32)
    """
    layout = layout or Layout.of(record, non_float)
    views = layout.check(record, "record")
    if out is None:
        out = np.empty(layout.d, dtype=np.float32)
    elif out.shape != (layout.d,) or out.dtype != np.float32:
        raise ValueError(f"out must be a float32 vector of {layout.d}")
    layout.fill(views, out)
    return out


def vector_to_arrays(vector: np.ndarray, layout: Layout, keep: Optional[ArrayRecord] = None) -> ArrayRecord:
    """Split a flat vector into an ArrayRecord of `layout`'s keys, shapes and dtypes.

    Non-float arrays (``non_float="keep"``) are taken from `keep` (the global model).
    """
    vector = np.asarray(vector)
    if vector.shape != (layout.d,):
        raise ValueError(f"vector has shape {vector.shape}, the layout needs ({layout.d},)")
    out = ArrayRecord()
    for key, shape, dtype, off in zip(layout.keys, layout.shapes, layout.dtypes, layout.offsets):
        if off < 0:
            if keep is None:
                raise ValueError(f"array {key!r} is not floating point and no record to keep it from was given")
            out[key] = keep[key]
            continue
        part = vector[off:off + math.prod(shape)].reshape(shape)
        out[key] = Array(part.astype(dtype, copy=False))  # np.save: the one copy Array makes
    return out


# --------------------------------------------------------------- compressed updates
def payload_to_arrays(payload: Payload) -> ArrayRecord:
    """A fedagg ``compress.Payload`` (an encoded *update*) as an ArrayRecord to put in a reply.

    Key ``"fedagg.payload"`` holds the payload's header frame, keys
    ``"fedagg.payload.<i>"`` its buffers, as raw little-endian bytes with
    ``stype = "fedagg.payload"`` (not ``.npy``: nothing but this module should
    read them as model arrays). A client sends
    ``payload_to_arrays(codec.encode(trained_vector - global_vector, state))``
    where both vectors come from :func:`arrays_to_vector`.
    """
    if not isinstance(payload, Payload):
        raise TypeError(f"expected a fedagg.compress.Payload, got {type(payload).__name__}")
    frames = payload.to_frames()
    record = ArrayRecord()
    record[_PAYLOAD_HEADER] = Array(dtype="uint8", shape=(len(frames[0]),), stype=PAYLOAD_STYPE,
                                    data=bytes(frames[0]))
    for i, (frame, buf) in enumerate(zip(frames[1:], payload.buffers.values())):
        record[f"{_PAYLOAD_HEADER}.{i}"] = Array(dtype=buf.dtype.name, shape=(int(buf.size),),
                                                 stype=PAYLOAD_STYPE, data=bytes(frame))
    return record


def is_payload(record: Any) -> bool:
    """Whether an ArrayRecord carries a fedagg compress Payload (see :func:`payload_to_arrays`)."""
    return isinstance(record, ArrayRecord) and _PAYLOAD_HEADER in record


def arrays_to_payload(record: ArrayRecord) -> Payload:
    """The Payload a :func:`payload_to_arrays` record carries, every field checked (no buffer is copied)."""
    if not is_payload(record):
        raise PayloadError("the ArrayRecord carries no fedagg payload")
    k = len(record) - 1
    want = {_PAYLOAD_HEADER, *(f"{_PAYLOAD_HEADER}.{i}" for i in range(k))}
    if set(record.keys()) != want:
        raise PayloadError(f"payload record keys must be {sorted(want)}, got {sorted(record.keys())}")
    frames = []
    for key in [_PAYLOAD_HEADER, *(f"{_PAYLOAD_HEADER}.{i}" for i in range(k))]:
        arr = record[key]
        if arr.stype != PAYLOAD_STYPE:
            raise PayloadError(f"array {key!r} has stype {arr.stype!r}, expected {PAYLOAD_STYPE!r}")
        frames.append(arr.data)
    return Payload.from_frames(frames)


# -------------------------------------------------------------------------- strategy
@dataclass
class RoundReport:
    """What ``aggregate_train`` did in one round (``FedaggStrategy.last_report``)."""

    server_round: int
    #: node id of each aggregated update, in the order given to the rule (info's indices refer to it)
    node_ids: List[int] = field(default_factory=list)
    #: replies left out as invalid (``invalid="drop"``): node id -> reason
    dropped: Dict[int, str] = field(default_factory=dict)
    #: replies that carried an error instead of content
    failures: int = 0
    #: fedagg's AggregationInfo (None if the round was skipped)
    info: Optional[AggregationInfo] = None
    #: which updates arrived compressed (a fedagg Payload), by position
    compressed: List[bool] = field(default_factory=list)

    def nodes(self, indices: Optional[np.ndarray]) -> List[int]:
        return [] if indices is None else [self.node_ids[int(i)] for i in indices]


class _Invalid(Exception):
    pass


def _min_n(rule: str, f: int) -> int:
    return RULES[rule].min_n(f)


class FedaggStrategy(FedAvg):
    """Flower ``FedAvg`` whose ``aggregate_train`` is any fedagg rule.

    rule, f: one of ``fedagg.RULES`` and the number of Byzantine replies it must
    tolerate. rule_params: the rule's own parameters (``m``, ``beta``, ``tau``,
    ``iterations``, ``nu``, ``maxiter``, ``tol``, ``center``).
    aggregate_on: ``"deltas"`` (default; ``g + rule(w_i - g)`` with g the
    global model sent this round) or ``"weights"`` (``rule(w_i)``, as Flower's
    own strategies; refuses clip_norm, dp, centered_clipping and payloads).
    weighted: weight the updates by the replies' ``weighted_by_key``
    (``num-examples``). None: when the rule defines weights (mean, multi_krum,
    geometric_median, centered_clipping) and dp is not set.
    clip_norm, nnm, nonfinite, dp: as ``fedagg.aggregate``.
    invalid: ``"raise"`` (default): a malformed reply (keys, shapes, dtypes,
    payload, weight) raises ValueError/TypeError naming its node, and so does a
    round with too few replies for the rule. ``"drop"``: such replies are left
    out and reported (metrics ``fedagg-dropped-nodes``, ``last_report``), and a
    round left with too few replies is skipped (the global model is kept).
    non_float: ``"raise"`` (default) refuses a global model with non-float
    arrays; ``"keep"`` carries them through from the global model.
    min_train_nodes, min_available_nodes: default to the rule's smallest n
    for f (``fedagg.RULES[rule].min_n(f)``, e.g. 2f + 3 for Krum, at least
    Flower's default 2); smaller values raise ValueError. Flower waits until
    that many nodes are connected before a round starts: the constructor logs
    the minimum (``min_nodes``), and ``configure_train`` warns while fewer
    nodes are connected.
    Other keyword arguments go to Flower's ``FedAvg``.
    """

    def __init__(self, rule: str = "mean", f: int = 0, *, aggregate_on: str = "deltas",
                 weighted: Optional[bool] = None, clip_norm: Optional[float] = None, nnm: bool = False,
                 nonfinite: str = "raise", dp: Any = None, invalid: str = "raise", non_float: str = "raise",
                 rule_params: Optional[Dict[str, Any]] = None, min_train_nodes: Optional[int] = None,
                 min_available_nodes: Optional[int] = None, **fedavg_kwargs: Any) -> None:
        if not isinstance(rule, str):
            raise TypeError(f"rule must be a string, got {type(rule).__name__}")
        self.rule_params = dict(rule_params or {})
        _params(rule, f, None, None, None, self.rule_params)  # unknown rule, bad f or parameters raise here
        self.rule, self.f = rule, int(f)
        if aggregate_on not in ("deltas", "weights"):
            raise ValueError(f"aggregate_on must be 'deltas' or 'weights', got {aggregate_on!r}")
        if aggregate_on == "weights":
            for name, bad in (("clip_norm", clip_norm is not None), ("dp", dp is not None),
                              ("rule 'centered_clipping'", rule == "centered_clipping")):
                if bad:
                    raise ValueError(f"{name} acts on updates, not on model weights: use aggregate_on='deltas'")
        self.aggregate_on = aggregate_on
        takes_weights = RULES[rule].weights
        if weighted is None:
            weighted = takes_weights and dp is None
        elif weighted and not takes_weights:
            raise ValueError(f"rule {rule!r} does not take per-update weights; "
                             f"these do: {sorted(r for r, s in RULES.items() if s.weights)}")
        self.weighted = bool(weighted)
        if nonfinite not in ("raise", "exclude"):
            raise ValueError(f"nonfinite must be 'raise' or 'exclude', got {nonfinite!r}")
        if invalid not in ("raise", "drop"):
            raise ValueError(f"invalid must be 'raise' or 'drop', got {invalid!r}")
        if non_float not in ("raise", "keep"):
            raise ValueError(f"non_float must be 'raise' or 'keep', got {non_float!r}")
        if dp is not None and not (hasattr(dp, "release") and hasattr(dp, "clip_norm")):
            raise TypeError("dp must be a fedagg.privacy.CentralDP")
        if clip_norm is not None:
            clip_norm = _check_float(clip_norm, "clip_norm")
        if not isinstance(nnm, bool):
            raise TypeError("nnm must be True or False")
        _check_f_used(rule, self.f, nnm)  # the mean refuses an f it would ignore
        self.clip_norm, self.nnm, self.nonfinite, self.dp = clip_norm, nnm, nonfinite, dp
        self.invalid, self.non_float = invalid, non_float
        #: the fewest replies a round can be aggregated from: fedagg.RULES[rule].min_n(f)
        self.min_nodes = need = _min_n(rule, self.f)
        if min_train_nodes is None:
            min_train_nodes = max(2, need)  # Flower's FedAvg defaults to 2
        if min_available_nodes is None:
            min_available_nodes = max(2, need, min_train_nodes)
        if fedavg_kwargs.get("fraction_train", 1.0) != 0.0:
            for name, value in (("min_train_nodes", min_train_nodes), ("min_available_nodes", min_available_nodes)):
                if value < need:
                    raise ValueError(
                        f"{rule} with f = {self.f} needs at least {need} replies per round "
                        f"({RULES[rule].condition}); {name} = {value} is below that: a round must not start "
                        f"with fewer nodes (leave it unset for {max(2, need)}, or lower f)")
        super().__init__(min_train_nodes=min_train_nodes, min_available_nodes=min_available_nodes,
                         **fedavg_kwargs)
        if self.fraction_train != 0.0:
            log(INFO, "fedagg: %s with f = %d needs at least %d %s per round (%s): each round waits "
                "until %d nodes are connected (min_train_nodes = %d, min_available_nodes = %d)",
                rule, self.f, need, "reply" if need == 1 else "replies", RULES[rule].condition,
                self._nodes_to_wait_for(), self.min_train_nodes,
                self.min_available_nodes)
        self.global_arrays: Optional[ArrayRecord] = None
        self.layout: Optional[Layout] = None
        self._global_vec: Optional[np.ndarray] = None
        self._buffer: Optional[np.ndarray] = None
        self.last_report: Optional[RoundReport] = None

    # ------------------------------------------------------------ Flower hooks
    def _nodes_to_wait_for(self) -> int:
        """How many connected nodes Flower's FedAvg waits for before it samples a training round."""
        return max(self.min_available_nodes, self.min_train_nodes)

    def summary(self) -> None:
        log(INFO, "\t├──> fedagg: rule %s, f = %d, on %s%s%s%s", self.rule, self.f, self.aggregate_on,
            ", weighted" if self.weighted else "", f", clip_norm {self.clip_norm}" if self.clip_norm else "",
            ", central DP" if self.dp is not None else "")
        log(INFO, "\t│\t└──needs %s: at least %d replies per round; waits for %d connected nodes",
            RULES[self.rule].condition, self.min_nodes, self._nodes_to_wait_for())
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any
                        ) -> Iterable[Message]:
        """Remember the global model (the reference for the replies), then Flower's FedAvg."""
        self.set_global_arrays(arrays)
        if self.fraction_train != 0.0:
            wait_for = self._nodes_to_wait_for()
            try:
                connected = len(list(grid.get_node_ids()))
            except Exception:  # pragma: no cover - a Grid that cannot list its nodes: Flower's FedAvg will say
                connected = wait_for
            if connected < wait_for:
                log(WARNING, "fedagg: round %d: %d nodes connected; %s with f = %d needs at least %d replies "
                    "per round, so the round waits until %d nodes are connected (min_train_nodes = %d, "
                    "min_available_nodes = %d)", server_round, connected, self.rule, self.f, self.min_nodes,
                    wait_for, self.min_train_nodes, self.min_available_nodes)
        return super().configure_train(server_round, arrays, config, grid)

    def set_global_arrays(self, arrays: ArrayRecord) -> None:
        """Set the global model the next replies are checked (and, on deltas, differenced) against.

        ``configure_train`` calls it; call it yourself to use ``aggregate_train`` on its own.
        """
        layout = Layout.of(arrays, self.non_float)
        vec = arrays_to_vector(arrays, layout=layout)
        if not np.isfinite(vec).all():
            raise ValueError("the global model holds NaN or Inf")
        self.global_arrays, self.layout, self._global_vec = arrays, layout, vec

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Aggregate the replies' ArrayRecords with the fedagg rule; metrics say what it did."""
        if self.layout is None or self._global_vec is None:
            raise RuntimeError("no global model: configure_train sets it (or call set_global_arrays first)")
        layout, g = self.layout, self._global_vec
        # By node id: the aggregate does not depend on the order the replies arrived in.
        replies = sorted(replies, key=lambda m: int(m.metadata.src_node_id))
        report = RoundReport(server_round)
        self.last_report = report
        ok: List[Tuple[Message, Any, float]] = []  # (reply, views or Payload, weight)
        seen = set()
        for msg in replies:
            if msg.has_error():
                report.failures += 1
                continue
            node = int(msg.metadata.src_node_id)
            try:
                if node in seen:
                    raise _Invalid("a second reply from this node in one round")
                seen.add(node)
                source, weight = self._parse(msg, layout)
            except (_Invalid, ValueError, TypeError) as e:
                if self.invalid == "raise":
                    cls = TypeError if isinstance(e, TypeError) else ValueError
                    raise cls(f"round {server_round}: reply from node {node}: {e}") from None
                report.dropped[node] = str(e)
                log(WARNING, "fedagg: dropped the reply of node %d: %s", node, e)
                continue
            ok.append((msg, source, weight))
            report.node_ids.append(node)
            report.compressed.append(isinstance(source, Payload))
        n = len(ok)
        if report.failures:
            log(INFO, "fedagg: %d replies carried errors", report.failures)
        need = max(1, self.min_nodes)
        if n < need:
            text = (f"round {server_round}: {n} usable replies, {self.rule} with f = {self.f} needs "
                    f"at least {need}")
            if self.invalid == "raise" and n > 0:
                raise ValueError(text)
            # Nothing usable (every reply failed), or invalid="drop": skip the round as FedAvg does.
            log(WARNING, "fedagg: %s; round skipped, the global model is kept", text)
            return None, (self._metrics(report, []) if replies else None)

        rows = self._rows(n, layout.d)
        for i, (_, source, _) in enumerate(ok):
            if isinstance(source, Payload):
                compress.decode_into([source], out=rows[i:i + 1])
            else:
                layout.fill(source, rows[i], minus=g if self.aggregate_on == "deltas" else None)
        weights = np.array([w for _, _, w in ok], dtype=np.float64) if self.weighted else None
        try:
            out, info = _aggregate(rows, self.rule, self.f, weights=weights, nonfinite=self.nonfinite,
                                   clip_norm=self.clip_norm, nnm=self.nnm, dp=self.dp, return_info=True,
                                   **self.rule_params)
        except ValueError as e:
            raise ValueError(f"round {server_round}: {e} (update i is the reply of node "
                             f"node_ids[i], node_ids = {report.node_ids})") from e
        report.info = info
        out = np.asarray(out, dtype=np.float32)
        vector = g + out if self.aggregate_on == "deltas" else out
        arrays = vector_to_arrays(vector, layout, keep=self.global_arrays)
        return arrays, self._metrics(report, [m for m, _, _ in ok])

    # --------------------------------------------------------------- helpers
    def _parse(self, msg: Message, layout: Layout) -> Tuple[Any, float]:
        content = msg.content
        records = list(content.array_records.values())
        if len(records) != 1:
            raise _Invalid(f"expected exactly one ArrayRecord, got {len(records)}")
        weight = 1.0
        if self.weighted:
            metrics = list(content.metric_records.values())
            if len(metrics) != 1 or self.weighted_by_key not in metrics[0]:
                raise _Invalid(f"expected one MetricRecord holding {self.weighted_by_key!r} (the update's weight)")
            value = metrics[0][self.weighted_by_key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value >= 0):
                raise _Invalid(f"{self.weighted_by_key!r} must be a finite number >= 0, got {value!r}")
            weight = float(value)
        record = records[0]
        if is_payload(record):
            if self.aggregate_on != "deltas":
                raise _Invalid("a compressed update (fedagg payload) needs aggregate_on='deltas'")
            payload = arrays_to_payload(record)
            if payload.d != layout.d:
                raise _Invalid(f"the payload decodes to {payload.d} values, the model has {layout.d}")
            return payload, weight
        return layout.check(record, "ArrayRecord"), weight

    def _rows(self, n: int, d: int) -> np.ndarray:
        """An (n, d) float32 buffer, reused across rounds."""
        buf = self._buffer
        if buf is None or buf.shape[1] != d or buf.shape[0] < n:
            buf = self._buffer = np.empty((n, d), dtype=np.float32)
        return buf[:n]

    def _metrics(self, report: RoundReport, messages: List[Message]) -> MetricRecord:
        info = report.info
        contributing = list(range(len(messages)))
        if info is not None:
            if info.weights is not None:
                contributing = [int(i) for i in np.flatnonzero(np.asarray(info.weights) > 0)]
            elif info.selected is not None:
                contributing = sorted(int(i) for i in info.selected)
            else:
                contributing = sorted(set(contributing) - {int(i) for i in info.excluded})
        metrics = MetricRecord()
        chosen = [messages[i].content for i in contributing]
        if chosen and all(len(c.metric_records) == 1 and self.weighted_by_key in next(iter(
                c.metric_records.values())) for c in chosen):
            metrics = self.train_metrics_aggr_fn(chosen, self.weighted_by_key)
        metrics["fedagg-n"] = len(report.node_ids)
        metrics["fedagg-failures"] = report.failures
        metrics["fedagg-dropped-nodes"] = sorted(report.dropped)
        if info is not None:
            metrics["fedagg-excluded-nodes"] = report.nodes(info.excluded)
            if info.selected is not None:
                metrics["fedagg-selected-nodes"] = report.nodes(info.selected)
            metrics["fedagg-clipped"] = int(info.clipped)
            if info.privacy is not None:
                metrics["fedagg-epsilon"] = float(info.privacy.epsilon)
        return metrics
