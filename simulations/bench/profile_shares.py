#!/usr/bin/env python3
"""Shares of a training step by kind of work, from `perf script` output of a fedtiny-sim bench.

Usage:
  perf record -F 999 --call-graph dwarf,16384 -o perf.data \
      fedtiny-sim bench --models vgg11 --densities 0.01 --only-listed --steps 40 --repeats 2
  perf script -i perf.data > perf.txt
  python3 simulations/bench/profile_shares.py perf.txt

Each sample (both threads) goes to the first category whose pattern matches a frame, innermost
frame first; samples with no engine frame (rayon's idle spinning, the kernel) are "other".
"""
import collections
import re
import sys

# (category, pattern on a frame's symbol), in priority order within a frame.
CATEGORIES = [
    ("batchnorm (+ fused relu)", r"channelwise|layers::batchnorm"),
    ("max-pool", r"layers::pool::MaxPool2d|layers::pool::window_max|layers::pool::\{"),
    ("residual add / relu", r"layers::relu|layers::residual"),
    ("sparse conv: packing (transposes, zero-fill)", r"sparse::transpose|ConvPlan::(pack|unpack)"),
    ("sparse conv: products", r"sparse::simd|sparse::products"),
    ("sparse conv: other", r"kernels::sparse::conv"),
    ("sparse linear", r"kernels::sparse::matrix"),
    ("dense conv / linear (GEMM, im2col)", r"kernels::gemm|kernels::im2col|matrixmultiply"),
    ("optimizer", r"optim::"),
    ("layers (allocation, zeroing)", r"layers::conv|layers::linear"),
    ("loss, pools, other layers", r"fedtiny_common::"),
]


def main(path):
    try:
        text = open(path, errors="replace").read()
    except OSError as e:
        sys.exit(f"profile_shares: cannot read {path}: {e.strerror}")
    counts = collections.Counter()
    total = 0
    for sample in text.split("\n\n"):
        lines = [l.strip() for l in sample.strip().split("\n")]
        if len(lines) < 2:
            continue
        total += 1
        frames = lines[1:]
        cat = "other (idle threads, kernel, runtime)"
        found = False
        for frame in frames:
            for name, pat in CATEGORIES:
                if re.search(pat, frame):
                    cat, found = name, True
                    break
            if found:
                break
        counts[cat] += 1
    if total == 0:
        sys.exit(f"profile_shares: no samples in {path} (expected `perf script` output "
                 "recorded with --call-graph)")
    print(f"# {total} samples")
    for name, n in counts.most_common():
        print(f"{100.0 * n / max(total, 1):5.1f} %  {name}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: profile_shares.py PERF_SCRIPT_OUTPUT")
    main(sys.argv[1])
