"""What the demo shows: a line per round under a progress bar, a summary, and a plot."""

from __future__ import annotations

import textwrap
import time
from typing import List, Optional

from .options import Options, RoundRow, RunResult


def _eps(e: Optional[float]) -> str:
    return "-" if e is None else f"{e:.2f}"


class View:
    """Per-round lines on the console under a progress bar (rich); plain lines without rich.

    Before the first round, one line per step that starts (chain node, contract, server,
    participants, training), whether or not the output is a terminal; under each run's
    table, once, a legend of its columns.
    """

    HEADER = f"{'round':>5} {'accuracy':>8} {'excluded by the rule':<24} {'refused':<18} {'eps':>6} " \
             f"{'KiB in':>7} {'s':>5} {'chain s':>7}"
    LEGEND = (
        "round     the server's round number, from 0 (as in the plot and in the round bundles fedagg audit reads)",
        "accuracy  test accuracy of the global model after the round",
        "excluded  participants the rule left out of the aggregate (* = Byzantine)",
        "refused   uploads the server refused this round, participant:reason",
        "eps       DP epsilon spent so far (- without --dp-noise)",
        "KiB in    update bytes the server received this round",
        "s         the round on the server, from its start to the aggregate: commit phase, training, "
        "uploads, aggregation",
        "chain s   the server's time in chain calls for the round: opening it, reading the commitments, and "
        "recording the round after it closed; it overlaps s, and the record is written after s ends, so it "
        "can exceed s (0 with --no-ledger)",
    )

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        try:
            from rich.console import Console

            self.console = Console(highlight=False)
            if not self.console.is_terminal:  # logs and pipes get plain lines, unwrapped
                self.console = None
        except ImportError:  # rich is in the cli extra; plain print otherwise
            self.console = None
        self.progress = None
        self.task = None
        self._t0 = time.monotonic()
        self._header_due = False
        self._legend_shown = False

    def _print(self, text: str) -> None:
        if self.quiet:
            return
        if self.console is not None:
            self.console.print(text, markup=False)
        else:
            print(text, flush=True)

    def start_run(self, title: str, rounds: int) -> None:
        self._t0 = time.monotonic()
        self._print("")
        self._print(title)
        self._header_due = True  # printed above the first round, after the steps that start the run
        if self.console is not None and not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("  rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                     console=self.console, transient=True)
            self.progress.start()
            self.task = self.progress.add_task("rounds", total=rounds)

    def step(self, text: str) -> None:
        """What the run is starting now (the first round comes after ~50 s of these on 2 cores)."""
        self._print(f"  [{time.monotonic() - self._t0:5.1f} s] {text}")

    def row(self, r: RoundRow) -> None:
        if self._header_due:
            self._header_due = False
            self._print(self.HEADER)
        refused = ", ".join(f"{k}:{v}" for k, v in sorted(r.refused.items())) or "-"
        self._print(f"{r.round:>5} {100 * r.accuracy:>7.1f}% {', '.join(r.excluded) or '-':<24.24} "
                    f"{refused:<18.18} {_eps(r.epsilon):>6} {r.bytes_in / 1024:>7.1f} {r.seconds:>5.1f} "
                    f"{r.ledger_seconds:>7.2f}")
        if self.progress is not None:
            self.progress.advance(self.task)

    def end_run(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if not self._header_due and not self._legend_shown:  # under the first table that has rows
            self._legend_shown = True
            self._print("")
            for line in self.LEGEND:
                self._print(textwrap.fill(line, width=100, initial_indent="  ", subsequent_indent=" " * 12))

    def summary(self, results: List[RunResult], opts: Options, plot_path: Optional[str]) -> None:
        self._print("")
        for res in results:
            last = res.rows[-1] if res.rows else None
            best = max((r.accuracy for r in res.rows), default=0.0)
            gas = sum(res.gas.values())
            self._print(f"{res.rule:>18} (f={res.f}): final accuracy {100 * (last.accuracy if last else 0):.1f}%, "
                        f"best {100 * best:.1f}%, {res.seconds:.0f} s"
                        + (f", eps {_eps(last.epsilon)}" if last and last.epsilon is not None else "")
                        + (f", {gas:,} gas in the aggregator's transactions" if gas else ""))
            if res.audit is not None:
                self._print(f"{'':>18}  audit of its {res.audit['rounds']} rounds (chain + bundles in "
                            f"{res.chain['bundles']}): " + ("passed" if res.audit["ok"] else
                                                            "FAILED: " + "; ".join(res.audit["problems"][:5])))
        if plot_path:
            self._print(f"plot: {plot_path}")


def figure(results: List[RunResult], opts: Options):
    """Accuracy per round of each run (rounds numbered as in the table: the server's, from 0)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for res in results:
        xs = [r.round for r in res.rows]
        ax.plot(xs, [100 * r.accuracy for r in res.rows], marker="o", markersize=3,
                label=f"{res.rule} (f={res.f})" if res.rule != "mean" else "mean")
    ax.set_xlabel("round (from 0, as in the table)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy after the round (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    attack = "no attack" if opts.byzantine == 0 else f"{opts.byzantine} of {opts.participants} attack: {opts.attack}"
    extra = [] if opts.codec == "none" else [f"codec {opts.codec}"]
    if opts.dp_noise > 0:
        extra.append(f"DP z={opts.dp_noise}")
    ax.set_title(f"fedagg demo: digits, {attack}" + (f" ({', '.join(extra)})" if extra else ""), fontsize=10)
    ax.legend(loc="center right")
    fig.tight_layout()
    return fig


def plot(results: List[RunResult], opts: Options, path: str) -> str:
    """Accuracy per round of each run, as a PNG (matplotlib, no display needed)."""
    figure(results, opts).savefig(path)
    return path
