"""Peak memory of featurizing to an on-disk store, at two training-set sizes, each in a fresh process.

    python bench/memory_store.py --sizes 20000 200000 [--json out.json]

A ~100k-parameter MLP (NumPy reference backend, float32: 100 -> 900 -> 10, 99,910 parameters),
k = 1,024, batches of 256 generated on the fly (never all in memory), one checkpoint. Reports the
peak resident set size (ru_maxrss) after featurizing, and after scoring 8 targets (the score matrix
itself is n_train x n_targets), and seconds per size: the peak should not grow with n_train.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from _report import write_json

CHILD = """
import resource, sys, time
import numpy as np
from trak_core import MLP, TRAK
n = int(sys.argv[1]); store = sys.argv[2]
model = MLP(100, 900, 10)
theta = model.init(seed=0, dtype="float32")
def batches():
    for start in range(0, n, 256):
        rng = np.random.default_rng(start)
        rows = min(256, n - start)
        yield rng.normal(size=(rows, 100)).astype("float32"), rng.integers(0, 10, rows)
trak = TRAK(model, proj_dim=1024, store=store, progress=False)
start = time.perf_counter()
trak.featurize(theta, batches())
featurize_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
seconds = time.perf_counter() - start
x, y = next(batches())
trak.score([(x[:8], y[:8])])
print(seconds, featurize_peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", type=int, default=[20_000, 200_000])
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as store:
            out = subprocess.run([sys.executable, "-c", CHILD, str(n), store], capture_output=True, text=True)
        if out.returncode:  # the child's own message (a missing zarr says how to install it), not its script
            lines = out.stderr.strip().splitlines()
            sys.exit(f"the measuring process for n_train={n} failed: {lines[-1] if lines else out.returncode}")
        seconds, featurize_kib, score_kib = out.stdout.split()
        rows.append(dict(n_train=n, params=99_910, proj_dim=1024, featurize_seconds=float(seconds),
                         featurize_peak_rss_mb=int(featurize_kib) / 1024,
                         peak_rss_after_scoring_8_targets_mb=int(score_kib) / 1024))
        print(json.dumps(rows[-1]))
    return write_json(rows, args.json)


if __name__ == "__main__":
    main()
