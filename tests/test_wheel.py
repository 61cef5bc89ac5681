"""The release artifacts, as another machine gets them (docs/release.md).

FEDAGG_WHEEL is the repaired wheel .ci/run built (wheelhouse/fedagg-...-manylinux_*.whl) and
FEDAGG_SDIST the sdist it was built from. The wheel goes into a fresh venv with pip, with no
compiler and no CUDA toolkit on PATH, and is used from outside the source tree. Without the
variables the tests skip, except where CI is set (CI=true): there they fail, so they cannot
silently vanish from CI.
"""

import ctypes
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPILERS = ("cc", "gcc", "g++", "c++", "clang", "clang++", "nvcc", "ld")
# Variables that could point a child at a toolkit, a compiler or the source tree.
DROPPED_ENV = ("LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV",
               "CUDA_HOME", "CUDA_PATH", "CUDA_ROOT", "CUDAToolkit_ROOT", "CUDACXX", "CC", "CXX", "CPATH",
               "LIBRARY_PATH")


def artifact(var: str, what: str) -> Path:
    path = os.environ.get(var)
    if not path:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"{var} is not set: CI must test the {what} it built (.ci/run sets it)")
        pytest.skip(f"{var} is not set (the path of the built {what}; .ci/run sets it)")
    path = Path(path).resolve()
    assert path.is_file(), f"{var}={path} does not exist"
    return path


def dt_needed(elf: bytes) -> list:
    """The DT_NEEDED entries of a 64-bit little-endian ELF shared object."""
    assert elf[:4] == b"\x7fELF" and elf[4] == 2 and elf[5] == 1, "not a 64-bit little-endian ELF file"
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
    # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, ...
    sections = [struct.unpack_from("<IIQQQQI", elf, shoff + i * shentsize) for i in range(shnum)]
    needed = []
    for _, kind, _, _, offset, size, link in sections:
        if kind != 6:  # SHT_DYNAMIC
            continue
        strtab = sections[link][4]
        for at in range(offset, offset + size, 16):
            tag, value = struct.unpack_from("<qQ", elf, at)
            if tag == 0:  # DT_NULL
                break
            if tag == 1:  # DT_NEEDED
                start = strtab + value
                needed.append(elf[start:elf.index(b"\0", start)].decode())
    return needed


def have_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


SMOKE = r"""
import json, os, shutil, sys
import numpy as np
import fedagg

rng = np.random.default_rng(20261206)
X = rng.standard_normal((9, 4097)).astype(np.float32)
X[3] *= 1000.0  # one outlier row: the median ignores it, the mean does not
X64 = X.astype(np.float64)
mean = fedagg.aggregate(X, rule="mean")
median = fedagg.aggregate(X, rule="median")
np.testing.assert_allclose(mean, X64.mean(axis=0), rtol=1e-6, atol=1e-6)
np.testing.assert_array_equal(median, np.median(X64, axis=0).astype(np.float32))  # odd n: an element
assert mean.dtype == median.dtype == np.float32 and mean.shape == median.shape == (4097,)

from fedagg import _cuda  # the CUDA backend imports without a CUDA toolkit
devices = _cuda.device_count()  # starts the statically linked CUDA runtime
with open("/proc/self/maps") as f:
    mapped = sorted({line.split()[-1] for line in f if ".so" in line})
print(json.dumps({
    "file": fedagg.__file__, "prefix": sys.prefix, "path": sys.path, "PATH": os.environ["PATH"],
    "which": {tool: shutil.which(tool) for tool in %r},
    "backends": fedagg.backends(), "devices": devices, "mapped": mapped,
}))
""" % (COMPILERS,)


def test_wheel_is_manylinux_and_needs_no_cuda_toolkit():
    wheel = artifact("FEDAGG_WHEEL", "wheel")
    tags = wheel.name[:-len(".whl")].split("-")[-1].split(".")
    assert all(re.fullmatch(r"manylinux(1|2010|2014|_\d+_\d+)_x86_64", t) for t in tags), \
        f"{wheel.name} is not manylinux-tagged (auditwheel repair, docs/release.md)"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/WHEEL"))
        wheel_tags = re.findall(r"^Tag: (.+)$", z.read(meta).decode(), re.M)
        assert wheel_tags and all(re.search(r"-manylinux", t) for t in wheel_tags), wheel_tags
        cuda = [n for n in names if re.fullmatch(r"fedagg/_cuda\..*\.so", n)]
        assert cuda, "the wheel has no CUDA backend (fedagg/_cuda*.so): build it with FEDAGG_CUDA=ON"
        for so in [n for n in names if n.endswith(".so") or ".so." in n]:
            needed = dt_needed(z.read(so))
            toolkit = [lib for lib in needed if lib.startswith(("libcudart", "libcuda.", "libcublas", "libnv"))]
            # libcudart is linked statically; libcuda.so.1 (the driver) is opened when first used.
            assert not toolkit, f"{so} needs {toolkit} at load time"


def test_wheel_installs_and_runs_without_compilers(tmp_path):
    wheel = artifact("FEDAGG_WHEEL", "wheel")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, symlinks=True, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    bin_dir = tmp_path / "bin"  # the only directory on PATH: the venv's python, nothing else
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(python)
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    env.update(PATH=str(bin_dir), PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1")
    work = tmp_path / "work"  # neither the repo nor its python/ on sys.path
    work.mkdir()

    def run(*args, timeout):
        # Started by its path in the venv (a symlink elsewhere would not find the venv's pyvenv.cfg).
        res = subprocess.run([str(python), *args], cwd=work, env=env, capture_output=True, text=True,
                             timeout=timeout)
        assert res.returncode == 0, f"python {' '.join(args[:3])}... failed:\n{res.stdout}\n{res.stderr}"
        return res.stdout

    # Binary wheels only: nothing may need building here. numpy comes in as fedagg's dependency.
    run("-I", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--only-binary=:all:",
        str(wheel), timeout=240)
    out = json.loads(run("-I", "-c", SMOKE, timeout=120).splitlines()[-1])

    assert out["which"] == {tool: None for tool in COMPILERS}, out["which"]
    assert out["PATH"] == str(bin_dir)
    prefix = Path(out["prefix"]).resolve()
    assert prefix == env_dir.resolve()
    assert Path(out["file"]).resolve().is_relative_to(prefix), f"imported {out['file']}, not the installed copy"
    assert not any(str(ROOT) in p for p in out["path"] if p), out["path"]
    assert not [lib for lib in out["mapped"] if "libcudart" in lib], out["mapped"]

    cpu, cuda = out["backends"]["cpu"], out["backends"]["cuda"]
    assert cpu["compiled"] and cpu["usable"], cpu
    assert cuda["compiled"] is True, cuda
    assert cuda["toolkit"] and cuda["architectures"], cuda
    assert cuda["devices"] == out["devices"]
    if cuda["usable"]:  # a machine with a GPU and its driver
        assert cuda["devices"] > 0 and cuda["reason"] is None, cuda
    else:
        assert cuda["devices"] == 0 and isinstance(cuda["reason"], str) and cuda["reason"], cuda
    if not have_driver():  # this reference machine: no NVIDIA driver at all
        assert not cuda["usable"]
        assert cuda["reason"].startswith("no NVIDIA driver (libcuda.so.1) found"), cuda["reason"]


# What the build needs from the source tree: all of it must be in the sdist.
SOURCES = {"csrc": (".cpp", ".hpp", ".h"), "cuda": (".cu", ".cuh", ".cpp", ".hpp", ".h"),
           "python/fedagg": (".py", ".pyi", ".vy", ".typed")}


def test_sdist_has_the_sources_and_nothing_local():
    sdist = artifact("FEDAGG_SDIST", "sdist")
    with tarfile.open(sdist) as t:
        members = t.getnames()
        top = members[0].split("/")[0]
        assert re.fullmatch(r"fedagg-\d+(\.\d+)*", top), top
        files = {m[len(top) + 1:] for m in members if m.startswith(top + "/")}
        pkg_info = t.extractfile(f"{top}/PKG-INFO").read().decode()
    for name in ("pyproject.toml", "CMakeLists.txt", "README.md", "PKG-INFO"):
        assert name in files, f"{name} is missing from {sdist.name}"
    assert re.search(r"^License(-Expression)?: Apache-2\.0", pkg_info, re.M), "no license in PKG-INFO"
    missing = []
    for folder, suffixes in SOURCES.items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in suffixes and "__pycache__" not in path.parts:
                if path.relative_to(ROOT).as_posix() not in files:
                    missing.append(path.relative_to(ROOT).as_posix())
    assert not missing, f"not in {sdist.name}: {missing}"
    local = [f for f in files if re.match(r"(build|dist|wheelhouse|\.venv[^/]*|\.git|\.ci|\.whl)/", f)
             or "node_modules/" in f or f.endswith((".so", ".pyc"))]
    assert not local, f"local files in {sdist.name}: {sorted(local)[:20]}"
