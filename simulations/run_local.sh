#!/usr/bin/env bash
# Runs a federated experiment as real processes on this machine: generates certificates, starts
# the coordinator and N client processes over mutual-TLS gRPC on loopback, each client with its
# own Dirichlet(ALPHA) share of the training data, waits, and prints accuracy per round.
#
#   simulations/run_local.sh                   # 5 clients on the committed sample
#   N=10 ROUNDS=20 DATA_DIR=../shared/data/fashion-mnist simulations/run_local.sh
#
# Environment: N (clients, default 5), ROUNDS (default from the config), DATA_DIR (default
# data/fashion-mnist-sample), ALPHA (default 0.5), SEED (must match the config's run.seed,
# default 1), CONFIG (default simulations/configs/local-cnn.toml), OUT (run folder parent,
# default runs), THREADS (kernel threads per client, default 1). Binaries are built into
# CARGO_TARGET_DIR when it is set.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-5}
DATA_DIR=${DATA_DIR:-data/fashion-mnist-sample}
ALPHA=${ALPHA:-0.5}
SEED=${SEED:-1}
CONFIG=${CONFIG:-simulations/configs/local-cnn.toml}
OUT=${OUT:-runs}
THREADS=${THREADS:-1}
NAME="local-$(date +%Y%m%d-%H%M%S)"
WORK="$OUT/$NAME.work"

cargo build --release -q -p fedtiny-coordinator -p fedtiny-client -p fedtiny-simulations
BIN="${CARGO_TARGET_DIR:-target}/release"
mkdir -p "$WORK"
"$BIN/fedtiny-coordinator" certs --out "$WORK/pki" --clients "$N" >/dev/null

rounds_arg=()
[ -n "${ROUNDS:-}" ] && rounds_arg=(--rounds "$ROUNDS")
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

"$BIN/fedtiny-coordinator" serve --config "$CONFIG" --tls-dir "$WORK/pki" \
  --data-dir "$DATA_DIR" --out "$OUT" --name "$NAME" "${rounds_arg[@]}" \
  >"$WORK/coordinator.log" 2>&1 &
coord=$!
pids+=("$coord")

addr_file="$OUT/$NAME/listen_addr"
for _ in $(seq 1 300); do
  [ -s "$addr_file" ] && break
  kill -0 "$coord" 2>/dev/null || { cat "$WORK/coordinator.log"; echo "coordinator failed to start" >&2; exit 1; }
  sleep 0.1
done
[ -s "$addr_file" ] || { echo "coordinator did not report its address" >&2; exit 1; }
port=$(sed 's/.*://' "$addr_file")
echo "coordinator listening on port $port; $N clients starting (logs in $WORK)"

for i in $(seq 0 $((N - 1))); do
  id=$(printf "client-%04d" "$i")
  "$BIN/fedtiny-client" --coordinator "https://localhost:$port" \
    --ca "$WORK/pki/ca.pem" --cert "$WORK/pki/clients/$id.pem" --key "$WORK/pki/clients/$id.key" \
    --data-dir "$DATA_DIR" --partition "$i" --of "$N" --alpha "$ALPHA" --seed "$SEED" \
    --threads "$THREADS" >"$WORK/$id.log" 2>&1 &
  pids+=("$!")
done

if ! wait "$coord"; then
  tail -n 20 "$WORK/coordinator.log" >&2
  echo "coordinator failed" >&2
  exit 1
fi
for p in "${pids[@]:1}"; do wait "$p" || echo "a client exited with an error (see $WORK)" >&2; done
trap - EXIT
"$BIN/fedtiny-sim" report "$OUT/$NAME"
