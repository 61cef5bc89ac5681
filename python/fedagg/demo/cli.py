"""``fedagg demo``: the command line of fedagg.demo."""

from __future__ import annotations

from .options import ATTACKS, CODECS


def add_commands(sub, int_at_least, float_at_least) -> None:
    from .. import RULES

    d = sub.add_parser("demo", help="federated training under attack, end to end, on this machine",
                       description="Starts a chain node, an aggregation server and N participant processes on "
                                   "loopback; participants register and stake on chain, train a small MLP on "
                                   "scikit-learn's digits, commit and sign their updates; some attack. Runs "
                                   "the robust rule, then the plain mean under the same attack, and plots both.")
    d.add_argument("--task", choices=["digits", "lora"], default="digits",
                   help="digits: the MLP on scikit-learn's digits over the server (default); lora: federated LoRA "
                        "fine-tuning of a small Llama (peft extra), in one process: FedIT's averaged factors vs "
                        "exact aggregation vs the robust rule under attack, perplexity per round")
    d.add_argument("--lora-rank", type=int_at_least(1), default=4, help="LoRA rank with --task lora (default 4)")
    d.add_argument("--participants", type=int_at_least(1), default=10, help="participant processes (default 10)")
    d.add_argument("--byzantine", type=int_at_least(0), default=3, help="how many of them attack (default 3)")
    d.add_argument("--attack", choices=ATTACKS, default="signflip", help="what they send (default signflip)")
    d.add_argument("--rule", choices=RULES, default="multi_krum", help="the robust rule (default multi_krum)")
    d.add_argument("--f", type=int_at_least(0), default=None, help="f of the rule (default: --byzantine)")
    d.add_argument("--rounds", type=int_at_least(1), default=15, help="rounds per run (default 15)")
    d.add_argument("--codec", choices=CODECS, default="none", help="update compression (default none)")
    d.add_argument("--dp-noise", type=float_at_least(0, False), default=0.0,
                   help="central DP noise multiplier z; 0 turns DP off (default 0)")
    d.add_argument("--dp-clip", type=float_at_least(0, True), default=1.0, help="DP clip norm C (default 1)")
    d.add_argument("--no-ledger", dest="ledger", action="store_false",
                   help="admit participants without the chain (plain federated)")
    d.add_argument("--no-compare", dest="compare", action="store_false", help="skip the plain-mean run")
    d.add_argument("--seed", type=int_at_least(0), default=0, help="data split and model seed (default 0)")
    d.add_argument("--plot", default="fedagg-demo.png", help="PNG to write (default fedagg-demo.png; '' for none)")
    d.add_argument("--bundles", default=None, help="folder for each ledger round's bundle (default: a temporary "
                                                   "one); `fedagg audit` reads them")
    d.add_argument("--secure", action="store_true",
                   help="secure rounds: participants are split into buckets, each bucket summed by SecAgg+ (the "
                        "server never sees one update), the rule runs over the bucket means; --dp-noise and "
                        "--dp-clip become each participant's own clipping and noise; runs without the ledger")
    d.add_argument("--bucket-size", type=int_at_least(3), default=3,
                   help="participants per bucket with --secure (default 3)")
    d.add_argument("--keep-chain", action="store_true",
                   help="after the runs, keep each run's chain serving and print the `fedagg audit` command for "
                        "it, until Ctrl-C (needs --bundles)")
    d.set_defaults(func=_demo)


def _demo(args) -> int:
    import signal
    import sys

    from . import Options, run

    # SIGTERM unwinds like Ctrl-C: the server stops and the child processes are ended.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.task == "lora":
        from .lora import LoraOptions, main

        main(LoraOptions(participants=args.participants, byzantine=args.byzantine, rule=args.rule, f=args.f,
                         rounds=args.rounds, rank=args.lora_rank, seed=args.seed))
        return 0

    opts = Options(participants=args.participants, byzantine=args.byzantine, attack=args.attack, rule=args.rule,
                   f=args.f, rounds=args.rounds, codec=args.codec, dp_noise=args.dp_noise, dp_clip=args.dp_clip,
                   ledger=args.ledger and not args.secure, compare=args.compare, seed=args.seed,
                   plot=args.plot or None, bundles=args.bundles, keep_chain=args.keep_chain, secure=args.secure,
                   bucket_size=args.bucket_size)
    run(opts)
    return 0
