#!/usr/bin/env bash
# deploy_3seeds.sh user@host
#
# Run deploy_runpod.sh for seeds 42, 1337 and 2025 in turn (same host, same
# env: PORT, KEY, REMOTE_DIR, ENV_PASS, SSH, SCP, ...), then summarize the
# logs with tools/summarize_logs.py and, when every seed finished, build the
# records folder with its checklist (summarize_logs.py --records-dir).
# A failed seed does not stop the others; the summary marks it FAILED and
# leaves it out of the mean, and the records folder is not built.
#
# Extra environment (all optional):
#   SEEDS="42 1337 2025"   seeds to run
#   RUN_PREFIX=name        run ids are <RUN_PREFIX>_seed<SEED>; default pg_<timestamp>
#   BASELINE_LOSS=x        pass --baseline-loss x to the summary (significance test)
#   SUMMARY_ARGS="..."     extra summary arguments (word-split), e.g. "--baseline-logs a.txt b.txt"
#   PYTHON=python3         python used for the summary
#   RECORDS=0              do not build the records folder
#   RECORD_DIR=dir         the records folder; default records/track_10min_16mb/<date>_<RUN_PREFIX>
#   RECORD_NAME, RECORD_AUTHOR, RECORD_GITHUB_ID, RECORD_BLURB, RECORD_HARDWARE
#                          --name, --author, --github-id, --blurb (also for the summary's json)
#                          and --hardware of the records folder (spaces allowed)
#   RECORD_ARGS="..."      extra records arguments (word-split), e.g. "--allow val_tokens --val-tokens N"
# Outputs in logs/: <RUN_PREFIX>_seed<SEED>.txt (+ .stdout.txt), <RUN_PREFIX>_summary.txt,
# <RUN_PREFIX>_submission.json, <RUN_PREFIX>_curves.png.  The top-level submission.json
# is never overwritten; the records folder holds the submission's own.
# pip install runs before the first seed that starts (set SKIP_PIP=1 to skip it entirely).
# Exit status: 0 if every seed finished and the records folder was built (or RECORDS=0),
# 1 otherwise, 2 on bad usage, 130 on Ctrl-C.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROG=$(basename "$0")

usage() {
    echo "usage: $PROG user@host   (runs deploy_runpod.sh for seeds \${SEEDS:-42 1337 2025}, then summarizes" \
        "and builds the records folder)" >&2
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
        ((rc == 2 || rc == 130)) && exit "$rc"
        failed+=("$seed")
        echo "[$PROG] seed $seed failed (status $rc); going on with the next seed" >&2
    fi
    # requirements are in once a run has started (deploy_runpod.sh writes its stdout copy then)
    [[ -e $LOG_DIR/$run_id.stdout.txt ]] && skip_pip=1
    if [[ -f $LOG_DIR/$run_id.txt ]]; then
        logs+=("$LOG_DIR/$run_id.txt")
    elif [[ -s $LOG_DIR/$run_id.stdout.txt ]]; then
        logs+=("$LOG_DIR/$run_id.stdout.txt")
    fi
done

if ((${#logs[@]} == 0)); then
    echo "[$PROG] no logs came back; nothing to summarize; seeds that did not finish: ${failed[*]}" >&2
    exit 1
fi

meta_args=()
[[ -n ${RECORD_NAME:-} ]] && meta_args+=(--name "$RECORD_NAME")
[[ -n ${RECORD_AUTHOR:-} ]] && meta_args+=(--author "$RECORD_AUTHOR")
[[ -n ${RECORD_GITHUB_ID:-} ]] && meta_args+=(--github-id "$RECORD_GITHUB_ID")
[[ -n ${RECORD_BLURB:-} ]] && meta_args+=(--blurb "$RECORD_BLURB")
[[ -n ${BASELINE_LOSS:-} ]] && meta_args+=(--baseline-loss "$BASELINE_LOSS")
if [[ -n ${SUMMARY_ARGS:-} ]]; then
    read -r -a extra <<<"$SUMMARY_ARGS"
    meta_args+=("${extra[@]}")
fi
summary_args=(--plot "$LOG_DIR/${RUN_PREFIX}_curves.png" --json "$LOG_DIR/${RUN_PREFIX}_submission.json")
((${#failed[@]} > 0)) && summary_args+=(--failed-seeds "${failed[@]}")
echo "[$PROG] ===== summary of ${#logs[@]} log(s) =====" >&2
if ! "$PYTHON" "$SCRIPT_DIR/tools/summarize_logs.py" "${logs[@]}" "${meta_args[@]}" "${summary_args[@]}" |
    tee "$LOG_DIR/${RUN_PREFIX}_summary.txt"; then
    echo "[$PROG] the summary failed (see above)" >&2
    exit 1
fi

if ((${#failed[@]} > 0)); then
    echo "[$PROG] seeds that did not finish: ${failed[*]}; the records folder is not built." >&2
    echo "[$PROG] rerun them with SEEDS=\"${failed[*]}\" and a fresh RUN_PREFIX (a reused run id appends to its" \
        "old log), then build the folder from the finished logs: python3 tools/summarize_logs.py LOGS..." \
        "--records-dir DIR (README: When a run fails)" >&2
    exit 1
fi
[[ ${RECORDS:-1} == 0 ]] && exit 0

record_dir=${RECORD_DIR:-$SCRIPT_DIR/records/track_10min_16mb/$(date +%Y-%m-%d)_$RUN_PREFIX}
record_args=(--records-dir "$record_dir")
[[ -n ${RECORD_HARDWARE:-} ]] && record_args+=(--hardware "$RECORD_HARDWARE")
if [[ -n ${RECORD_ARGS:-} ]]; then
    read -r -a extra <<<"$RECORD_ARGS"
    record_args+=("${extra[@]}")
fi
echo "[$PROG] ===== records folder $record_dir =====" >&2
if "$PYTHON" "$SCRIPT_DIR/tools/summarize_logs.py" "${logs[@]}" "${meta_args[@]}" "${record_args[@]}" \
    >"$LOG_DIR/${RUN_PREFIX}_records.txt"; then
    grep -E '^(check |wrote |note: )' "$LOG_DIR/${RUN_PREFIX}_records.txt" >&2
    echo "[$PROG] records folder built: $record_dir" >&2
else
    grep -E '^(check |records folder |note: )' "$LOG_DIR/${RUN_PREFIX}_records.txt" >&2 || true
    echo "[$PROG] the records folder was not built (the checklist above; full output in" \
        "$LOG_DIR/${RUN_PREFIX}_records.txt)" >&2
    exit 1
fi
