"""An NVFlare 2.9 job whose server aggregates with fedagg (FedaggAggregator), run in NVFlare's simulator.

    pip install ".[nvflare]"            # from the fedagg checkout: fedagg + NVFlare 2.9; no torch needed
    python examples/nvflare/job.py      # 4 sites, site-4 Byzantine; trimmed mean with f = 1

The global model lands in <workspace>/server/simulate_job/fedagg_global_model.fobs
(an FLModel, FOBS-serialized: nvflare.fuel.utils.fobs.loadf reads it); this
script prints it when the run is over. --export DIR writes the job folder
instead, to submit to a real deployment (nvflare job submit -j DIR/fedagg_robust).
"""

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT = "fedagg_global_model.fobs"
#: the initial global model: FedAvg(model=...) takes a dict (or an FLModel); lists, since the job's
#: config is JSON. client.py fits y = x . w + b with 10 features.
INITIAL_MODEL = {"w": [0.0] * 10, "b": [0.0]}


def build_job(n_clients: int, rounds: int, rule: str, f: int, byzantine: str):
    """The FedJob. Build and export it with client.py in the working directory (main() moves there)."""
    from nvflare.app_common.workflows.fedavg import FedAvg
    from nvflare.job_config.api import FedJob
    from nvflare.job_config.script_runner import ScriptRunner

    from fedagg.integrations.nvflare import FedaggAggregator

    job = FedJob(name="fedagg_robust", min_clients=n_clients)
    job.set_app_packages(["fedagg"])  # the server imports the installed fedagg; it is not copied into the job
    job.to_server(FedAvg(
        num_clients=n_clients, num_rounds=rounds,
        model=INITIAL_MODEL,     # a dict (or an FLModel) of the initial parameters
        persistor_id="",         # no persistor: the model is saved to save_filename in the server's run folder
        save_filename=RESULT,    # (a persistor instead: persistor_id=job.to_server(<a ModelPersistor>))
        aggregator=FedaggAggregator(rule=rule, f=f, nonfinite="exclude"),  # NaN/Inf models dropped, reported
    ))
    # framework="numpy": the client exchanges NumPy arrays (the default, PyTorch, needs torch on the sites)
    job.to_clients(ScriptRunner(script="client.py", script_args=f"--byzantine {byzantine}" if byzantine else "",
                                framework="numpy"))
    return job


def load_result(workspace: str):
    """The saved global model: an FLModel with .params (name -> array) and .meta["fedagg"]."""
    from nvflare.fuel.utils import fobs

    return fobs.loadf(os.path.join(workspace, "server", "simulate_job", RESULT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", default="/tmp/fedagg-nvflare", help="the simulator's workspace")
    parser.add_argument("--n-clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rule", default="trimmed_mean")
    parser.add_argument("--f", type=int, default=1)
    parser.add_argument("--byzantine", default="site-4", help="the attacking site ('' for none)")
    parser.add_argument("--export", metavar="DIR", help="write the job folder to DIR instead of simulating it")
    args = parser.parse_args()
    workspace = os.path.abspath(args.workspace)
    export = os.path.abspath(args.export) if args.export else None
    # ScriptRunner's "client.py" is looked up in the working directory when the job is written
    # (and in the job's custom/ folder when it runs).
    os.chdir(HERE)

    job = build_job(args.n_clients, args.rounds, args.rule, args.f, args.byzantine)
    if export:
        job.export_job(export)
        print(f"job written to {os.path.join(export, 'fedagg_robust')}")
        return 0

    # No to(site) calls: the simulator needs the number of clients (sites site-1 .. site-n).
    rc = job.simulator_run(workspace, n_clients=args.n_clients)
    path = os.path.join(workspace, "server", "simulate_job", RESULT)
    if rc != 0 or not os.path.exists(path):
        # The simulator exits 0 even when the clients failed: no saved model is the sign.
        print(f"the run failed (simulator exit code {rc}, {path} {'exists' if os.path.exists(path) else 'missing'}); "
              f"see {os.path.join(workspace, 'server', 'log.txt')} and the site logs", file=sys.stderr)
        return 1
    model = load_result(workspace)
    info = model.meta["fedagg"]
    print(f"global model: {path}")
    for key, value in model.params.items():
        print(f"  {key}: {value}")
    print(f"last round: rule {info['rule']}, f = {info['f']}, clients {info['clients']}, excluded {info['excluded']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
