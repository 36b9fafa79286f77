#!/usr/bin/env bash
# deploy_3seeds.sh user@host
#
# Run deploy_runpod.sh for seeds 42, 1337 and 2025 in turn (same host, same
# env: PORT, KEY, REMOTE_DIR, ENV_PASS, SSH, SCP, ...), then summarize the three
# logs with tools/summarize_logs.py.
#
# Extra environment (all optional):
#   SEEDS="42 1337 2025"   seeds to run
#   RUN_PREFIX=name        run ids are <RUN_PREFIX>_seed<SEED>; default pg_<timestamp>
#   BASELINE_LOSS=x        pass --baseline-loss x to the summary (significance test)
#   SUMMARY_ARGS="..."     extra summary arguments (word-split), e.g. "--name X --author Y"
#   PYTHON=python3         python used for the summary
# Outputs in logs/: <RUN_PREFIX>_seed<SEED>.txt (+ .stdout.txt), <RUN_PREFIX>_summary.txt,
# <RUN_PREFIX>_submission.json, <RUN_PREFIX>_curves.png.  The top-level submission.json
# is never overwritten; copy the generated one over it once the real runs are in.
# pip install runs only before the first seed (set SKIP_PIP=1 to skip it entirely).
# Exit status: 0 if every seed finished, 1 otherwise, 2 on bad usage.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROG=$(basename "$0")

usage() {
    echo "usage: $PROG user@host   (runs deploy_runpod.sh for seeds \${SEEDS:-42 1337 2025}, then summarizes)" >&2
    exit 2
}

[[ $# -eq 1 ]] || usage
HOST=$1
[[ $HOST =~ ^[A-Za-z0-9._-]+@[A-Za-z0-9._-]+$ ]] || { echo "$PROG: bad host '$HOST' (want user@host)" >&2; usage; }

read -r -a seeds <<<"${SEEDS:-42 1337 2025}"
((${#seeds[@]} > 0)) || usage
RUN_PREFIX=${RUN_PREFIX:-pg_$(date +%Y%m%d_%H%M%S)}
[[ $RUN_PREFIX =~ ^[A-Za-z0-9._-]+$ ]] || { echo "$PROG: bad RUN_PREFIX '$RUN_PREFIX'" >&2; exit 2; }
LOG_DIR=${LOCAL_LOG_DIR:-$SCRIPT_DIR/logs}
PYTHON=${PYTHON:-python3}
mkdir -p "$LOG_DIR"

failed=()
logs=()
skip_pip=${SKIP_PIP:-0}
for seed in "${seeds[@]}"; do
    run_id="${RUN_PREFIX}_seed${seed}"
    echo "[$PROG] ===== seed $seed (run id $run_id) =====" >&2
    if RUN_ID=$run_id SKIP_PIP=$skip_pip LOCAL_LOG_DIR=$LOG_DIR "$SCRIPT_DIR/deploy_runpod.sh" "$HOST" "$seed"; then
        :
    else
        rc=$?
        ((rc == 2)) && exit 2
        failed+=("$seed")
        echo "[$PROG] seed $seed failed (status $rc)" >&2
    fi
    skip_pip=1
    if [[ -f $LOG_DIR/$run_id.txt ]]; then
        logs+=("$LOG_DIR/$run_id.txt")
    elif [[ -s $LOG_DIR/$run_id.stdout.txt ]]; then
        logs+=("$LOG_DIR/$run_id.stdout.txt")
    fi
done

if ((${#logs[@]} == 0)); then
    echo "[$PROG] no logs came back; nothing to summarize" >&2
    exit 1
fi

summary_args=(--plot "$LOG_DIR/${RUN_PREFIX}_curves.png" --json "$LOG_DIR/${RUN_PREFIX}_submission.json")
[[ -n ${BASELINE_LOSS:-} ]] && summary_args+=(--baseline-loss "$BASELINE_LOSS")
if [[ -n ${SUMMARY_ARGS:-} ]]; then
    read -r -a extra <<<"$SUMMARY_ARGS"
    summary_args+=("${extra[@]}")
fi
echo "[$PROG] ===== summary of ${#logs[@]} log(s) =====" >&2
"$PYTHON" "$SCRIPT_DIR/tools/summarize_logs.py" "${logs[@]}" "${summary_args[@]}" |
    tee "$LOG_DIR/${RUN_PREFIX}_summary.txt"

if ((${#failed[@]} > 0)); then
    echo "[$PROG] seeds that did not finish: ${failed[*]}" >&2
    exit 1
fi
