"""Run the app in Flower's Simulation Runtime: 6 virtual nodes, 2 of them Byzantine.

    pip install ".[flower]" "flwr[simulation]==1.42.0"   # in the fedagg checkout; the simulation needs Ray
    cd examples/flower && python run_simulation.py

run_simulation passes no run config: the settings are task.DEFAULTS. The result
lands in ./fedagg-flower-result.npz and ./fedagg-flower-result.npz.json.
"""

import argparse

from flwr.simulation import run_simulation

from fedagg_flower_example.client_app import app as client_app
from fedagg_flower_example.server_app import app as server_app

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-supernodes", type=int, default=6)
    args = parser.parse_args()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.num_supernodes,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
