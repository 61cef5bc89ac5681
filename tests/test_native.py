"""The CPU kernels as a standalone program (tests/native/kernel_check.cpp) against float64 references:
built here for every x86 instruction set this CPU runs, and cross-built for aarch64 and run under
qemu-user, so the ARM build (its 16-byte vector kernels compile to NEON) is checked on every commit.

The aarch64 case needs `aarch64-linux-gnu-g++` and `qemu-aarch64` (Debian: g++-aarch64-linux-gnu,
qemu-user; `.ci/run` installs them). Without them it skips, unless FEDAGG_REQUIRE_AARCH64=1 (set
by CI) makes that a failure.
"""

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "csrc"
CHECK = Path(__file__).resolve().parent / "native" / "kernel_check.cpp"
COMMON = ["-std=gnu++17", "-O2", "-pthread", "-Wno-psabi", f"-I{SRC / 'include'}"]
# The per-file options of CMakeLists.txt: the x86 kernel files' instruction sets, and no FMA
# contraction in ops.cpp (its fold must round like the GPU's).
X86 = {"simd/kernels_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
       "simd/kernels_avx512.cpp": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-mf16c",
                                   "-mprefer-vector-width=512"]}


def build(cxx, out, *, x86, static=False, timeout=600):
    """Compile the kernels, their drivers and the check program with `cxx` into `out`/check."""
    sources = {"simd/kernels_base.cpp": [], "ops.cpp": ["-ffp-contract=off"], "dispatch.cpp": [],
               "threadpool.cpp": [], "checksum.cpp": [], "secagg.cpp": []}
    defs = []
    if x86:
        sources.update(X86)
        defs = ["-DFEDAGG_X86_DISPATCH"]
    objs = []
    for i, (name, flags) in enumerate(sources.items()):
        obj = out / f"{i}.o"
        subprocess.run([cxx, *COMMON, *defs, *flags, "-c", str(SRC / name), "-o", str(obj)], check=True,
                       timeout=timeout, capture_output=True)
        objs.append(str(obj))
    exe = out / "check"
    subprocess.run([cxx, *COMMON, *defs, *(["-static"] if static else []), str(CHECK), *objs, "-o", str(exe)],
                   check=True, timeout=timeout, capture_output=True)
    return exe


def _passes(result):
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and lines and lines[-1].startswith("ok "), result.stdout[-2000:] + result.stderr
    return lines


def test_the_kernels_of_every_instruction_set_of_this_cpu(tmp_path):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    x86 = platform.machine() in ("x86_64", "AMD64")
    exe = build(cxx, tmp_path, x86=x86)
    lines = _passes(subprocess.run([str(exe)], capture_output=True, text=True, timeout=600))
    assert "base (3 threads): ok" in lines
    if x86:
        from fedagg import _core

        assert f"{_core.isa()} (3 threads): ok" in lines  # the best table this CPU runs was among them


def test_the_aarch64_build_under_qemu(tmp_path):
    cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if cxx is None or qemu is None:
        if os.environ.get("FEDAGG_REQUIRE_AARCH64") == "1":
            pytest.fail("the aarch64 cross compiler or qemu-aarch64 is missing (apt-get install g++-aarch64-linux-gnu "
                        "qemu-user)")
        pytest.skip("no aarch64 cross compiler or qemu-aarch64")
    exe = build(cxx, tmp_path, x86=False, static=True)
    assert exe.read_bytes()[18:20] == (183).to_bytes(2, "little")  # ELF e_machine: EM_AARCH64
    lines = _passes(subprocess.run([qemu, str(exe)], capture_output=True, text=True, timeout=600))
    assert lines[:2] == ["base (1 threads): ok", "base (3 threads): ok"]
