#!/usr/bin/env bash
# The benchmarks that are run on a lent GPU machine, in one command (device time is
# scarce). Runs from the repository root with the machine's own python3 (which must
# hold jax with its GPU plugin, equinox, optimistix, lineax, jaxtyping and diffrax);
# diffeqx is taken from src/. Each benchmark's full output goes to $OUT/<name>.txt.
#
#     OUT=/tmp/gpu bash benchmarks/device_suite.sh [NAME ...]
#
# NAME: any of sde core backward eager adjoint events cde batch (default: sde, core
# and backward, which fit one 10-minute call). Each has its own time limit so that
# one slow case cannot take the others'. Seen on an H200 (2026-12-04, a fresh
# machine): sde took 137-138 s; core, backward and adjoint ran out of 130, 80 and
# 200 s (the limits below are raised from those).
set -u
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/device-suite}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
"$PY" -c "import jax, diffrax, equinox; print('jax', jax.__version__, jax.devices(), 'diffrax', diffrax.__version__, 'equinox', equinox.__version__)"

run() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "=== $name (limit ${limit} s)"
    timeout "$limit" "$PY" "$@" >"$OUT/$name.txt" 2>&1
    echo "=== $name: exit $? after $((SECONDS - start)) s"
}

names=("$@")
[ ${#names[@]} -eq 0 ] && names=(sde core backward)
for name in "${names[@]}"; do
    case $name in
        sde) run sde 150 benchmarks/bench_sde.py ;;
        core) run core 220 benchmarks/bench_core.py --compile-repeats 1 ;;
        backward) run backward 150 benchmarks/bench_backward.py ;;
        adjoint) run adjoint 300 benchmarks/bench_adjoint.py --compile-repeats 1 ;;
        eager) run eager 70 benchmarks/bench_eager.py --repeats 10 ;;
        cde) run cde 110 benchmarks/bench_cde.py --compile-repeats 1 ;;
        events) run events 60 benchmarks/bench_events.py ;;
        batch) run batch 40 benchmarks/bench_batch.py --compile-repeats 1 ;;
        *) echo "unknown benchmark: $name" >&2 ;;
    esac
done
