"""GPU benchmark: every fedagg rule on CUDA tensors against torch idioms on the same device.

    python3 bench/gpu_bench.py --n 64 --d 16000000 --json out.json

Times with CUDA events (warm-up, then the median of --repeat runs); reports seconds,
GB/s of input read, that rate as a fraction of the measured device-to-device copy
bandwidth (bytes read + written over time), the ratio to one read pass (torch.sum),
and fedagg's speed-up over the torch idiom. Answers are checked against fedagg's.
"""

import argparse
import json
import statistics

import numpy as np
import torch

import fedagg


def cuda_time(fn, repeat, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def krum_scores(G, f):
    sq = torch.diagonal(G)
    D = (sq[:, None] + sq[None, :] - 2 * G).clamp_min(0)
    D.fill_diagonal_(float("inf"))
    return torch.sort(D, dim=1).values[:, : G.shape[0] - f - 2].sum(1)


def torch_weiszfeld(T, iters, nu=1e-6):
    z = T.mean(0)
    for _ in range(iters):
        w = 1.0 / torch.linalg.vector_norm(T - z, dim=1).clamp_min(nu)
        z = (w[:, None] * T).sum(0) / w.sum()
    return z


def torch_cc(T, tau, center):
    diff = T - center
    norms = torch.linalg.vector_norm(diff, dim=1, keepdim=True)
    return center + (diff * torch.clamp(tau / norms, max=1.0)).mean(0)


def codec_rows(d, repeat, n=8):
    """Mean of n compressed payloads into a device tensor (payload bytes uploaded and decoded
    by fedagg's kernels) against decoding on the host and uploading the mean."""
    from fedagg import compress

    like = torch.empty(0, device="cuda")
    x = np.random.default_rng(0).standard_normal(d).astype(np.float32)
    out = []
    for codec in (compress.Uniform(8), compress.TopK(ratio=0.01), compress.Rotation(1)):
        ps = [codec.encode(x, seed=i) if codec.name != "topk" else codec.encode(x) for i in range(n)]
        wire = sum(sum(b.nbytes for b in p.buffers.values()) for p in ps)
        try:
            t = cuda_time(lambda: compress.mean(ps, like=like), max(3, repeat // 3), warmup=1)
            th = cuda_time(lambda: torch.from_numpy(compress.mean(ps)).cuda(), 3, warmup=1)
        except Exception as e:  # noqa: BLE001 - the error is the finding
            out.append({"rule": f"compress.mean {codec.name}", "impl": "fedagg", "error": f"{type(e).__name__}: {e}"})
            continue
        out.append({"rule": f"compress.mean {codec.name}", "impl": "fedagg", "seconds": t, "gbps": wire / t / 1e9,
                    "of_copy_bw": float("nan"), "x_read_pass": float("nan"), "speedup": th / t,
                    "note": f"n={n} payloads, {wire / 1e9:.2f} GB on the wire; speedup vs host mean + upload"})
    return out


def noise_rows(d, repeat, copy_bw):
    """Philox Gaussian noise into a device tensor against torch.randn on the same device."""
    from fedagg import privacy

    like = torch.empty(0, device="cuda")
    out = torch.empty(d, device="cuda")
    try:
        t = cuda_time(lambda: privacy.gaussian(d, 1.0, seed=1, like=like), repeat)
        host = privacy.gaussian(min(d, 1 << 20), 1.0, seed=1)
        same = bool(np.array_equal(privacy.gaussian(min(d, 1 << 20), 1.0, seed=1, like=like).cpu().numpy(), host))
    except Exception as e:  # noqa: BLE001 - the error is the finding
        return [{"rule": "gaussian noise", "impl": "fedagg", "error": f"{type(e).__name__}: {e}"}]
    tt = cuda_time(lambda: torch.randn(d, out=out), repeat)
    return [{"rule": "gaussian noise", "impl": "fedagg", "seconds": t, "gbps": 4 * d / t / 1e9,
             "of_copy_bw": 4 * d / t / copy_bw, "x_read_pass": float("nan"), "agrees": same,
             "note": "agrees = bit-identical to the CPU stream"},
            {"rule": "gaussian noise", "impl": "torch", "seconds": tt, "gbps": 4 * d / tt / 1e9,
             "of_copy_bw": 4 * d / tt / copy_bw, "x_read_pass": float("nan"), "speedup": tt / t}]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--d", type=int, default=16_000_000)
    ap.add_argument("--f", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    n, d, f = args.n, args.d, args.f
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    T = torch.randn((n, d), device=dev, generator=g)
    T[n - f:] += 4.0  # shifted attackers
    nbytes = T.numel() * 4

    src = torch.randn(nbytes // 4, device=dev, generator=g)
    dst = torch.empty_like(src)
    t_copy = cuda_time(lambda: dst.copy_(src), args.repeat)
    copy_bw = 2 * nbytes / t_copy
    del src, dst
    t_read = cuda_time(lambda: T.sum(), args.repeat)

    rows = []
    tau, center = 100.0, torch.zeros(d, device=dev)
    try:
        gm_iters = fedagg.geometric_median(T, return_info=True)[1].iterations
    except Exception:  # reported in the geometric_median row below
        gm_iters = 10

    def multi_krum_torch():
        s = krum_scores(T @ T.T, f)
        return T[torch.argsort(s, stable=True)[: n - f]].mean(0)

    idioms = {
        "mean": lambda: T.mean(0),
        "median": lambda: torch.median(T, 0).values,  # the lower middle value for even n
        "trimmed_mean": lambda: torch.sort(T, 0).values[f: n - f].mean(0),
        "krum": lambda: T[int(torch.argmin(krum_scores(T @ T.T, f)))],
        "multi_krum": multi_krum_torch,
        "bulyan": None,
        "geometric_median": lambda: torch_weiszfeld(T, gm_iters),
        "centered_clipping": lambda: torch_cc(T, tau, center),
    }
    for rule in fedagg.RULES:
        rf = 0 if rule in ("mean", "geometric_median", "centered_clipping") else f
        try:
            ours = fedagg.aggregate(T, rule, rf)
            t = cuda_time(lambda: fedagg.aggregate(T, rule, rf), args.repeat)
        except Exception as e:  # keep measuring the other rules; the error is the finding
            rows.append({"rule": rule, "impl": "fedagg", "error": f"{type(e).__name__}: {e}"})
            continue
        row = {"rule": rule, "impl": "fedagg", "seconds": t, "gbps": nbytes / t / 1e9,
               "of_copy_bw": nbytes / t / copy_bw, "x_read_pass": t / t_read}
        rows.append(row)
        fn = idioms[rule]
        if fn is None:
            continue
        try:
            ref = fn()
            tt = cuda_time(fn, max(3, args.repeat // 3), warmup=1)
            agree = (None if rule == "median" and n % 2 == 0  # torch: lower middle; fedagg: mean of the two
                     else bool(torch.allclose(ours.float(), ref.float(), rtol=1e-3, atol=1e-3)))
            rows.append({"rule": rule, "impl": "torch", "seconds": tt, "gbps": nbytes / tt / 1e9,
                         "of_copy_bw": nbytes / tt / copy_bw, "x_read_pass": tt / t_read,
                         "speedup": tt / t, "agrees": agree})
        except (torch.OutOfMemoryError, RuntimeError) as e:  # e.g. size limits of an idiom
            rows.append({"rule": rule, "impl": "torch", "error": f"{type(e).__name__}: {e}"})
        torch.cuda.empty_cache()

    del T
    torch.cuda.empty_cache()
    rows += codec_rows(d, args.repeat)
    rows += noise_rows(d, args.repeat, copy_bw)

    result = {"device": torch.cuda.get_device_name(), "n": n, "d": d, "f": f,
              "input_gb": nbytes / 1e9, "copy_bw_gbps": copy_bw / 1e9, "read_pass_s": t_read,
              "rows": rows, "fedagg": fedagg.backends()}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    print(f"{result['device']}: n={n} d={d} input {nbytes / 1e9:.2f} GB; copy {copy_bw / 1e9:.0f} GB/s "
          f"(read+write); read pass {t_read * 1e3:.3f} ms")
    print(f"{'rule':18s} {'impl':7s} {'ms':>9s} {'GB/s':>8s} {'%copy':>6s} {'x read':>7s} {'speedup':>8s} agrees")
    for r in rows:
        if "error" in r:
            print(f"{r['rule']:18s} {r['impl']:7s} {r['error'][:60]}")
            continue
        print(f"{r['rule']:18s} {r['impl']:7s} {r['seconds'] * 1e3:9.3f} {r['gbps']:8.0f} "
              f"{100 * r['of_copy_bw']:5.0f}% {r['x_read_pass']:7.2f} "
              f"{r.get('speedup', float('nan')):8.1f} {r.get('agrees', '')}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
