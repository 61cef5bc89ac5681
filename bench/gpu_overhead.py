"""Where a GPU mean's time goes, step by step (run on a GPU machine):

    python bench/gpu_overhead.py --n 64 --d 16000000

Each line times one more piece of fedagg.aggregate(T, "mean") with CUDA events
(median of --repeat single calls, as bench/gpu_bench.py does), next to torch's
T.mean(0) with and without the finiteness check fedagg's contract includes.
"""

import argparse
import time

import numpy as np
import torch

import fedagg
from fedagg import _cuda, _gpu

from gpu_bench import cuda_time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--d", type=int, default=16_000_000)
    ap.add_argument("--repeat", type=int, default=20)
    a = ap.parse_args()
    n, d, r = a.n, a.d, a.repeat
    T = torch.randn(n, d, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    ops = _gpu.GpuOps(_gpu._TorchLib(T.device))
    coef = np.full(n, 1.0 / n)
    table, _, _ = ops._table(T)
    c = ops.lib.from_host(coef)
    torch.cuda.synchronize()
    out = torch.empty(d, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream

    flag = torch.zeros(1, dtype=torch.int32, device="cuda")

    def kernel(check: bool):
        _cuda.weighted_sum(table.data_ptr(), n, d, c.data_ptr(), out.data_ptr(), flag.data_ptr() if check else 0,
                           stream)
        return bool(flag.item()) if check else None

    def host_us(fn):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(r):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / r * 1e6

    steps = [
        ("torch T.mean(0)", lambda: T.mean(0)),
        ("torch T.mean(0) + isfinite().all()", lambda: bool(torch.isfinite(T.mean(0)).all())),
        ("fedagg kernel alone (table, coef uploaded once)", lambda: kernel(False)),
        ("fedagg kernel + reading its non-finite flag", lambda: kernel(True)),
        ("+ one upload of table, coef, flag (ops.weighted_sum)", lambda: ops.weighted_sum(T, coef)),
        ("fedagg.aggregate(T, 'mean')", lambda: fedagg.aggregate(T, "mean")),
    ]
    print(f"{torch.cuda.get_device_name()}: n={n} d={d}")
    print(f"{'step':55s} {'GPU-timed ms':>12s} {'host us/call':>13s}")
    for name, fn in steps:
        print(f"{name:55s} {cuda_time(fn, r) * 1e3:12.3f} {host_us(fn):13.0f}")


if __name__ == "__main__":
    main()
