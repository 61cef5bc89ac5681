"""``fedagg serve``, ``fedagg join`` and ``fedagg keys``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

DEFAULT_LINGER = 30.0  # seconds the final model stays served after --rounds, unless --linger says otherwise


def add_commands(sub, int_at_least, float_at_least) -> None:
    from .. import RULES
    from .participant import BEHAVIOURS

    s = sub.add_parser("serve", help="run an aggregation server over ZeroMQ",
                       description="Run rounds: publish the model, collect updates, aggregate at a quorum "
                                   "or deadline. Plain mode only on loopback/ipc unless --insecure; "
                                   "elsewhere CURVE keys are required. Prints one JSON line when listening "
                                   "and one per closed round on stdout; logs on stderr. SIGINT or SIGTERM "
                                   "stops it (SIGTERM: exit status 0).")
    s.add_argument("--bind", default="tcp://127.0.0.1:5555",
                   help="endpoint to listen on: tcp://HOST:PORT (port 0: any free one; IPv6 as tcp://[::1]:PORT) "
                        "or ipc://PATH (default tcp://127.0.0.1:5555)")
    m = s.add_mutually_exclusive_group(required=True)
    m.add_argument("--d", type=int_at_least(1), help="start from a zero model of d parameters (this or --model)")
    m.add_argument("--model", type=Path, help="start from this .npy float32 vector (this or --d)")
    s.add_argument("--rule", default="mean", choices=list(RULES), metavar="RULE",
                   help=f"aggregation rule, one of {', '.join(RULES)} (default mean)")
    s.add_argument("--f", type=int_at_least(0), default=0,
                   help="Byzantine updates the rule tolerates (default 0; the mean takes none)")
    s.add_argument("--quorum", type=int_at_least(1), default=1,
                   help="close a round at this many accepted updates (default 1)")
    s.add_argument("--deadline", type=float_at_least(0, True), default=60.0,
                   help="... or this many seconds after it started (default 60)")
    s.add_argument("--min-updates", type=int_at_least(1), default=1,
                   help="updates a deadline close needs to make a new model (default 1)")
    s.add_argument("--rounds", type=int_at_least(1), default=None,
                   help="stop after this many rounds (default: run until stopped)")
    s.add_argument("--linger", type=float_at_least(0, False), default=None, metavar="SECONDS",
                   help="after the last of --rounds, keep serving the final model (STATUS, GET_MODEL) this "
                        "many seconds so that participants can fetch it; 'inf' until SIGINT/SIGTERM "
                        f"(default: {DEFAULT_LINGER:g} with --rounds)")
    s.add_argument("--server-lr", type=float, default=1.0, help="model += server_lr * aggregate (default 1)")
    s.add_argument("--clip-norm", type=float_at_least(0, True), default=None,
                   help="clip updates to this L2 norm (default: no clipping)")
    s.add_argument("--state-dir", type=Path, default=None,
                   help="persist rounds and accepted updates here; a restarted server resumes from it "
                        "(default: in memory only)")
    s.add_argument("--chunk-mib", type=float_at_least(0, True), default=4.0,
                   help="chunk size in MiB, at most 4 (default 4)")
    s.add_argument("--credits", type=int_at_least(1), default=8,
                   help="chunks in flight per participant (default 8)")
    s.add_argument("--max-peers", type=int_at_least(1), default=4096,
                   help="connections tracked at once; when full, the least recently seen idle one makes room "
                        "(default 4096)")
    s.add_argument("--receive-memory-gb", type=float_at_least(0, True), default=None,
                   help="bytes of updates a round may hold (uploads in progress and accepted), in GB; an upload "
                        "beyond it is refused 'busy' (default: half the physical memory; with --device cuda, "
                        "90%% of the GPU's free memory)")
    s.add_argument("--max-inflight", type=int_at_least(1), default=256,
                   help="uploads streaming or being made durable at once; more are refused 'busy' with a "
                        "retry_after (default 256; the receive memory may allow fewer). With rule mean a round holds "
                        "about min(this x the model, the receive memory) + 4 x the model")
    s.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="where updates are received into and aggregated: cpu, cuda or cuda:N (default cpu; "
                        "cuda needs torch with CUDA and fedagg built with its CUDA backend)")
    s.add_argument("--upload-timeout", type=float_at_least(0, True), default=30.0,
                   help="seconds an upload may receive nothing before it is abandoned and its memory freed "
                        "(default 30)")
    s.add_argument("--io-threads", type=int_at_least(1), default=None,
                   help="libzmq I/O threads (default: one per 4 cores, 1 to 4)")
    s.add_argument("--curve-secret", type=Path, default=None,
                   help="the server's .key_secret file: CURVE on (default: plain)")
    s.add_argument("--allow", type=Path, default=None,
                   help="directory of the participants' public .key files, which --curve-secret needs "
                        "(default: none)")
    s.add_argument("--insecure", action="store_true",
                   help="plain mode on a non-loopback endpoint: unauthenticated and unencrypted, anyone "
                        "who reaches the port can submit updates under any id (default: refused)")
    s.add_argument("--shards", type=int_at_least(1), default=None, metavar="K",
                   help="run K shard servers on this host, each owning one coordinate range and bound to --bind's "
                        "port + its index, deciding rounds together over torch.distributed (started through "
                        "torchrun, which restarts them all if one dies; needs torch). --state-dir gets one "
                        "directory per shard (default: one server)")
    s.add_argument("--shard-endpoints", nargs="+", default=None, metavar="ENDPOINT",
                   help="be one shard of a sharded server, started by torchrun (RANK, WORLD_SIZE and the "
                        "rendezvous from its environment; one process per shard, on any hosts): every shard's "
                        "endpoint in rank order, this one binding its own (default: not a shard)")
    s.add_argument("--max-restarts", type=int_at_least(0), default=3,
                   help="with --shards: times torchrun restarts the shards after one failed (default 3)")
    buf = s.add_argument_group("buffered mode", "asynchronous FedBuff rounds: updates computed on any of the last "
                               "S + 1 model versions, a new version every K accepted updates (docs/protocol.md, "
                               "\"Buffered servers\")")
    buf.add_argument("--mode", choices=("sync", "buffered"), default="sync",
                     help="sync: rounds in step (default); buffered: asynchronous (FedBuff)")
    buf.add_argument("--buffer", type=int_at_least(1), default=None, metavar="K",
                     help="buffered: accepted updates per model version (sets --quorum; default: --quorum)")
    buf.add_argument("--max-staleness", type=int_at_least(0), default=10, metavar="S",
                     help="buffered: take updates computed on versions up to S old (default 10)")
    buf.add_argument("--staleness", default="sqrt", metavar="WEIGHT",
                     help="buffered: staleness weight: sqrt (FedBuff's 1/sqrt(1+s), default), constant, poly:A "
                          "((1+s)^-A) or hinge:A:B")
    sec = s.add_argument_group("secure rounds", "SecAgg+ over buckets: the server learns bucket sums, never one "
                                "update (docs/secure.md)")
    sec.add_argument("--secure", action="store_true",
                     help="run secure rounds: participants join, are split into buckets, mask their encoded updates; "
                          "--rule runs over the bucket means with --f counting buckets")
    sec.add_argument("--bucket-size", type=int_at_least(3), default=8,
                     help="participants per bucket (default 8; larger: more privacy, fewer inputs to the rule)")
    sec.add_argument("--secure-clip", type=float_at_least(0, True), default=1.0,
                     help="each participant clips its update to this L2 norm (default 1)")
    sec.add_argument("--secure-sigma", type=float_at_least(0, False), default=0.0,
                     help="each participant's discrete Gaussian noise stddev, in update units (default 0: no DP)")
    sec.add_argument("--secure-k", type=int_at_least(2), default=None,
                     help="neighbours per participant in its bucket (default: all for buckets up to 12, else "
                          "about 2 log2 n)")
    sec.add_argument("--max-dropout", type=float_at_least(0, False), default=0.2,
                     help="share of a bucket that may drop out and still be unmasked (default 0.2)")
    sec.add_argument("--phase-seconds", type=float_at_least(0, True), default=30.0,
                     help="each key phase ends once everyone answered, or after this long (default 30)")
    s.add_argument("--log-json", action="store_true",
                   help="structured logs (one JSON object per line) on stderr (default: text)")
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="live view of the round (default: when stderr is a terminal)")
    s.set_defaults(func=_serve)

    j = sub.add_parser("join", help="take part in rounds with a synthetic participant (tests, demos, load)",
                       description="A synthetic participant: each round it fetches the model and uploads an "
                                   "update that pulls the model toward a target shared by every participant of "
                                   "the same --task-seed (honest), or misbehaves (--behaviour). Prints one line "
                                   "per round; exit status 0 when every upload was accepted, 1 otherwise.")
    j.add_argument("--connect", default="tcp://127.0.0.1:5555",
                   help="the server's endpoint (default tcp://127.0.0.1:5555)")
    j.add_argument("--id", default=None, help="participant id, required without CURVE keys (with them the "
                                              "public key is the id; default: none)")
    j.add_argument("--behaviour", default="honest", choices=list(BEHAVIOURS),
                   help="honest: target - model + small noise; signflip: -10 x the honest update; noise: "
                        "N(0, 100^2); nan: an update holding NaN; wrongsize: d + 1 coordinates; die: streams "
                        "half its update, then exits without a word (default honest)")
    j.add_argument("--rounds", type=int_at_least(1), default=1, help="rounds to take part in (default 1)")
    j.add_argument("--task-seed", type=int_at_least(0), default=0,
                   help="seed of the shared target: the same for all honest participants (default 0)")
    j.add_argument("--seed", type=int_at_least(0), default=0,
                   help="seed of this participant's own noise (default 0)")
    j.add_argument("--timeout", type=float_at_least(0, True), default=30.0,
                   help="seconds to wait for the server at each step (default 30)")
    j.add_argument("--chunk-delay", type=float_at_least(0, False), default=0.0,
                   help="seconds between chunks, to simulate a slow link (default 0)")
    j.add_argument("--server-key", type=Path, default=None,
                   help="the server's public .key file: CURVE on (default: plain)")
    j.add_argument("--keys", type=Path, default=None,
                   help="this participant's .key_secret file, which --server-key needs (default: none)")
    j.set_defaults(func=_join)

    ld = sub.add_parser("load", help="drive many participant identities from one process (load tests)",
                        description="A load generator: N participant identities, each with its own connection, "
                                    "upload seeded N(0, 1) updates of d float32 values for --rounds rounds "
                                    "(fedagg.transport.load). Prints one JSON report: ids accepted per round, "
                                    "refusals by reason, seconds, bytes sent.")
    ld.add_argument("--connect", default="tcp://127.0.0.1:5555",
                    help="the server's endpoint (default tcp://127.0.0.1:5555)")
    ld.add_argument("--n", type=int_at_least(1), default=100, help="identities (default 100)")
    ld.add_argument("--d", type=int_at_least(1), required=True, help="float32 values per update (the model's d)")
    ld.add_argument("--rounds", type=int_at_least(1), default=1, help="rounds each identity takes part in "
                                                                      "(default 1)")
    ld.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the updates (default 0)")
    ld.add_argument("--prefix", default="load", help="ids are PREFIX-INDEX (default load)")
    ld.add_argument("--start", type=int_at_least(0), default=0, help="first INDEX (default 0)")
    ld.add_argument("--timeout", type=float_at_least(0, True), default=120.0,
                    help="seconds without progress before giving up (default 120)")
    ld.add_argument("--concurrency", type=int_at_least(1), default=None,
                    help="identities uploading at once; the others wait their turn holding no update "
                         "(default: all N)")
    ld.add_argument("--pregenerate", action="store_true",
                    help="make the updates of rounds 0 to --rounds - 1 before connecting (N x rounds x d in "
                         "memory), so that sending is not paced by generating them (benchmarks)")
    ld.set_defaults(func=_load)

    dv = sub.add_parser("devices", help="simulate thousands of cross-device participants (buffered servers)",
                        description="Simulated phones (fedagg.transport.devices): N connections, each in sessions "
                                    "of idle -> fetch the current model version -> train -> upload, some dropping "
                                    "mid-upload, some Byzantine, for --seconds. Prints one JSON report: accepted "
                                    "updates per second, COMMIT-to-ACCEPTED latency p50/p99, refusals by reason.")
    dv.add_argument("--connect", default="tcp://127.0.0.1:5555",
                    help="the server's endpoint (default tcp://127.0.0.1:5555)")
    dv.add_argument("--n", type=int_at_least(1), default=1000, help="devices (default 1000)")
    dv.add_argument("--d", type=int_at_least(1), required=True, help="float32 values per update (the model's d)")
    dv.add_argument("--seconds", type=float_at_least(0, True), default=60.0,
                    help="how long devices start sessions (default 60); the run ends when the last finishes")
    dv.add_argument("--idle", type=float_at_least(0, True), default=1.0,
                    help="mean seconds offline between sessions, exponential (default 1)")
    dv.add_argument("--train", type=float_at_least(0, True), default=0.5,
                    help="median seconds of training, log-normal (default 0.5)")
    dv.add_argument("--drop", type=float_at_least(0, False), default=0.1,
                    help="share of uploads abandoned after their first chunk (default 0.1)")
    dv.add_argument("--byzantine", type=float_at_least(0, False), default=0.01,
                    help="share of devices sending -10 x their update (default 0.01)")
    dv.add_argument("--processes", type=int_at_least(1), default=1, help="processes to spread devices over "
                                                                         "(default 1)")
    dv.add_argument("--no-model", action="store_true", help="skip the model download of each session")
    dv.add_argument("--seed", type=int_at_least(0), default=0, help="seed of updates and behaviour (default 0)")
    dv.add_argument("--details", action="store_true", help="list every accepted update in the report")
    dv.set_defaults(func=_devices)

    k = sub.add_parser("keys", help="CurveZMQ key pairs: generate, list",
                       description="CurveZMQ key pairs for fedagg serve --curve-secret/--allow and fedagg join "
                                   "--server-key/--keys.")
    ks = k.add_subparsers(dest="keys_command", required=True, metavar="{generate,list}")
    g = ks.add_parser("generate", help="write NAME.key (public) and NAME.key_secret into DIR",
                      description="Write a CurveZMQ key pair: DIR/NAME.key (public: give it to the other "
                                  "side) and DIR/NAME.key_secret (mode 600: keep it).")
    g.add_argument("dir", type=Path, help="directory to write into (created if missing)")
    g.add_argument("name", help="file name of the pair, without extension")
    g.set_defaults(func=_keys_generate)
    ls = ks.add_parser("list", help="the public keys in DIR",
                       description="Print NAME<TAB>KEY for every public .key file in DIR.")
    ls.add_argument("dir", type=Path, help="directory of .key files")
    ls.set_defaults(func=_keys_list)


def _load_public(path: Path) -> bytes:
    from zmq.auth import load_certificate

    public, _ = load_certificate(str(path))
    return public


def _config(args, shard=None):
    """The ServerConfig of `fedagg serve`'s options (checked when the server starts, or by the launcher)."""
    from .config import ServerConfig

    linger = args.linger if args.linger is not None else DEFAULT_LINGER if args.rounds is not None else 0.0
    cfg = ServerConfig(bind=args.bind, rule=args.rule, f=args.f, quorum=args.quorum, deadline=args.deadline,
                       min_updates=args.min_updates, rounds=args.rounds, server_lr=args.server_lr,
                       clip_norm=args.clip_norm, state_dir=str(args.state_dir) if args.state_dir else None,
                       chunk_bytes=int(args.chunk_mib * (1 << 20)) // 4 * 4, credits=args.credits,
                       insecure=args.insecure, io_threads=args.io_threads, linger=linger, max_peers=args.max_peers,
                       receive_memory=None if args.receive_memory_gb is None else int(args.receive_memory_gb * 1e9),
                       max_inflight=args.max_inflight, device=args.device,
                       upload_timeout=args.upload_timeout, shard=shard, mode=args.mode,
                       max_staleness=args.max_staleness, staleness=args.staleness)
    if args.buffer is not None:
        if args.mode != "buffered":
            raise ValueError("--buffer is the buffer size of --mode buffered (sync rounds close at --quorum)")
        cfg.quorum = args.buffer
        cfg.min_updates = min(cfg.min_updates, cfg.quorum)
    if args.secure:
        from .config import SecureConfig

        cfg.secure = SecureConfig(bucket_size=args.bucket_size, clip=args.secure_clip, sigma=args.secure_sigma,
                                  k=args.secure_k, max_dropout=args.max_dropout, phase_seconds=args.phase_seconds)
    if args.curve_secret is not None:
        from zmq.auth import load_certificate

        cfg.curve_public_key, cfg.curve_secret_key = load_certificate(str(args.curve_secret))
        if cfg.curve_secret_key is None:
            raise ValueError(f"{args.curve_secret} holds no secret key")
        if args.allow is None:
            raise ValueError("--curve-secret needs --allow DIR (the participants' public keys)")
        cfg.allowed_keys = [_load_public(p) for p in sorted(args.allow.glob("*.key"))]
    return cfg


def _launch_shards(args) -> int:
    """`fedagg serve --shards K`: torchrun starts K shard processes (`--shard-endpoints ...`) on this host."""
    import signal
    import subprocess

    from .protocol import endpoint_host

    if args.shard_endpoints is not None:
        raise ValueError("give --shards (start K shards here) or --shard-endpoints (be one shard), not both")
    if args.device != "cpu" and args.shards > 1:
        raise ValueError("--shards on one host runs CPU shards; start GPU shards with torchrun and --shard-endpoints")
    if not args.bind.startswith("tcp://"):
        raise ValueError("--shards needs a tcp:// --bind: shard i listens on its port + i")
    _config(args).check()  # refused here, not by K shards restarted --max-restarts times
    host, port = endpoint_host(args.bind), int(args.bind.rsplit(":", 1)[1])
    if port == 0:
        raise ValueError("--shards needs a fixed --bind port (participants are told every shard's endpoint)")
    shown = f"[{host}]" if ":" in host else host
    endpoints = [f"tcp://{shown}:{port + i}" for i in range(args.shards)]
    argv, skip = [], 0
    for a in args.argv[args.argv.index("serve") + 1:]:
        if skip:
            skip -= 1
            continue
        if a in ("--shards", "--max-restarts"):
            skip = 1
            continue
        if a.startswith(("--shards=", "--max-restarts=")):
            continue
        argv.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.shards),
           "--max-restarts", str(args.max_restarts), "--monitor-interval", "0.5",
           "-m", "fedagg", "--", "serve", *argv, "--shard-endpoints", *endpoints]
    proc = subprocess.Popen(cmd)
    forward = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        return 130
    finally:
        signal.signal(signal.SIGTERM, forward)


def _shard_spec(args, d: int):
    """This process's ShardSpec under torchrun (`--shard-endpoints`), with the group initialized."""
    from ..distributed import init_process_group
    from .shards import ShardSpec

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("--shard-endpoints: start each shard with torchrun (it sets RANK, WORLD_SIZE and the "
                         "rendezvous), or use --shards K on one host")
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if size != len(args.shard_endpoints):
        raise ValueError(f"--shard-endpoints lists {len(args.shard_endpoints)} endpoints, torchrun started "
                         f"{size} shards")
    init_process_group("gloo", timeout=120.0)
    return ShardSpec(rank=rank, endpoints=tuple(args.shard_endpoints), d=d)


def _line(obj) -> None:
    """One JSON line on stdout in one write: K shards share the launcher's stdout, and a line written in
    pieces (print writes its newline apart) could interleave with another shard's."""
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def _serve(args) -> int:
    import signal

    import zmq

    from .server import Server, is_local

    if args.f and args.rule == "mean":
        raise ValueError("--f: the mean takes no f (it tolerates no Byzantine update); choose a robust --rule")
    if args.shards is not None:
        return _launch_shards(args)
    warned = args.insecure and args.curve_secret is None and not is_local(args.bind)
    if warned:
        print(f"fedagg serve: warning: --insecure on {args.bind}, which is not a loopback endpoint: plain mode is "
              "unauthenticated and unencrypted; anyone who can reach this port can submit updates under any "
              "participant id and read the model. Use CURVE keys (fedagg keys generate; --curve-secret, --allow).",
              file=sys.stderr, flush=True)
    handler = logging.StreamHandler(sys.stderr)
    if args.log_json:
        from .observe import JsonFormatter

        handler.setFormatter(JsonFormatter())
    elif warned:  # the server's own log line would say it a second time
        handler.addFilter(lambda record: getattr(record, "event", None) != "insecure")
    logging.getLogger("fedagg").addHandler(handler)
    logging.getLogger("fedagg").setLevel(logging.INFO)
    model = np.zeros(args.d, dtype=np.float32) if args.d else np.load(args.model, allow_pickle=False)
    shard = None
    if args.shard_endpoints is not None:
        shard = _shard_spec(args, int(np.size(model)))
        lo, hi = shard.range
        model = np.ascontiguousarray(np.asarray(model, dtype=np.float32).reshape(-1)[lo:hi])
        args.bind = args.shard_endpoints[shard.rank]
        if args.state_dir is not None:
            args.state_dir = args.state_dir / f"shard-{shard.rank}-of-{shard.count}"
    cfg = _config(args, shard)
    show = sys.stderr.isatty() if args.progress is None else args.progress
    progress = None
    if show:
        from .observe import ProgressView

        progress = ProgressView()
    try:
        tag = {} if shard is None else {"shard": shard.rank}
        server = Server(model, cfg, progress=progress,
                        on_round=lambda rec: _line({"round_closed": rec, **tag}))
    except zmq.ZMQError as e:  # the server names a failed bind itself; anything else from libzmq, here
        raise ValueError(f"cannot bind {args.bind}: {e}") from None
    # SIGTERM (systemd, docker stop, kill) stops the server like the end of its rounds: exit status 0.
    # Installed before the "listening" line, so a SIGTERM sent as soon as it is read is handled.
    previous = signal.signal(signal.SIGTERM, lambda *_: server.stop())
    where = {} if shard is None else {"shard": shard.rank, "shards": shard.count, "pid": os.getpid()}
    _line({"listening": server.endpoint, "round": server.round, "d": server.d, "device": server.device.name,
           **where})
    try:
        server.serve()
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _load(args) -> int:
    from dataclasses import asdict

    from .load import Load

    report = Load(args.connect, args.n, args.d, seed=args.seed, rounds=args.rounds, prefix=args.prefix,
                  start=args.start, timeout=args.timeout, concurrency=args.concurrency,
                  pregenerate=args.pregenerate).run()
    print(json.dumps(asdict(report)))
    return 0


def _devices(args) -> int:
    from .devices import Devices

    if not (args.drop < 1 and args.byzantine < 1):
        raise ValueError("--drop and --byzantine are shares in [0, 1)")
    report = Devices(args.connect, args.n, args.d, seconds=args.seconds, idle=args.idle, train=args.train,
                     drop=args.drop, byzantine=args.byzantine, processes=args.processes,
                     fetch_model=not args.no_model, seed=args.seed).run()
    out = report.as_dict()
    if args.details:
        out["updates"] = report.accepted
    print(json.dumps(out))
    return 0


def _join(args) -> int:
    from .participant import run

    keys = None
    if args.server_key is not None:
        from zmq.auth import load_certificate

        if args.keys is None:
            raise ValueError("--server-key needs --keys (this participant's .key_secret)")
        public, secret = load_certificate(str(args.keys))
        keys = {"server_key": _load_public(args.server_key), "public_key": public, "secret_key": secret}
    elif args.id is None:
        raise ValueError("give --id (or CURVE keys)")
    results = run(args.connect, args.id, behaviour=args.behaviour, rounds=args.rounds, task_seed=args.task_seed,
                  seed=args.seed, timeout=args.timeout, chunk_delay=args.chunk_delay, keys=keys,
                  log=lambda line: print(line, flush=True))
    return 0 if all(r.get("accepted") for r in results) else 1


def _keys_generate(args) -> int:
    from zmq.auth import create_certificates

    args.dir.mkdir(parents=True, exist_ok=True)
    public, secret = create_certificates(str(args.dir), args.name)
    os.chmod(secret, 0o600)
    print(json.dumps({"public": public, "secret": secret, "key": _load_public(Path(public)).decode()}))
    return 0


def _keys_list(args) -> int:
    if not args.dir.is_dir():
        raise ValueError(f"{args.dir} is not a directory")
    for p in sorted(args.dir.glob("*.key")):
        print(f"{p.stem}\t{_load_public(p).decode()}")
    return 0
