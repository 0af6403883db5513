#!/usr/bin/env bash
# Memory scaling check of the in-process simulation: runs simulations/configs/scale-10.toml and
# scale-1000.toml (10 clients per round, cnn, density 0.05, 3 rounds, full Fashion-MNIST) and
# prints each run's peak RSS and their ratio. Fails when the 1,000-client run needs more than 2x
# the memory of the 10-client run.
#
#   simulations/scale_check.sh [DATA_DIR]
#
# DATA_DIR holds the four Fashion-MNIST files (default: ../shared/data/fashion-mnist, relative to
# the repository root). Run folders go to $OUT (default: a fresh temporary folder). The peak RSS
# is the one each run records in summary.json (process_peak_rss_bytes, the kernel's VmHWM);
# /usr/bin/time's figure is printed beside it when that tool exists. Takes a few minutes on 2
# cores (the 10-client run trains on the whole training set every round).
set -euo pipefail

cd "$(dirname "$0")/.."
data_dir="${1:-../shared/data/fashion-mnist}"
out="${OUT:-$(mktemp -d -t fedtiny-scale.XXXXXX)}"
mkdir -p "$out"
target="${CARGO_TARGET_DIR:-target}"

cargo build --release -p fedtiny-simulations --bin fedtiny-sim
bin="$target/release/fedtiny-sim"

peak_of() { # run folder -> peak RSS in bytes from its summary.json
    grep -o '"process_peak_rss_bytes": *[0-9]*' "$1/summary.json" | grep -o '[0-9]*$'
}

declare -A peak
for n in 10 1000; do
    echo "running scale-$n (log: $out/scale-$n.log) ..."
    if [ -x /usr/bin/time ]; then
        /usr/bin/time -v -o "$out/scale-$n.time" \
            "$bin" run "simulations/configs/scale-$n.toml" --data-dir "$data_dir" --out "$out" \
            >"$out/scale-$n.log" 2>&1
        time_kib=$(grep -o 'Maximum resident set size (kbytes): [0-9]*' "$out/scale-$n.time" | grep -o '[0-9]*$')
    else
        "$bin" run "simulations/configs/scale-$n.toml" --data-dir "$data_dir" --out "$out" \
            >"$out/scale-$n.log" 2>&1
        time_kib=""
    fi
    peak[$n]=$(peak_of "$out/scale-$n")
    printf '  %4d clients: peak RSS %d bytes (%.1f MiB)%s\n' "$n" "${peak[$n]}" \
        "$(awk -v b="${peak[$n]}" 'BEGIN { print b / 1048576 }')" \
        "${time_kib:+; /usr/bin/time: $time_kib KiB}"
done

ratio=$(awk -v a="${peak[1000]}" -v b="${peak[10]}" 'BEGIN { printf "%.3f", a / b }')
echo "peak RSS ratio, 1000 clients / 10 clients: $ratio (limit 2)"
awk -v r="$ratio" 'BEGIN { exit !(r <= 2.0) }' || { echo "FAIL: ratio above 2" >&2; exit 1; }
echo "OK"
