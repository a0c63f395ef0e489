"""Print the `--spec` JSON of one run of a state-tracking sweep config, for running it by hand.

    python benchmarks/state_tracking_paper_spec.py configs/state_tracking_paper.yaml S3 2 neg 0 \
        --time-limit-minutes 8 > spec.json
    python -m keyred.stages.track --spec "$(cat spec.json)" --device cuda --out runs/S3_nh2_neg

The spec is the one the workflow's state_tracking_run rule builds (keyred.specs.tracking_run_spec)
for group, n_h, eigenvalue range (pos = [0,1], neg = [-1,1]) and seed.
"""

import argparse
import json

from keyred.config import load_config
from keyred.specs import tracking_run_spec

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("config")
parser.add_argument("group")
parser.add_argument("n_h", type=int)
parser.add_argument("eig", choices=["pos", "neg"])
parser.add_argument("seed", type=int)
parser.add_argument("--layers", type=int, default=1)
parser.add_argument("--time-limit-minutes", type=float, default=None)
args = parser.parse_args()

spec = tracking_run_spec(load_config(args.config)["state_tracking"], args.group, args.n_h, args.eig == "neg",
                         args.layers, args.seed)
if args.time_limit_minutes is not None:
    spec["train"]["time_limit_minutes"] = args.time_limit_minutes
print(json.dumps(spec, sort_keys=True))
