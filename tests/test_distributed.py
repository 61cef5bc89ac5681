"""fedagg.distributed: every rule sharded over K = 1..4 gloo processes equals single-process fedagg.aggregate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

WORKER = Path(__file__).with_name("distributed_worker.py")


def run_group(size: int, tmp_path: Path, script: Path = WORKER, timeout: float = 600.0):
    """Start `size` ranks of `script` on a loopback gloo group; returns each rank's JSON report."""
    port = free_port()
    procs, outs = [], []
    for rank in range(size):
        out = tmp_path / f"rank{rank}.json"
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs.append(out)
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    reports = []
    for rank, (p, out, log) in enumerate(zip(procs, outs, logs)):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{log[-3000:]}"
        reports.append(json.loads(out.read_text()))
    return reports


@pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed")
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_every_rule_sharded_equals_single_process(size, tmp_path):
    reports = run_group(size, tmp_path)
    for rank, rep in enumerate(reports):
        assert rep["checks"] > 300, f"rank {rank} ran only {rep['checks']} checks"
        assert not rep["failures"], f"rank {rank}:\n" + "\n".join(rep["failures"][:20])


@pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed")
def test_a_group_of_one_in_this_process_gives_fedagg_aggregate_bit_for_bit():
    """The same path as tests/test_gpu.py's CUDA check, on host rows: a one-rank gloo group."""
    import numpy as np

    import fedagg
    import fedagg.distributed as fd

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        X = np.random.default_rng(0).standard_normal((11, 4099)).astype(np.float32)
        for rule, f in (("mean", 0), ("median", 0), ("trimmed_mean", 2), ("krum", 4), ("multi_krum", 4),
                        ("bulyan", 2), ("geometric_median", 0), ("centered_clipping", 0)):
            want, info_want = fedagg.aggregate(X, rule, f, return_info=True)
            got, info = fd.aggregate(X, rule, f, return_info=True)
            assert np.array_equal(got, want), rule  # one rank: the same sums in the same order
            assert (info.selected is None) == (info_want.selected is None)
            if info.selected is not None:
                assert np.array_equal(info.selected, info_want.selected), rule
        with pytest.raises(RuntimeError, match="not initialized"):
            dist.destroy_process_group()
            fd.aggregate(X, "mean")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
