"""LoRA section of ``fedagg bench``: the time to aggregate a 7B-shaped set of adapters (rank r on
every attention and MLP projection of a Llama-2-7B layout: q, k, v, o 4096 x 4096; gate, up
4096 -> 11008; down 11008 -> 4096; 32 layers: 39,976,960 parameters per participant at r = 16)
from n participants, float32 NumPy inputs, in the same run:

* NumPy: each factor averaged on its own (``np.mean`` over the participants): what FedIT and
  OpenFedLLM do, and the baseline of the issue's goal;
* LoraAggregator "factors" (the same, with its validation and the rule machinery);
* LoraAggregator "stacked" (FLoRA: exact at rank n r, no factorization);
* LoraAggregator "exact" (the products' mean re-factored to rank r);
* with a device (``--lora-device cuda``): torch's mean of each factor there, and "exact" computed
  there (LoraAggregator's torch backend), the inputs float32 tensors on the device.

``layers`` cuts the model to its first layers (the time is per layer, times 32).

>>> from fedagg.lora import bench
>>> r = bench.run(n=3, layers=1, rank=2, hidden=64, intermediate=96)
>>> [row["impl"] for row in r["rows"]]
['NumPy mean of each factor', 'LoraAggregator factors', 'LoraAggregator stacked', 'LoraAggregator exact']
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import numpy as np

from .aggregator import LoraAggregator

PROJECTIONS = (("self_attn.q_proj", "h", "h"), ("self_attn.k_proj", "h", "h"), ("self_attn.v_proj", "h", "h"),
               ("self_attn.o_proj", "h", "h"), ("mlp.gate_proj", "h", "i"), ("mlp.up_proj", "h", "i"),
               ("mlp.down_proj", "i", "h"))


def adapters(n: int, layers: int, rank: int, hidden: int, intermediate: int, seed: int = 0) -> List[Dict[str, Any]]:
    """n participants' adapters of the Llama layout (float32, small random values)."""
    size = {"h": hidden, "i": intermediate}
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        u = {}
        for layer in range(layers):
            for proj, din, dout in PROJECTIONS:
                name = f"base_model.model.model.layers.{layer}.{proj}"
                u[name + ".lora_A.weight"] = rng.standard_normal((rank, size[din]), dtype=np.float32) * 0.01
                u[name + ".lora_B.weight"] = rng.standard_normal((size[dout], rank), dtype=np.float32) * 0.01
        out.append(u)
    return out


def run(n: int = 32, layers: int = 32, rank: int = 16, hidden: int = 4096, intermediate: int = 11008,
        seed: int = 0, device: Optional[str] = None) -> Dict[str, Any]:
    """The rows of the module doc; with `device` (e.g. "cuda"), two more on the adapters as float32
    torch tensors there: torch's mean of each factor, and LoraAggregator "exact" computing on the
    device (its torch backend)."""
    ups = adapters(n, layers, rank, hidden, intermediate, seed)
    params = sum(v.size for v in ups[0].values())
    rows = []

    def timed(impl: str, fn) -> Any:
        t0 = time.perf_counter()
        res = fn()
        rows.append({"impl": impl, "seconds": time.perf_counter() - t0})
        return res

    timed("NumPy mean of each factor", lambda: {k: np.mean([u[k] for u in ups], axis=0) for k in ups[0]})
    timed("LoraAggregator factors", lambda: LoraAggregator("factors", "mean").aggregate(ups))
    timed("LoraAggregator stacked", lambda: LoraAggregator("stacked", "mean").aggregate(ups))
    res = timed("LoraAggregator exact", lambda: LoraAggregator("exact", "mean", rank=rank).aggregate(ups))
    if device is not None:
        import torch

        dev = torch.device(device)
        tups = [{k: torch.from_numpy(v).to(dev) for k, v in u.items()} for u in ups]

        def synced(fn):
            def call():
                out = fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                return out
            return call
        synced(lambda: LoraAggregator("exact", "mean", rank=rank, device=dev).aggregate(tups[:2]))()  # warm-up
        timed(f"torch mean of each factor ({dev})",
              synced(lambda: {k: torch.stack([u[k] for u in tups]).mean(0) for k in tups[0]}))
        timed(f"LoraAggregator exact ({dev})",
              synced(lambda: LoraAggregator("exact", "mean", rank=rank, device=dev).aggregate(tups)))
        del tups
    base = rows[0]["seconds"]
    for r in rows:
        r["vs_numpy_factors"] = r["seconds"] / base
    return {"n": n, "layers": layers, "rank": rank, "params_per_participant": params,
            "bytes_in": n * params * 4, "rows": rows, "device": device,
            "discarded_mean": float(np.mean(list(res.discarded.values())))}


def lines(res: Dict[str, Any]) -> List[str]:
    out = [f"lora: {res['n']} participants x {res['params_per_participant']:,} LoRA parameters (Llama-7B layout, "
           f"{res['layers']} of 32 layers, rank {res['rank']}), float32 in",
           f"{'impl':34s} {'seconds':>9s} {'x NumPy factors':>16s}"]
    for r in res["rows"]:
        out.append(f"{r['impl']:34s} {r['seconds']:9.3f} {r['vs_numpy_factors']:16.1f}")
    return out
