"""The `fedagg` command line: `fedagg info`, `fedagg bench` (small sizes only)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fedagg
from fedagg import cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "fedagg"  # the console script, where installed


def fedagg_cmd(*args, script=False):
    cmd = [str(SCRIPT)] if script and SCRIPT.exists() else [sys.executable, "-m", "fedagg.cli"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "COLUMNS": "160"})


@pytest.fixture(scope="module")
def bench_json():
    """All rules and alternatives on 7 x 5000 updates, f = 1 (so that every rule runs)."""
    p = fedagg_cmd("bench", "--n", 7, "--d", 5000, "--f", 1, "--repeat", 1, "--json", "-",
                   "--bandwidth-gb", 0.01)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), p.stderr


def test_bench_json_structure(bench_json):
    res, _ = bench_json
    assert (res["n"], res["d"], res["f"], res["repeat"]) == (7, 5000, 1, 1)
    assert res["input_bytes"] == 7 * 5000 * 4
    assert {"cpu", "cores", "isa", "threads"} <= set(res["machine"])
    assert res["machine"]["isa"] == fedagg.backends()["cpu"]["isa"]
    assert res["read_pass"]["seconds"] > 0 and res["read_pass"]["numpy"] > 0
    assert res["bandwidth"]["gbps"] > 0
    keys = {"rule", "impl", "seconds", "times", "gbps", "x_read", "speedup", "agrees",
            "same_definition", "skipped", "note"}
    for r in res["results"]:
        assert set(r) == keys
        if r["seconds"] is not None:
            assert r["gbps"] == pytest.approx(res["input_bytes"] / r["seconds"] / 1e9)
            assert r["x_read"] == pytest.approx(r["seconds"] / res["read_pass"]["seconds"])
    assert [r["rule"] for r in res["results"] if r["impl"] == "fedagg"] == list(fedagg.RULES)


def test_bench_fedagg_agrees_with_numpy(bench_json):
    res, _ = bench_json
    rows = {(r["rule"], r["impl"]): r for r in res["results"]}
    for rule in fedagg.RULES:
        fed, ref = rows[(rule, "fedagg")], rows[(rule, "numpy")]
        assert fed["seconds"] > 0 and fed["speedup"] == pytest.approx(1.0)
        assert ref["agrees"] is True, (rule, ref["note"])
        assert ref["speedup"] == pytest.approx(ref["seconds"] / fed["seconds"])
    # torch where installed: same definitions (n = 7 is odd, so torch.median is comparable)
    for (rule, impl), r in rows.items():
        if impl == "torch":
            assert r["agrees"] is True, (rule, r["note"])


def test_bench_prints_table_on_stderr_with_json_stdout(bench_json):
    _, err = bench_json
    assert "read pass" in err and "copy bandwidth" in err and "memory: input" in err
    for rule in fedagg.RULES:
        assert rule in err


def test_bench_default_f_reports_rules_it_cannot_run(tmp_path):
    # The default f = 4 is too large for n = 7 except for the mean: those rows say why.
    out = tmp_path / "res.json"
    p = fedagg_cmd("bench", "--n", 7, "--d", 5000, "--repeat", 1, "--json", out, "--no-compare",
                   "--bandwidth-gb", 0, script=True)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    rows = {r["rule"]: r for r in res["results"]}
    assert {r["impl"] for r in res["results"]} == {"fedagg"}
    assert rows["mean"]["seconds"] > 0
    assert rows["krum"]["skipped"] and "needs" in rows["krum"]["note"]
    assert res["bandwidth"] is None
    assert "rule" in p.stdout and str(out) in p.stdout


def test_info():
    p = fedagg_cmd("info")
    assert p.returncode == 0, p.stderr
    assert f"fedagg {fedagg.__version__}" in p.stdout
    body = json.loads(p.stdout.split("\n", 1)[1])
    assert body["cpu"]["isa"] == fedagg.backends()["cpu"]["isa"]


@pytest.mark.parametrize("argv, message", [
    ([], "required"),
    (["bench", "--n", "0"], "--n: must be >= 1"),
    (["bench", "--d", "0"], "--d: must be >= 1"),
    (["bench", "--d", "ten"], "--d: expected an integer"),
    (["bench", "--f", "-1"], "--f: must be >= 0"),
    (["bench", "--repeat", "0"], "--repeat: must be >= 1"),
    (["bench", "--threads", "-2"], "--threads: must be >= 0"),
    (["bench", "--rules", "krum", "nope"], "invalid choice: 'nope'"),
    (["bench", "--max-seconds", "0"], "--max-seconds: must be > 0"),
    (["bench", "--bandwidth-gb", "nan"], "--bandwidth-gb: must be >= 0"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_nonzero(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code != 0
    assert message in capsys.readouterr().err


def test_bad_arguments_from_the_shell():
    p = fedagg_cmd("bench", "--n", "-3")
    assert p.returncode == 2 and "must be >= 1" in p.stderr and p.stdout == ""


def test_plain_table_is_aligned(bench_json):
    res, _ = bench_json
    rows, notes = cli.table_rows(res)
    text = cli.plain_table(rows).splitlines()
    assert text[0].split()[:3] == ["rule", "impl", "time"]
    assert len(text) == len(res["results"]) + 2
    starts = {line.index(" " + rule) for line in text[2:] for rule in ["fedagg", "numpy"] if " " + rule in line}
    assert len(starts) == 1  # the impl column starts at the same place on every line
    assert all(isinstance(n, str) and n for n in notes)


def test_header_lines(bench_json):
    res, _ = bench_json
    lines = cli.header(res)
    assert lines[0].startswith("machine: ") and res["machine"]["isa"] in lines[0]
    assert "n = 7, d = 5,000" in lines[1] and "GB" in lines[1]
    assert lines[2].startswith("read pass: ") and lines[3].startswith("copy bandwidth: ")


def test_bench_without_rich_prints_plain_lines(monkeypatch, capsys):
    monkeypatch.setattr(cli, "rich", None)
    assert cli.main(["bench", "--n", "5", "--d", "300", "--f", "1", "--repeat", "1", "--no-compare",
                     "--bandwidth-gb", "0", "--rules", "median", "krum"]) == 0
    out, err = capsys.readouterr()
    assert "[0/4] copy bandwidth" in err and "krum / fedagg" in err
    lines = out.splitlines()
    assert lines[0].startswith("machine: ")
    table = lines[lines.index(next(l for l in lines if l.startswith("rule"))):]
    assert [l.split()[:2] for l in table[2:4]] == [["median", "fedagg"], ["krum", "fedagg"]]
