"""The ``fedagg`` command: ``info``, ``bench``, ``serve``, ``join``, ``keys``, ``audit`` and ``demo``.

Uses rich for the progress bar and the table when it is installed, plain text otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional

import fedagg

try:  # optional: pip install fedagg[cli]
    import rich  # noqa: F401
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table
except ImportError:  # pragma: no cover - exercised where rich is missing
    rich = None

COLUMNS = ["rule", "f", "impl", "time", "GB/s", "x read pass", "fedagg speed-up", "agrees", "note"]
SECTION_COLUMNS = ["case", "impl", "time", "GB/s", "fedagg speed-up", "agrees", "note"]
DEFAULT_MAX_F = 4  # fedagg bench without --f: per rule, the largest f up to this that n allows


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def _float_at_least(low: float, strict: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value > low if strict else value >= low) or value != value:
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}, got {text}")
        return value
    return parse


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it says it already (or there is none to say)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" not in text and action.option_strings and action.default not in (None, False, [])
                and action.default is not argparse.SUPPRESS and not action.required):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose subcommands (fedagg serve, fedagg keys generate, ...) share the help formatter."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fedagg", description="Fast, robust aggregation for federated learning: benchmark the "
                                           "rules, run an aggregation server and participants, audit rounds on "
                                           "chain, or watch a federated training under attack (fedagg demo).",
                epilog="fedagg COMMAND --help describes a command and its options.")
    p.add_argument("--version", action="version", version=f"fedagg {fedagg.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.add_parser("info", help="print the compiled and usable backends",
                   description="Print fedagg's version and, as JSON, the compiled and usable backends "
                               "(CPU instruction set, threads, CUDA devices).").set_defaults(func=_info)

    b = sub.add_parser("bench", help="time every rule against NumPy, torch, Flower and ByzFL",
                       description="Time fedagg's rules and the alternatives on the same n x d float32 "
                                   "updates; each timing is a warm-up then the median of --repeat calls. "
                                   "GB/s is the input's bytes over the time; compare it with the copy "
                                   "bandwidth measured once at the start (--bandwidth-gb).")
    b.add_argument("--n", type=_int_at_least(1), default=64, help="updates (default 64)")
    b.add_argument("--d", type=_int_at_least(1), default=10_000_000, help="coordinates (default 10,000,000)")
    b.add_argument("--f", type=_int_at_least(0), default=None,
                   help=f"Byzantine updates each rule tolerates (default: per rule, the largest f <= "
                        f"{DEFAULT_MAX_F} the rule allows at --n; the mean takes none). An explicit --f "
                        "is used as given: a rule that cannot run with it says why")
    b.add_argument("--rules", nargs="+", choices=list(fedagg.RULES), metavar="RULE",
                   help=f"rules to run (default: all of {', '.join(fedagg.RULES)})")
    b.add_argument("--repeat", type=_int_at_least(1), default=3, help="timed calls per case (default 3)")
    b.add_argument("--seed", type=_int_at_least(0), default=0, help="data seed (default 0)")
    b.add_argument("--threads", type=_int_at_least(0), default=None,
                   help="threads for fedagg and torch (0: all cores; default: as configured)")
    b.add_argument("--isa", default=None, help="run fedagg's CPU kernels with this instruction set (e.g. avx2 on "
                                                "an AVX-512 machine; `fedagg info` lists them; default: the best)")
    b.add_argument("--json", metavar="PATH", default=None,
                   help="write all results as JSON ('-': stdout; default: none)")
    b.add_argument("--no-compare", dest="compare", action="store_false",
                   help="time fedagg only (default: also NumPy, torch, Flower, ByzFL where installed)")
    b.add_argument("--max-seconds", type=_float_at_least(0, True), default=60.0,
                   help="skip an alternative estimated to take longer per call (default 60)")
    b.add_argument("--bandwidth-gb", type=_float_at_least(0, False), default=1.0,
                   help="size of the arrays of the copy-bandwidth test (default 1; 0 skips it)")
    b.add_argument("--sections", nargs="+",
                   choices=["rules", "compression", "privacy", "transport", "server", "distributed", "secagg",
                            "lora", "crossdevice", "half"],
                   default=["rules", "compression", "privacy"],
                   help="what to benchmark (default: rules compression privacy; transport and server need "
                        "pyzmq, distributed needs torch, secagg needs cryptography and compares with Flower's "
                        "SecAgg+ where flwr[simulation] is installed; lora times a 7B-shaped adapter set; crossdevice runs "
                        "thousands of simulated devices against fedagg serve, buffered and synchronous; half "
                        "times the rules on a float16/bfloat16 batch read in place, with torch)")
    b.add_argument("--half-dtype", choices=["bfloat16", "float16"], default="bfloat16",
                   help="half section: the batch's element type (default bfloat16)")
    b.add_argument("--crossdevice-n", type=_int_at_least(1), default=10_000,
                   help="crossdevice section: simulated devices (default 10,000)")
    b.add_argument("--crossdevice-seconds", type=_float_at_least(0, True), default=30.0,
                   help="crossdevice section: seconds measured per case, after the devices' arrival (default 30)")
    b.add_argument("--lora-layers", type=_int_at_least(1), default=32,
                   help="lora section: layers of the Llama-7B layout (default 32, all; about 5 GB of adapters for "
                        "32 participants)")
    b.add_argument("--lora-device", default=None,
                   help="lora section: also time torch's factor mean and LoraAggregator 'exact' on this torch device "
                        "(e.g. cuda), the adapters held there (default: none, the host's rows only)")
    b.add_argument("--transport-mb", type=_float_at_least(0, True), default=400.0,
                   help="transport section: size of the single update in MB (default 400)")
    b.add_argument("--transport-n", type=_int_at_least(1), default=16,
                   help="transport and server sections: participants in the round (default 16; d from "
                        "--transport-d)")
    b.add_argument("--transport-d", type=_int_at_least(1), default=25_000_000,
                   help="transport and server sections: parameters per participant in the round "
                        "(default 25,000,000)")
    b.add_argument("--secagg-n", nargs="+", type=_int_at_least(2), default=[16, 64], metavar="N",
                   help="secagg section: participants per round (default 16 64)")
    b.add_argument("--secagg-d", nargs="+", type=_int_at_least(1), default=[100_000, 1_000_000], metavar="D",
                   help="secagg section: coordinates per update (default 100,000 1,000,000)")
    b.add_argument("--shards", nargs="+", type=_int_at_least(1), default=[1, 2], metavar="K",
                   help="distributed section: shard counts, each run as K gloo processes here (default 1 2)")
    b.add_argument("--shard-d", type=_int_at_least(1), default=2_000_000,
                   help="distributed section: coordinates per shard for weak scaling; strong scaling splits "
                        "this times the largest K (default 2,000,000)")
    b.add_argument("--topk-ratio", type=_float_at_least(0, True), default=0.01,
                   help="compression section: k / d of the top-k codec (default 0.01)")
    b.set_defaults(func=_bench)

    from .demo.cli import add_commands as add_demo
    from .ledger.cli import add_commands as add_ledger
    from .transport.cli import add_commands

    add_commands(sub, _int_at_least, _float_at_least)
    add_ledger(sub, _int_at_least)
    add_demo(sub, _int_at_least, _float_at_least)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--"]:  # torchrun ... -m fedagg -- serve ...: the "--" keeps torchrun off fedagg's options
        argv = argv[1:]
    args = parser.parse_args(argv)
    args.argv = [str(a) for a in argv]  # as given (fedagg serve --shards passes them on)
    if args.command is None:  # bare `fedagg`: what it can do
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        parser.exit(130, f"fedagg {args.command}: interrupted\n")
    except ImportError as e:
        parser.exit(2, f"fedagg {args.command}: {e.name or e} is missing (pip install 'fedagg[server]' for "
                       "serve/join/keys, 'fedagg[ledger]' for audit, 'fedagg[privacy]' for accounting, 'fedagg[demo]' "
                       "and torch for demo)\n")
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        parser.exit(2, f"fedagg {args.command}: error: {e}\n")
    except Exception as e:  # pyzmq's errors (a bad endpoint) are user errors too, and not OSErrors
        if not type(e).__module__.startswith("zmq"):
            raise
        parser.exit(2, f"fedagg {args.command}: error: {e}\n")


def _info(args) -> int:
    print(f"fedagg {fedagg.__version__}")
    print(json.dumps(fedagg.backends(), indent=2))
    return 0


# ------------------------------------------------------------------ bench


def _out(stream):
    if not rich:
        return None
    console = Console(file=stream, highlight=False)
    if not console.is_terminal:  # rich's default of 80 columns squeezes the table
        console = Console(file=stream, highlight=False, width=max(console.width, 120))
    return console


def _print(console, text: str, stream) -> None:
    if console is not None:
        console.print(text, markup=False, soft_wrap=True)  # never re-wrap table lines
    else:
        print(text, file=stream, flush=True)


def _gb(x: float) -> str:
    return f"{x / 1e9:.3g} GB"


def _bench(args) -> int:
    from . import benchmark

    report = sys.stderr if args.json == "-" else sys.stdout  # stdout carries only JSON then
    con, err = _out(report), _out(sys.stderr)
    if args.isa:
        from . import _core

        try:
            _core._force_isa(args.isa)
        except ValueError as e:
            raise SystemExit(f"fedagg bench: --isa {args.isa}: {e}") from None
    if args.topk_ratio > 1:
        raise SystemExit("fedagg bench: --topk-ratio must be in (0, 1]")
    res: Dict[str, Any] = {}
    if "rules" in args.sections:
        res = _bench_rules(args, benchmark, con, err, report)  # the copy bandwidth is in its header
    else:  # measured once, printed once: the GB/s of every table compare against it
        _print(err, "measuring the copy bandwidth", sys.stderr)
        res["bandwidth"] = (benchmark.measure_bandwidth(args.bandwidth_gb, args.repeat)
                            if args.bandwidth_gb > 0 else None)
        _print(con, bandwidth_line(res["bandwidth"]), report)
    if "compression" in args.sections:
        from .compress import bench as cbench

        res["compression"] = cbench.run(d=args.d, ratio=args.topk_ratio, n=min(args.n, 16),
                                        repeat=args.repeat, seed=args.seed)
        print_section(con, cbench.lines(res["compression"])[0], res["compression"]["rows"], report)
    if "privacy" in args.sections:
        from .privacy import bench as pbench

        res["privacy"] = pbench.run(d=args.d, repeat=args.repeat)
        print_section(con, pbench.lines(res["privacy"])[0], res["privacy"]["rows"], report)
    if "transport" in args.sections:
        from .transport import bench as tbench

        res["transport"] = tbench.run(mb=args.transport_mb, n=args.transport_n, d=args.transport_d,
                                      rule="mean", repeat=args.repeat)
        print_section(con, tbench.lines(res["transport"])[0], res["transport"]["rows"], report)
    if "server" in args.sections:
        from .transport import bench as tbench

        res["server"] = tbench.run_server(n=args.transport_n, d=args.transport_d, seed=args.seed)
        print_section(con, tbench.server_lines(res["server"])[0], res["server"]["rows"], report)
    if "distributed" in args.sections:
        from .distributed import bench as dbench

        res["distributed"] = dbench.run(n=args.n, d_shard=args.shard_d, d_total=args.shard_d * max(args.shards),
                                        shards=args.shards, rules=args.rules, repeat=args.repeat,
                                        threads=args.threads or 1, seed=args.seed)
        for line in dbench.lines(res["distributed"]):
            _print(con, line, report)
    if "secagg" in args.sections:
        from .secure import bench as sbench

        res["secagg"] = sbench.run(ns=args.secagg_n, ds=args.secagg_d, flower=args.compare)
        for line in sbench.lines(res["secagg"]):
            _print(con, line, report)
    if "lora" in args.sections:
        from .lora import bench as lbench

        res["lora"] = lbench.run(n=32, layers=args.lora_layers, seed=args.seed, device=args.lora_device)
        for line in lbench.lines(res["lora"]):
            _print(con, line, report)
    if "half" in args.sections:
        res["half"] = benchmark.run_half(n=args.n, d=args.d, dtype=args.half_dtype, repeat=args.repeat,
                                         seed=args.seed, rules=args.rules, max_seconds=args.max_seconds)
        for line in benchmark.half_lines(res["half"]):
            _print(con, line, report)
    if "crossdevice" in args.sections:
        from .transport import crossdevice_bench as xbench

        res["crossdevice"] = xbench.run(n=args.crossdevice_n, seconds=args.crossdevice_seconds, seed=args.seed)
        for line in xbench.lines(res["crossdevice"]):
            _print(con, line, report)
    if args.json == "-":
        json.dump(res, sys.stdout, indent=2, default=_jsonable)
        sys.stdout.write("\n")
    elif args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2, default=_jsonable)
        _print(con, f"results written to {args.json}", report)
    return 0


def _bench_rules(args, benchmark, con, err, report) -> Dict[str, Any]:
    mem = benchmark.memory_estimate(args.n, args.d, args.compare, args.bandwidth_gb)
    _print(err, f"memory: input {_gb(mem['input_bytes'])} ({args.n} x {args.d:,} float32); "
                f"peak about {_gb(mem['peak_bytes'])} with the alternatives' temporaries", sys.stderr)
    avail = _mem_available()
    if avail is not None and mem["peak_bytes"] > avail:
        _print(err, f"warning: only {_gb(avail)} of memory is available", sys.stderr)

    kwargs = dict(n=args.n, d=args.d, f=args.f, max_f=DEFAULT_MAX_F, seed=args.seed, rules=args.rules,
                  repeat=args.repeat, compare=args.compare, max_seconds=args.max_seconds,
                  bandwidth_gb=args.bandwidth_gb, threads=args.threads)
    if rich:
        with Progress(TextColumn("{task.description:<32}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=err, transient=True) as bar:
            task = bar.add_task("starting", total=None)
            res = benchmark.run(**kwargs, progress=lambda done, total, label: bar.update(
                task, completed=done, total=total, description=label))
    else:
        res = benchmark.run(**kwargs, progress=lambda done, total, label: print(
            f"[{done}/{total}] {label}", file=sys.stderr, flush=True))

    for line in header(res):
        _print(con, line, report)
    rows, notes = table_rows(res)
    print_table(con, COLUMNS, rows, report)
    for i, note in enumerate(notes, 1):
        _print(con, f"[{i}] {note}", report)
    return res


def print_table(con, columns: List[str], rows: List[List[str]], stream) -> None:
    """One table: rich's when rich is installed, else plain aligned text. The last column wraps."""
    if con is not None:
        t = Table(*columns)
        for col in t.columns[:-1]:
            col.no_wrap = True
        for row in rows:
            t.add_row(*row)
        con.print(t)
    else:
        _print(con, plain_table(rows, columns), stream)


def print_section(con, title: str, section_rows: List[Dict[str, Any]], stream) -> None:
    """A compression, privacy or transport section: its title, then a table like the rules'."""
    _print(con, "", stream)
    _print(con, title, stream)
    print_table(con, SECTION_COLUMNS, section_cells(section_rows), stream)


def section_cells(section_rows: List[Dict[str, Any]]) -> List[List[str]]:
    """The cells of a section's rows ({case, impl, seconds, gbps, speedup, agrees, note})."""
    out = []
    for r in section_rows:
        speed = "" if r["impl"].startswith("fedagg") or r.get("speedup") is None else f"{r['speedup']:.1f}x"
        out.append([r["case"], r["impl"], fmt_time(r["seconds"]), "-" if r["gbps"] is None else f"{r['gbps']:.2f}",
                    speed, {True: "yes", False: "NO", None: "-"}[r["agrees"]], r["note"]])
    return out


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"cannot write {type(x).__name__} as JSON")


def _mem_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def bandwidth_line(bw: Optional[Dict[str, Any]]) -> str:
    if not bw:
        return "copy bandwidth: not measured (--bandwidth-gb 0)"
    return (f"copy bandwidth: {bw['gbps']:.2f} GB/s (np.copyto of {_gb(bw['bytes'] / 2)}, bytes read + written "
            "per second): the memory speed every GB/s column below compares against")


def header(res: Dict[str, Any]) -> List[str]:
    m = res["machine"]
    if res.get("f") is not None:
        f_text = f"f = {res['f']} for every rule but the mean, which takes none"
    else:
        f_text = f"f = per rule, the largest <= {res.get('max_f', DEFAULT_MAX_F)} it allows at n (column f)"
    byz = res.get("byzantine")
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, fedagg isa {m['isa']}, threads {m['threads']}"
        + (f" (torch {m['torch_threads']})" if "torch_threads" in m else ""),
        f"n = {res['n']}, d = {res['d']:,}, {f_text}, input {res['input_gb']:.3g} GB, "
        f"repeat {res['repeat']} (median)" + (f"; the last {byz} updates are shifted (attackers)" if byz else ""),
        f"read pass: {fmt_time(res['read_pass']['seconds'])} ({res['read_pass']['gbps']:.2f} GB/s; "
        + ", ".join(f"{k} {fmt_time(v)}" for k, v in res["read_pass"].items() if k in ("numpy", "torch"))
        + "): the unit of column 'x read pass'",
        bandwidth_line(res["bandwidth"]),
    ]
    for name, o in res.get("optional", {}).items():
        if o["note"]:
            lines.append(f"{name}: {o['note']}")
    return lines


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def table_rows(res: Dict[str, Any]):
    """(rows of strings, notes): each row's last cell refers to a note by number."""
    rows, notes = [], []
    for r in res["results"]:
        f = "-" if r.get("f") is None else str(r["f"])
        if r["seconds"] is None:
            row = [r["rule"], f, r["impl"], "-", "-", "-", "-", "skipped" if r["skipped"] else "-"]
        else:
            speed = "" if r["impl"] == "fedagg" else f"{r['speedup']:.1f}x"
            agrees = {True: "yes", False: "NO", None: "-"}[r["agrees"]]
            if r["agrees"] is False and not r["same_definition"]:
                agrees = "no (def.)"
            row = [r["rule"], f, r["impl"], fmt_time(r["seconds"]), f"{r['gbps']:.2f}", f"{r['x_read']:.1f}",
                   speed, agrees]
        if r["note"] and r["note"] not in notes:
            notes.append(r["note"])
        rows.append(row + [f"[{notes.index(r['note']) + 1}]" if r["note"] else ""])
    return rows, notes


def plain_table(rows: List[List[str]], columns: Optional[List[str]] = None) -> str:
    columns = COLUMNS if columns is None else columns
    widths = [max(len(str(x)) for x in col) for col in zip(columns, *rows)]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(columns), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


if __name__ == "__main__":
    sys.exit(main())
