"""The `fedagg` command line: help, version, errors, `fedagg info`, `fedagg bench` (small sizes only)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fedagg
from fedagg import benchmark, cli

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
    assert res["f_by_rule"] == {rule: 0 if rule == "mean" else 1 for rule in fedagg.RULES}
    assert res["input_bytes"] == 7 * 5000 * 4
    assert {"cpu", "cores", "isa", "threads"} <= set(res["machine"])
    assert res["machine"]["isa"] == fedagg.backends()["cpu"]["isa"]
    assert res["read_pass"]["seconds"] > 0 and res["read_pass"]["numpy"] > 0
    assert res["bandwidth"]["gbps"] > 0
    keys = {"rule", "f", "impl", "seconds", "times", "gbps", "x_read", "speedup", "agrees",
            "same_definition", "skipped", "note"}
    for r in res["results"]:
        assert set(r) == keys
        assert r["f"] == (None if r["rule"] == "mean" else 1)  # the mean takes no f
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


def test_bench_default_f_is_per_rule_and_every_rule_runs(tmp_path):
    # n = 16: the largest f <= 4 each rule allows; Bulyan (n >= 4f + 3) runs with f = 3, not skipped at f = 4.
    out = tmp_path / "res.json"
    p = fedagg_cmd("bench", "--n", 16, "--d", 3000, "--repeat", 1, "--json", out, "--no-compare",
                   "--bandwidth-gb", 0, "--sections", "rules", script=True)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert res["f"] is None and res["byzantine"] == 4
    assert res["f_by_rule"] == {"mean": 0, "median": 4, "trimmed_mean": 4, "krum": 4, "multi_krum": 4,
                                "bulyan": 3, "geometric_median": 4, "centered_clipping": 4}
    rows = {r["rule"]: r for r in res["results"]}
    assert {r["impl"] for r in res["results"]} == {"fedagg"}
    for rule, r in rows.items():
        assert r["seconds"] > 0 and not r["skipped"], (rule, r["note"])
    assert rows["bulyan"]["f"] == 3 and rows["mean"]["f"] is None
    assert res["bandwidth"] is None
    assert "f = per rule" in p.stdout and str(out) in p.stdout
    table = p.stdout[p.stdout.index("rule"):]
    assert any(line.split()[1:4] == ["bulyan", "│", "3"] or line.split()[:2] == ["bulyan", "3"]
               for line in table.splitlines())


def test_bench_explicit_f_is_used_as_given_and_a_rule_that_cannot_run_says_why(tmp_path):
    out = tmp_path / "res.json"
    p = fedagg_cmd("bench", "--n", 7, "--d", 2000, "--f", 4, "--repeat", 1, "--json", out, "--no-compare",
                   "--bandwidth-gb", 0, "--sections", "rules")
    assert p.returncode == 0, p.stderr
    rows = {r["rule"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["mean"]["seconds"] > 0 and rows["mean"]["f"] is None  # the mean takes no f: not refused
    assert rows["krum"]["skipped"] and rows["krum"]["f"] == 4 and "needs n > 2f + 2" in rows["krum"]["note"]
    assert rows["bulyan"]["skipped"] and "n >= 4f + 3" in rows["bulyan"]["note"]


def test_default_f():
    assert [benchmark.default_f(r, 16) for r in fedagg.RULES] == [0, 4, 4, 4, 4, 3, 4, 4]
    assert [benchmark.default_f(r, 7) for r in fedagg.RULES] == [0, 3, 3, 2, 2, 1, 3, 3]
    assert benchmark.default_f("krum", 2) == 0  # nothing fits: the row then says what krum needs
    assert benchmark.default_f("median", 100, max_f=2) == 2


def test_bench_prints_the_copy_bandwidth_once_and_sections_as_tables(monkeypatch, capsys):
    for plain in (False, True):
        if plain:
            monkeypatch.setattr(cli, "rich", None)
        assert cli.main(["bench", "--n", "3", "--d", "20000", "--repeat", "1", "--bandwidth-gb", "0.01",
                         "--sections", "compression", "privacy"]) == 0
        out = capsys.readouterr().out
        assert out.count("GB/s") >= 3 and out.count("copy bandwidth") == 1, out
        assert "np.copyto" in out.splitlines()[0]
        for title, case in (("compression:", "top-k encode"), ("privacy:", "Gaussian noise (float32)")):
            lines = out[out.index(title):].splitlines()
            head = lines[1] if plain else lines[2]  # rich: a border line above the column names
            assert [w for w in head.replace("┃", " ").split()][:3] == ["case", "impl", "time"], head
            assert any(case in line for line in lines[2:6]), lines[:6]
            if plain:
                assert set(lines[2]) <= {"-", " "}  # the rules table's style: names, dashes, rows
            else:
                assert lines[1].startswith("┏") and any(line.startswith("└") for line in lines)


def test_bench_server_section_reports_receive_close_and_state_dir_overhead():
    pytest.importorskip("zmq")
    p = fedagg_cmd("bench", "--sections", "server", "--transport-n", 3, "--transport-d", 50_000,
                   "--bandwidth-gb", 0, "--json", "-")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)["server"]
    assert res["devices"][0] == "cpu" and res["n"] == 3 and res["d"] == 50_000
    cases = {(r["case"], r["impl"]) for r in res["rows"]}
    for rule in ("mean", "median", "trimmed_mean", "krum"):
        assert {(f"{rule} on cpu", "receive (first -> last byte)"), (f"{rule} on cpu", "last byte -> new model")} <= cases
    assert ("mean on cpu", "with a state_dir") in cases
    mean = next(r for r in res["rows"] if r["case"] == "mean on cpu" and r["impl"].startswith("receive"))
    assert mean["agrees"] is True  # the served mean against the float64 mean of the seeds
    assert all(x["accepted"] == 3 and x["receive_seconds"] > 0 and x["close_seconds"] > 0 for x in res["raw"])


def test_bench_distributed_section_reports_weak_and_strong_scaling():
    pytest.importorskip("torch")
    p = fedagg_cmd("bench", "--sections", "distributed", "--n", 7, "--shard-d", 30_000, "--shards", 1, 2,
                   "--repeat", 1, "--bandwidth-gb", 0, "--json", "-")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)["distributed"]
    assert res["shards"] == [1, 2] and res["d_total"] == 60_000
    got = {(r["rule"], r["scaling"], r["K"], r["impl"]) for r in res["rows"]}
    for rule in fedagg.RULES:
        for scaling in ("weak", "strong"):
            assert {(rule, scaling, 1, "fedagg.distributed"), (rule, scaling, 2, "fedagg.distributed")} <= got
        assert (rule, "strong", 1, "fedagg.aggregate (1 process)") in got
    for r in res["rows"]:
        assert r["seconds"] > 0 and 0 <= r["collective"] <= 1 and r["peak_bytes"] > r["input_bytes"] > 0
        assert r["d_shard"] == (30_000 if r["scaling"] == "weak" or r["K"] == 2 else 60_000)
        assert r["input_bytes"] == 4 * 7 * r["d_shard"]


def test_info():
    p = fedagg_cmd("info")
    assert p.returncode == 0, p.stderr
    assert f"fedagg {fedagg.__version__}" in p.stdout
    body = json.loads(p.stdout.split("\n", 1)[1])
    assert body["cpu"]["isa"] == fedagg.backends()["cpu"]["isa"]


@pytest.mark.parametrize("argv, message", [
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
    (["serve", "--d", "4", "--rule", "average"], "argument --rule: invalid choice: 'average' (choose from 'mean'"),
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
    assert text[0].split()[:4] == ["rule", "f", "impl", "time"]
    assert len(text) == len(res["results"]) + 2
    starts = {line.index(" " + rule) for line in text[2:] for rule in ["fedagg", "numpy"] if " " + rule in line}
    assert len(starts) == 1  # the impl column starts at the same place on every line
    assert all(isinstance(n, str) and n for n in notes)


def test_header_lines(bench_json):
    res, _ = bench_json
    lines = cli.header(res)
    assert lines[0].startswith("machine: ") and res["machine"]["isa"] in lines[0]
    assert "n = 7, d = 5,000, f = 1" in lines[1] and "GB" in lines[1]
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
    assert [l.split()[:3] for l in table[2:4]] == [["median", "1", "fedagg"], ["krum", "1", "fedagg"]]


# ------------------------------------------------------------------ help, version, errors


def test_version():
    p = fedagg_cmd("--version", script=True)
    assert p.returncode == 0 and p.stdout.strip() == f"fedagg {fedagg.__version__}", p


def test_bare_fedagg_prints_the_help():
    p = fedagg_cmd(script=True)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert p.stdout.startswith("usage: fedagg") and "COMMAND --help" in p.stdout
    for command in ("info", "bench", "serve", "join", "keys", "audit", "demo"):
        assert command in p.stdout


def _subparsers(parser, prefix=()):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,), sub
                yield from _subparsers(sub, prefix + (name,))


def test_every_command_has_a_description_and_every_option_its_default():
    import argparse

    commands = dict(_subparsers(cli._parser()))
    assert {("serve",), ("join",), ("bench",), ("demo",), ("keys", "generate")} <= set(commands)
    for name, parser in commands.items():
        assert parser.description, name
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, (name, action.dest)  # e.g. join --behaviour had none
            flags = action.option_strings
            if not flags or action.required or isinstance(action, (argparse._StoreTrueAction,
                                                                   argparse._StoreFalseAction,
                                                                   argparse._AppendAction)):
                continue
            if any(g.required and action in g._group_actions for g in parser._mutually_exclusive_groups):
                continue  # one of a required group (serve --d | --model)
            shown = formatter._expand_help(action)  # the option's help as --help prints it
            assert "default" in shown, (name, flags, shown)


def test_join_help_describes_every_behaviour():
    p = fedagg_cmd("join", "--help")
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    assert text.count("synthetic participant") >= 1
    for behaviour, what in (("honest", "target - model"), ("signflip", "-10 x"), ("noise", "N(0, 100^2)"),
                            ("nan", "NaN"), ("wrongsize", "d + 1"), ("die", "half")):
        assert f"{behaviour}: " in text and what in text, behaviour
    assert "(default honest)" in text and "(default 30)" in text


def test_serve_help_lists_rules_and_defaults():
    text = " ".join(fedagg_cmd("serve", "--help").stdout.split())
    assert "SIGTERM" in text
    text = text[text.index("options:"):]
    assert ", ".join(fedagg.RULES) in text
    for option, default in (("--f F", "(default 0"), ("--quorum QUORUM", "(default 1)"),
                            ("--linger SECONDS", "(default: 30 with --rounds)"),
                            ("--rounds ROUNDS", "(default: run until stopped)")):
        assert default in text[text.index(option):text.index(option) + 300], option


def test_transport_behaviours_are_the_participants():
    pytest.importorskip("zmq")
    from fedagg.transport.participant import BEHAVIOURS

    join = dict(_subparsers(cli._parser()))[("join",)]
    assert next(a for a in join._actions if a.dest == "behaviour").choices == list(BEHAVIOURS)


def test_user_errors_are_one_line_without_traceback(tmp_path):
    pytest.importorskip("zmq")
    for argv, message in ((["join", "--connect", "tcp//nowhere", "--id", "a", "--timeout", "1"], "tcp//nowhere"),
                          (["serve", "--model", tmp_path / "missing.npy"], "missing.npy"),
                          (["serve", "--d", "4", "--f", "1"], "the mean takes no f")):
        p = fedagg_cmd(*argv)
        assert p.returncode == 2, (argv, p.stderr)
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert p.stderr.startswith(f"fedagg {argv[0]}: error: ") and message in p.stderr, p.stderr
