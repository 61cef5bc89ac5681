"""fedagg demo: the attacks against plain references, the options, and the whole demo end to end
(chain node, server and participant processes on loopback) with its default options."""

import subprocess
import sys
from statistics import NormalDist

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("zmq")

from fedagg import demo  # noqa: E402
from fedagg.demo import task  # noqa: E402
from fedagg.demo.report import View  # noqa: E402


def test_attacks_match_their_definitions():
    rng = np.random.default_rng(0)
    honest = rng.standard_normal(50).astype(np.float32)
    np.testing.assert_array_equal(task.attack("none", honest, rng), honest)
    np.testing.assert_allclose(task.attack("signflip", honest, rng), -10.0 * honest.astype(np.float64), rtol=1e-6)
    noise = task.attack("noise", np.zeros(20000, np.float32), np.random.default_rng(1))
    assert abs(float(noise.std()) - 1.0) < 0.05 and noise.dtype == np.float32
    # ALIE (Baruch et al. 2019): n = 10, f = 3 -> s = 10 // 2 + 1 - 3 = 3, z = Phi^-1(7 / 10).
    est = [rng.standard_normal(50) for _ in range(4)]
    E = np.stack(est)
    z = NormalDist().inv_cdf(0.7)
    assert task.alie_z(10, 3) == pytest.approx(z)
    got = task.attack("alie", honest, rng, estimates=tuple(e.astype(np.float32) for e in est), n=10, f=3)
    np.testing.assert_allclose(got, E.mean(0) - z * E.std(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="estimates"):
        task.attack("alie", honest, rng, estimates=(honest,))
    with pytest.raises(ValueError, match="attack must be one of"):
        task.attack("bitflip", honest, rng)


def test_data_split_and_model_are_the_same_in_every_process():
    a, b = task.load(10, seed=3), task.load(10, seed=3)
    np.testing.assert_array_equal(a.test, b.test)
    train = np.concatenate(a.shards)
    assert len(set(train.tolist()) | set(a.test.tolist())) == len(a.X)  # a partition of the images
    assert not set(train.tolist()) & set(a.test.tolist())
    from fedagg.integrations.torch import ParameterVector

    assert torch.equal(ParameterVector(task.model(1)).get(), ParameterVector(task.model(1)).get())
    with pytest.raises(ValueError):
        task.load(0, seed=0)


@pytest.mark.parametrize("change, message", [
    (dict(participants=0), "participants"), (dict(byzantine=10), "byzantine"), (dict(attack="x"), "attack"),
    (dict(rule="x"), "rule"), (dict(codec="x"), "codec"), (dict(rounds=0), "rounds"), (dict(f=-1), "f must"),
    (dict(dp_noise=-1.0), "dp_noise"), (dict(dp_noise=0.01), "accountant"), (dict(attack="none"), "need an attack"), (dict(epochs=0), "epochs"),
    (dict(rule="mean", f=2), "the mean takes no f"),
    (dict(secure=True), "without the ledger"), (dict(secure=True, ledger=False, codec="topk"), "codec"),
    (dict(secure=True, ledger=False), "buckets"),  # multi_krum f = 3 over 3 buckets of 3
])
def test_options_are_checked(change, message):
    with pytest.raises(ValueError, match=message):
        demo.Options(**change).check()


class Recording(View):
    """A demo View that keeps its lines instead of printing them."""

    def __init__(self):
        super().__init__(quiet=True)  # no progress bar
        self.lines = []

    def _print(self, text):
        self.lines.append(text)


def test_default_demo_end_to_end(tmp_path):
    """The README's demo: the robust rule keeps its accuracy under attack, the mean collapses; every
    round of the robust run leaves out exactly the Byzantine participants; the ledger admitted all.
    Before round 0 it says what is starting: chain node, contract, server, participants, training."""
    png = tmp_path / "demo.png"
    opts = demo.Options(plot=str(png))
    view = Recording()
    robust, mean = demo.run(opts, view)
    text = "\n".join(view.lines)
    first_round = text.index("\n    0 ")
    for step in ("starting the chain node", "deploying the registry contract", "registry contract at 0x",
                 "starting the aggregation server (multi_krum, f = 3)", "starting 10 participant processes",
                 "all 10 participants registered", "training: round 0 starts"):
        assert -1 < text.find(step) < first_round, step
    assert text.count("chain s   ") == 1  # the legend, once
    byz = {f"p{i}*" for i in demo.byzantine_indices(opts)}
    assert len(byz) == opts.byzantine
    assert [r.round for r in robust.rows] == list(range(opts.rounds))
    assert robust.rows[-1].accuracy >= 0.85, [r.accuracy for r in robust.rows]
    assert mean.rows[-1].accuracy <= 0.3, [r.accuracy for r in mean.rows]
    for r in robust.rows:
        assert set(r.excluded) == byz and not r.refused, r
        assert r.bytes_in > 0 and r.ledger_seconds > 0
    assert robust.gas.get("open_round") and robust.gas.get("record_round")  # the aggregator's transactions
    for res in (robust, mean):  # the demo audits its own rounds from the chain and the bundles it wrote
        assert res.audit == {"ok": True, "rounds": opts.rounds, "problems": []}, res.audit
    assert text.count("rounds (chain + bundles in") == 2 and "passed" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_finished_demo_can_be_audited_with_the_command_line(tmp_path):
    """--bundles and --keep-chain: after the run the chain stays up and the demo prints the `fedagg audit`
    command; it passes, and fails naming the participant once one bit of its update is flipped."""
    import json
    import queue
    import signal
    import threading

    bundles = tmp_path / "bundles"
    p = subprocess.Popen([sys.executable, "-m", "fedagg", "demo", "--participants", "5", "--byzantine", "1",
                          "--attack", "noise", "--rule", "median", "--rounds", "2", "--no-compare", "--plot", "",
                          "--bundles", str(bundles), "--keep-chain"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    try:
        lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in p.stdout], daemon=True).start()
        command, seen = None, []
        while command is None:
            try:
                line = lines.get(timeout=240)
            except queue.Empty:
                break
            seen.append(line)
            if line.startswith("audit median: fedagg audit "):
                command = line.split(": ", 1)[1].split()
        assert command is not None, "".join(seen)
        assert "audit of its 2 rounds" in "".join(seen) and "passed" in "".join(seen)
        audit = [sys.executable, "-m", *command]
        ok = subprocess.run(audit, capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0 and json.loads(ok.stdout)["ok"], ok.stdout + ok.stderr
        folder = sorted((bundles / "median").glob("*-00000001"))[0]
        update = sorted((folder / "updates").iterdir())[0]
        data = bytearray(update.read_bytes())
        data[7] ^= 0x10
        update.write_bytes(bytes(data))
        bad = subprocess.run(audit, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 1
        problems = json.loads(bad.stdout)["rounds"][1]["problems"]
        assert any(update.stem in x for x in problems), problems
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
        p.stdout.close()


def test_cli_demo_without_ledger_runs_and_prints_rounds(tmp_path):
    png = tmp_path / "d.png"
    out = subprocess.run([sys.executable, "-m", "fedagg", "demo", "--participants", "5", "--byzantine", "1",
                          "--attack", "noise", "--rule", "median", "--rounds", "2", "--codec", "uniform8",
                          "--no-ledger", "--no-compare", "--plot", str(png)],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert [int(ln.split()[0]) for ln in lines] == [0, 1], out.stdout
    assert "median (f=1): final accuracy" in out.stdout and png.exists()
    # piped, not a terminal: it still says what it is starting, before round 0
    before = out.stdout[:out.stdout.index(lines[0])]
    for step in ("starting the aggregation server (median, f = 1)", "starting 5 participant processes",
                 "training: round 0 starts"):
        assert step in before, out.stdout
    assert "chain s   the server's time in chain calls" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "fedagg", "demo", "--attack", "none"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "need an attack" in bad.stderr


def _rows(rounds):
    from fedagg.demo import RoundRow

    return [RoundRow(round=r, accuracy=0.5 + r / 100, excluded=["p1*"] if r else [], refused={}, epsilon=None,
                     bytes_in=2048, seconds=1.5, ledger_seconds=2.5) for r in rounds]


def test_view_says_what_starts_and_explains_its_columns(capsys):
    view = View()  # pytest's captured stdout is no terminal: plain lines
    for run in ("multi_krum (f=3)", "mean (f=0)"):
        view.start_run(run, 2)
        view.step("starting the chain node")
        for row in _rows(range(2)):
            view.row(row)
        view.end_run()
    out = capsys.readouterr().out.splitlines()
    assert out[2].endswith("] starting the chain node") and out[3] == View.HEADER  # the header after the steps
    assert out[4].split()[:2] == ["0", "50.0%"]
    legend = [i for i, line in enumerate(out) if line.startswith("  chain s ")]
    assert len(legend) == 1 and legend[0] < out.index("mean (f=0)")  # once, under the first table
    text = " ".join(" ".join(out).split())
    for column in ("round", "accuracy", "excluded", "refused", "eps", "KiB in", "s", "chain s"):
        assert f" {column} " in text
    assert "can exceed s" in text


def test_plot_numbers_rounds_as_the_table():
    from fedagg.demo import RunResult
    from fedagg.demo.report import figure

    runs = [RunResult("multi_krum", 3, rows=_rows(range(15))), RunResult("mean", 0, rows=_rows(range(15)))]
    fig = figure(runs, demo.Options())
    for line in fig.axes[0].get_lines():
        assert list(line.get_xdata()) == list(range(15))  # the table's 0-14, not 1-15


def _children() -> list:
    """Live child processes of this one (Linux /proc)."""
    import os

    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                kids.append(int(d))
    return kids


def test_node_process_exits_when_its_parent_closes_the_pipe():
    p = subprocess.Popen([sys.executable, "-m", "fedagg.ledger.node", "--accounts", "1", "--until-stdin-closes"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().startswith(b"http://127.0.0.1:")
        p.stdin.close()  # what the OS does when the parent dies
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
        p.stdout.close()


def test_a_failing_run_leaves_no_server_thread_and_no_process():
    import threading

    from fedagg.demo.runner import run_one

    def boom(row):
        raise KeyError("the caller's callback failed")

    before = set(_children())
    opts = demo.Options(participants=5, byzantine=1, attack="noise", rounds=3, ledger=False, compare=False)
    with pytest.raises(KeyError, match="callback"):
        run_one(opts, "median", 1, boom)
    assert not [t for t in threading.enumerate() if t.name == "fedagg-demo-server"]
    assert set(_children()) <= before


def test_secure_demo_end_to_end():
    """fedagg demo --secure: SecAgg+ buckets of 3, the median over the 3 bucket means with f = 1; the
    server receives only masked ring vectors (4 bytes per padded coordinate from each participant),
    epsilon grows with the rounds, and the model learns."""
    from fedagg.integrations.torch import ParameterVector
    from fedagg.demo import task
    from fedagg.secure.ddg import Encoding

    view = Recording()
    opts = demo.Options(participants=9, byzantine=1, attack="signflip", rule="median", rounds=4, ledger=False,
                        compare=False, secure=True, dp_noise=0.5, plot=None)
    (res,) = demo.run(opts, view)
    d = ParameterVector(task.model(0)).get().numel()
    ring = 4 * Encoding(clip=1.0, sigma=0.0, gamma=1.0, n=1, d=d).padded
    assert [r.bytes_in for r in res.rows] == [9 * ring] * 4
    eps = [r.epsilon for r in res.rows]
    assert all(np.isfinite(eps)) and eps == sorted(eps) and eps[0] < eps[-1]
    assert res.rows[-1].accuracy > 0.2  # from 10% (chance) at the start
    assert any("secure: SecAgg+ buckets of 3" in line for line in view.lines)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_demo_exact_robust_and_attacked():
    """fedagg demo --task lora at a small size: the attackers' flipped adapters hurt the exact mean,
    Multi-Krum leaves them out every round and stays with the unattacked runs; perplexity falls."""
    pytest.importorskip("peft")
    from fedagg.demo.lora import LoraOptions, entropy_rate, run_lora

    opts = LoraOptions(participants=6, byzantine=1, rule="multi_krum", rounds=3, steps=8)
    runs, floor = run_lora(opts)
    by = {r.label: r for r in runs}
    assert list(by) == ["factors, mean", "exact, mean", "exact, mean, attacked", "exact, multi_krum f=1, attacked"]
    for r in runs:
        assert len(r.perplexity) == 3 and all(1.0 < p < 10 * opts.vocab for p in r.perplexity)
    clean, attacked, robust = by["exact, mean"], by["exact, mean, attacked"], by["exact, multi_krum f=1, attacked"]
    assert clean.perplexity[-1] < clean.perplexity[0] < opts.vocab  # it learns from a uniform guess
    assert all(ex == [5] for ex in robust.excluded)  # the last participant is the attacker
    assert attacked.perplexity[-1] > 1.2 * robust.perplexity[-1]
    assert robust.perplexity[-1] < 1.1 * clean.perplexity[-1]
    assert all(0.0 <= x < 1.0 for x in clean.discarded) and by["factors, mean"].discarded == [0.0] * 3
    assert 1.0 <= floor < clean.perplexity[-1]
    P = np.full((4, 4), 0.25)  # a uniform chain: entropy ln 4
    assert entropy_rate(P) == pytest.approx(np.log(4))


@pytest.mark.parametrize("change, message", [(dict(participants=1), "participants"), (dict(byzantine=8), "byzantine"),
                                             (dict(rule="krum", byzantine=3), "needs at least"),
                                             (dict(steps=0), "steps"), (dict(lr=0.0), "lr")])
def test_lora_demo_options_are_checked(change, message):
    from fedagg.demo.lora import LoraOptions

    with pytest.raises(ValueError, match=message):
        LoraOptions(**change).check()


def test_cli_lora_demo():
    pytest.importorskip("peft")
    out = subprocess.run([sys.executable, "-m", "fedagg", "demo", "--task", "lora", "--participants", "6",
                          "--byzantine", "1", "--rounds", "1", "--lora-rank", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("final perplexity") == 4 and "rank 2 on 7 projections" in out.stdout
    assert "excluded p5" in out.stdout  # Multi-Krum's view of the attacker
