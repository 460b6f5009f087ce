#!/usr/bin/env python3
"""Checks the TensorBoard event files `rotsweep report` writes with
TensorBoard's own reader (not run by CI: it needs `pip install tensorboard`).

    rotsweep report SWEEP --out DIR ...
    python3 tests/tensorboard_check.py DIR/tensorboard [DIR/epochs.csv]

For every run folder (MODEL/rotR) it loads the events with
`EventAccumulator`, and checks that the six scalar tags are there with one
value per epoch. Given epochs.csv, it also checks every value against the
CSV row of the same job and epoch (as float32). Exits non-zero on any
mismatch.
"""

import csv
import math
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TAGS = {
    "accuracy/train": "train_accuracy",
    "accuracy/validation": "val_accuracy",
    "loss/train": "train_loss",
    "loss/validation": "val_loss",
    "time/seconds_per_epoch": "seconds",
    "time/examples_per_second": "examples_per_second",
}


def main() -> int:
    root = sys.argv[1]
    rows = {}
    if len(sys.argv) > 2:
        with open(sys.argv[2], newline="") as f:
            for r in csv.DictReader(f):
                rows[(r["model"], int(r["rotation"]), int(r["epoch"]))] = r

    n_runs = n_values = 0
    for model in sorted(os.listdir(root)):
        for run in sorted(os.listdir(os.path.join(root, model))):
            path = os.path.join(root, model, run)
            acc = EventAccumulator(path, size_guidance={"scalars": 0})
            acc.Reload()
            tags = set(acc.Tags()["scalars"])
            if tags != set(TAGS):
                print(f"{path}: tags {sorted(tags)}")
                return 1
            rotation = int(run.removeprefix("rot"))
            for tag, column in TAGS.items():
                for event in acc.Scalars(tag):
                    n_values += 1
                    row = rows.get((model, rotation, event.step))
                    if rows and row is None:
                        print(f"{path}: {tag} step {event.step} is not in epochs.csv")
                        return 1
                    if row is not None:
                        want = float(row[column])
                        if not math.isclose(event.value, want, rel_tol=1e-6, abs_tol=1e-6):
                            print(f"{path}: {tag} step {event.step}: {event.value} != {want}")
                            return 1
            n_runs += 1
    print(f"ok: {n_runs} runs, {n_values} scalars read by TensorBoard")
    return 0 if n_runs else 1


if __name__ == "__main__":
    sys.exit(main())
