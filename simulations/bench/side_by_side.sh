#!/usr/bin/env bash
# Side-by-side training throughput: fedtiny (`fedtiny-sim bench`, dense and sparse) and PyTorch CPU
# (dense, simulations/bench/pytorch_bench.py) on the same models, in one run on this machine.
#
# For each case (model:width) it runs the PyTorch bench of the model, `fedtiny-sim bench` over the
# density sweep, and the PyTorch bench again, back to back, so that both see the same machine
# load (the PyTorch figure is the median over the repeats of both PyTorch runs); then
# simulations/bench/merge_side_by_side.py merges everything into ONE Markdown table:
#   model | width | density | fedtiny samples/s | speed-up vs fedtiny dense | PyTorch dense samples/s
#   | fedtiny ÷ PyTorch
# Everything lands in a run folder: runs/side-by-side-<UTC timestamp>/ (or $OUT):
#   side_by_side.md / side_by_side.json   the merged table, the parameter/FLOP check, machine facts
#   machine.json                          nproc, CPU model, load averages, fedtiny commit, torch version
#   fedtiny/<model>-w<width>/bench.{json,md}   fedtiny-sim bench's own output per case
#   pytorch/<model>-w<width>-{before,after}.json  pytorch_bench.py's output per case
#   log.txt                               everything both benches printed
#
# Usage (from anywhere):
#   PYTHON=/work/venv-torch/bin/python bash simulations/bench/side_by_side.sh
# Environment (all optional):
#   PYTHON       interpreter with torch installed (default: python3)
#   FEDTINY_SIM  path to a built fedtiny-sim (default: build it with
#                `cargo build --release -j 1 -p fedtiny-simulations --bin fedtiny-sim`,
#                honouring CARGO_TARGET_DIR)
#   CASES        space-separated model:width[:warmup:steps:repeats]
#                (default: "cnn:1 vgg11:0.25 vgg11:1 resnet18:0.25 resnet18:1")
#   DENSITIES    fedtiny density sweep (default: 1,0.5,0.2,0.1,0.05,0.02,0.01)
#   THREADS (2), BATCH (64), WARMUP (3), STEPS (10), REPEATS (5): defaults of every case,
#                the same as `fedtiny-sim bench`'s own defaults
#   OUT          run folder (default: runs/side-by-side-<timestamp> under the repo root)
#   OMP_WAIT_POLICY  for PyTorch's OpenMP threads (default here: PASSIVE, see below)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
CASES="${CASES:-cnn:1 vgg11:0.25 vgg11:1 resnet18:0.25 resnet18:1}"
DENSITIES="${DENSITIES:-1,0.5,0.2,0.1,0.05,0.02,0.01}"
THREADS="${THREADS:-2}"
BATCH="${BATCH:-64}"
WARMUP="${WARMUP:-3}"
STEPS="${STEPS:-10}"
REPEATS="${REPEATS:-5}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="${OUT:-$ROOT/runs/side-by-side-$STAMP}"

if [[ -z "${FEDTINY_SIM:-}" ]]; then
    echo "building fedtiny-sim (release, -j 1) ..." >&2
    (cd "$ROOT" && cargo build --release -j 1 -p fedtiny-simulations --bin fedtiny-sim)
    FEDTINY_SIM="${CARGO_TARGET_DIR:-$ROOT/target}/release/fedtiny-sim"
fi
[[ -x "$FEDTINY_SIM" ]] || { echo "fedtiny-sim not found at $FEDTINY_SIM" >&2; exit 1; }
"$PYTHON" -c 'import torch' || { echo "$PYTHON cannot import torch (set PYTHON)" >&2; exit 1; }

mkdir -p "$OUT/fedtiny" "$OUT/pytorch"
LOG="$OUT/log.txt"
: >"$LOG"

# Keep every library at the same thread count as the benches' own setting.
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
# PyTorch's OpenMP threads spin while waiting by default; on a machine shared with other work
# (more runnable threads than cores) that made PyTorch 4-8x slower in our measurements, so the
# comparison would be of spin-waiting, not of kernels. PASSIVE makes them sleep (fedtiny's rayon
# workers sleep after a short spin anyway). Set OMP_WAIT_POLICY=ACTIVE to measure the default.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

cpu_model="$( (lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1) || true)"
[[ -n "$cpu_model" ]] || cpu_model="$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)"
load_start="$(cut -d' ' -f1-3 /proc/loadavg)"
started="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

for case in $CASES; do
    IFS=: read -r model width c_warmup c_steps c_repeats <<<"$case"
    c_warmup="${c_warmup:-$WARMUP}"
    c_steps="${c_steps:-$STEPS}"
    c_repeats="${c_repeats:-$REPEATS}"
    name="$model-w$width"
    pytorch() {
        echo "== $name: PyTorch ($1 fedtiny) ==" | tee -a "$LOG" >&2
        "$PYTHON" "$HERE/pytorch_bench.py" --cases "$model:$width" --batch-size "$BATCH" \
            --threads "$THREADS" --warmup "$c_warmup" --steps "$c_steps" --repeats "$c_repeats" \
            --json "$OUT/pytorch/$name-$1.json" >>"$LOG" 2>&1
    }
    # PyTorch right before and right after fedtiny, so that a change of machine load during
    # the case touches both sides; the merge takes the median over both runs' repeats.
    pytorch before
    echo "== $name: fedtiny (warmup $c_warmup, steps $c_steps, repeats $c_repeats) ==" | tee -a "$LOG" >&2
    "$FEDTINY_SIM" bench --models "$model" --width "$width" --batch-size "$BATCH" \
        --threads "$THREADS" --warmup "$c_warmup" --steps "$c_steps" --repeats "$c_repeats" \
        --densities "$DENSITIES" --out "$OUT/fedtiny/$name" >>"$LOG" 2>&1
    pytorch after
done

load_end="$(cut -d' ' -f1-3 /proc/loadavg)"
torch_version="$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
commit="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
"$PYTHON" - "$OUT/machine.json" <<EOF
import json, sys
json.dump({
    "nproc": int("$(nproc)"),
    "cpu_model": """$cpu_model""",
    "kernel": "$(uname -sr)",
    "memory": "$(free -g 2>/dev/null | awk '/^Mem:/{print $2 " GiB"}')",
    "torch_version": "$torch_version",
    "python": "$("$PYTHON" -c 'import platform; print(platform.python_version())')",
    "fedtiny_commit": "$commit",
    "fedtiny_sim": "$FEDTINY_SIM",
    "threads": int("$THREADS"),
    "batch_size": int("$BATCH"),
    "cases": "$CASES",
    "densities": "$DENSITIES",
    "omp_wait_policy": "$OMP_WAIT_POLICY",
    "started_utc": "$started",
    "finished_utc": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
    "loadavg_start": "$load_start",
    "loadavg_end": "$load_end",
}, open(sys.argv[1], "w"), indent=2)
EOF

"$PYTHON" "$HERE/merge_side_by_side.py" "$OUT"
echo "wrote $OUT/side_by_side.md" >&2
