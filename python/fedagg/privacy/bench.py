"""Privacy section of ``fedagg bench``: Gaussian noise for a d-vector against
NumPy's and torch's generators, and the discrete Gaussian's throughput, same run.
(``fedagg bench`` measures the copy bandwidth, what GB/s compares against, once for all sections.)

>>> from fedagg.privacy import bench
>>> r = bench.run(d=100_000, repeat=1)
>>> sorted({row["case"] for row in r["rows"]})
['Gaussian noise (float32)', 'discrete Gaussian (int64)', 'epsilon, one PLD round']
"""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from .._benchutil import add_speedups, median_time, optional_torch, table
from . import accounting
from .noise import discrete_gaussian, gaussian


def run(d: int = 10_000_000, repeat: int = 5, sigma2: float = 1.0e6) -> Dict[str, Any]:
    rows: List[Dict[str, Any]] = []
    nbytes = 4 * d

    def add(case, impl, seconds, work_bytes, note=""):
        rows.append({"case": case, "impl": impl, "seconds": seconds,
                     "gbps": None if work_bytes is None else work_bytes / seconds / 1e9, "agrees": None, "note": note})

    out = np.empty(d, dtype=np.float32)
    from .. import _core

    add("Gaussian noise (float32)", "fedagg Philox4x32-10",
        median_time(lambda: _core.gaussian_noise(out, 1.0, 1, 0, False), repeat), nbytes,
        f"{d / median_time(lambda: _core.gaussian_noise(out, 1.0, 1, 0, False), 1) / 1e6:.0f} M normals/s")
    rng = np.random.default_rng(0)
    add("Gaussian noise (float32)", "numpy standard_normal",
        median_time(lambda: rng.standard_normal(d, dtype=np.float32, out=out), repeat), nbytes, "PCG64, ziggurat")
    torch = optional_torch()
    if torch is not None:
        t = torch.empty(d)
        add("Gaussian noise (float32)", "torch.randn",
            median_time(lambda: torch.randn(d, out=t), repeat), nbytes, f"{torch.get_num_threads()} threads")
    dg_d = min(d, 1_000_000)
    add("discrete Gaussian (int64)", "fedagg exact (CKS 2020)",
        median_time(lambda: discrete_gaussian(dg_d, sigma2, seed=1), max(1, repeat // 2)), 8 * dg_d,
        f"sigma^2 = {sigma2:g}, {dg_d:,} samples")
    dg_s = rows[-1]["seconds"]
    rows[-1]["note"] += f", {dg_d / dg_s / 1e6:.1f} M samples/s"
    try:
        import dp_accounting  # noqa: F401 - the "privacy" extra
    except ImportError:
        pass  # the accountant's row needs it; the noise rows do not
    else:
        add("epsilon, one PLD round", "fedagg (dp-accounting)",
            median_time(lambda: accounting.epsilon(1.1, 0.01, 1000, 1e-5), 1), None, "z = 1.1, q = 0.01, 1000 rounds")
    add_speedups(rows)
    return {"d": d, "repeat": repeat, "rows": rows}


def lines(res: Dict[str, Any]) -> List[str]:
    return table(f"privacy: d = {res['d']:,}, median of {res['repeat']}", res["rows"])
