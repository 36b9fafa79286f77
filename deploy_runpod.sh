#!/usr/bin/env bash
# deploy_runpod.sh user@host [SEED]
#
# Upload the submission to a (RunPod) machine over ssh, install requirements,
# start run.sh detached there, follow its output until the run prints its final
# line or exits, then copy the logs back into logs/ here.
#
# Environment (all optional):
#   PORT=22022            ssh port (-p for ssh, -P for scp)
#   KEY=~/.ssh/id_ed25519 identity file (-i)
#   REMOTE_DIR=/workspace/parameter-golf   remote directory (letters, digits, _ . / - only)
#   ENV_PASS="A=1 B=2"    extra NAME=VALUE pairs (whitespace separated, values without
#                         spaces) passed to run.sh on the remote
#   RUN_ID=name           run id (log is logs/<RUN_ID>.txt); default seed<SEED>_<timestamp>
#                         (a RUN_ID given in ENV_PASS is used when RUN_ID is unset)
#   SKIP_PIP=1            skip "pip install -r requirements.txt"
#   REMOTE_PIP=pip        pip command on the remote (e.g. "python3 -m pip")
#   FINAL_RE=regex        extended regex (no '/') of the run's final line; default: the quantized TTT
#                         line, or the quantized sliding-window line when ENV_PASS has
#                         TTT_ENABLED=0
#   FINAL_WAIT=120        seconds to wait for the process to exit after the final line
#   FOLLOW_RETRIES=20     reconnect attempts when the ssh connection drops while following
#   RETRY_SLEEP=10        seconds between reconnect attempts
#   TAIL_SLEEP=1          remote tail polling interval (seconds)
#   LOCAL_LOG_DIR=logs    where logs are copied back (default: logs/ next to this script)
#   SSH_OPTS="..."        extra ssh/scp options (default: accept-new host keys, keepalives)
#   SSH=ssh SCP=scp       ssh / scp commands (word-split; tests point these at shims)
#
# Exit status: 0 when the final line was seen, 1 on failure, 2 on bad usage, 130 on Ctrl-C.
# Once run.sh has started, the logs are copied back however this script ends (run failed, ssh
# dropped, Ctrl-C).  Ctrl-C here only stops following: the remote run keeps going (it is detached).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROG=$(basename "$0")

usage() {
    cat >&2 <<EOF
usage: $PROG user@host [SEED]
  Uploads train_gpt.py run.sh requirements.txt data/fineweb.py to REMOTE_DIR
  (default /workspace/parameter-golf) on the host, installs requirements, starts
  run.sh detached with SEED (default 1337) and ENV_PASS, follows the log and copies
  logs back to logs/.  Env: PORT KEY REMOTE_DIR ENV_PASS RUN_ID SKIP_PIP SSH SCP ...
  (see the header of this script).
EOF
    exit 2
}

die() { echo "$PROG: error: $*" >&2; exit 1; }
log() { echo "[$PROG] $*" >&2; }

# POSIX single-quote a string for the remote shell.
sq() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

[[ $# -ge 1 && $# -le 2 ]] || usage
HOST=$1
SEED_ARG=${2:-1337}
[[ $HOST =~ ^[A-Za-z0-9._-]+@[A-Za-z0-9._-]+$ ]] || { echo "$PROG: bad host '$HOST' (want user@host)" >&2; usage; }
[[ $SEED_ARG =~ ^[0-9]+$ ]] || { echo "$PROG: bad SEED '$SEED_ARG' (want a non-negative integer)" >&2; usage; }

REMOTE_DIR=${REMOTE_DIR:-/workspace/parameter-golf}
[[ $REMOTE_DIR =~ ^[A-Za-z0-9_./-]+$ ]] || die "REMOTE_DIR '$REMOTE_DIR' may only contain letters, digits, _ . / -"
LOCAL_LOG_DIR=${LOCAL_LOG_DIR:-$SCRIPT_DIR/logs}
FINAL_WAIT=${FINAL_WAIT:-120}
FOLLOW_RETRIES=${FOLLOW_RETRIES:-20}
RETRY_SLEEP=${RETRY_SLEEP:-10}
TAIL_SLEEP=${TAIL_SLEEP:-1}
REMOTE_PIP=${REMOTE_PIP:-pip}
for v in FINAL_WAIT FOLLOW_RETRIES RETRY_SLEEP; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer"
done
[[ $TAIL_SLEEP =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "TAIL_SLEEP must be a number"

# ---- env passed to run.sh -------------------------------------------------
env_pairs=()
pass_run_id=""
ttt_off=0
if [[ -n ${ENV_PASS:-} ]]; then
    read -r -a _pairs <<<"$ENV_PASS"
    for kv in "${_pairs[@]}"; do
        [[ $kv =~ ^([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] || die "ENV_PASS entry '$kv' is not NAME=VALUE"
        name=${BASH_REMATCH[1]}
        val=${BASH_REMATCH[2]}
        case $name in
            SEED) log "ignoring SEED in ENV_PASS: the SEED argument ($SEED_ARG) is used"; continue ;;
            RUN_ID) pass_run_id=$val; continue ;;
            TTT_ENABLED) [[ $val == 0 ]] && ttt_off=1 ;;
        esac
        env_pairs+=("$kv")
    done
fi
RUN_ID=${RUN_ID:-${pass_run_id:-seed${SEED_ARG}_$(date +%Y%m%d_%H%M%S)}}
[[ $RUN_ID =~ ^[A-Za-z0-9._-]+$ ]] || die "RUN_ID '$RUN_ID' may only contain letters, digits, _ . -"
env_pairs+=("SEED=$SEED_ARG" "RUN_ID=$RUN_ID")

if [[ -n ${FINAL_RE:-} ]]; then
    [[ $FINAL_RE != */* ]] || die "FINAL_RE may not contain '/'"
else
    if ((ttt_off)); then
        FINAL_RE='^final_[A-Za-z]+[0-9]+_sliding_window_exact '
    else
        FINAL_RE='^final_[A-Za-z]+[0-9]+_ttt_exact '
    fi
fi

# ---- ssh / scp -------------------------------------------------------------
read -r -a SSH_CMD <<<"${SSH:-ssh}"
read -r -a SCP_CMD <<<"${SCP:-scp}"
read -r -a EXTRA_OPTS <<<"${SSH_OPTS:--o StrictHostKeyChecking=accept-new -o ServerAliveInterval=30 -o ServerAliveCountMax=6}"
ssh_opts=("${EXTRA_OPTS[@]}")
scp_opts=("${EXTRA_OPTS[@]}")
if [[ -n ${PORT:-} ]]; then
    [[ $PORT =~ ^[0-9]+$ ]] || die "PORT must be a number"
    ssh_opts+=(-p "$PORT")
    scp_opts+=(-P "$PORT")
fi
if [[ -n ${KEY:-} ]]; then
    ssh_opts+=(-i "$KEY")
    scp_opts+=(-i "$KEY")
fi

rssh() { "${SSH_CMD[@]}" "${ssh_opts[@]}" "$HOST" "$1" </dev/null; }
rscp() { "${SCP_CMD[@]}" "${scp_opts[@]}" "$@" </dev/null; }

RD=$(sq "$REMOTE_DIR")
OUT_REL="logs/$RUN_ID.stdout.txt"
PID_REL="logs/$RUN_ID.pid"
EXIT_REL="logs/$RUN_ID.exit"
LOCAL_OUT="$LOCAL_LOG_DIR/$RUN_ID.stdout.txt"

# Copies the run's stdout and log into LOCAL_LOG_DIR, once (step 5, or the EXIT trap).
copied=0
copy_back() {
    ((copied)) && return 0
    copied=1
    mkdir -p "$LOCAL_LOG_DIR"
    rscp "$HOST:$REMOTE_DIR/$OUT_REL" "$LOCAL_LOG_DIR/" ||
        log "could not copy $OUT_REL (kept the followed copy)"
    if rscp "$HOST:$REMOTE_DIR/logs/$RUN_ID.txt" "$LOCAL_LOG_DIR/"; then
        log "log copied to $LOCAL_LOG_DIR/$RUN_ID.txt"
    else
        log "no remote logs/$RUN_ID.txt; using the stdout copy $LOCAL_OUT"
    fi
}

# ---- 1. upload ---------------------------------------------------------------
files=(train_gpt.py run.sh requirements.txt)
for f in "${files[@]}" data/fineweb.py; do
    [[ -f $SCRIPT_DIR/$f ]] || die "missing local file $SCRIPT_DIR/$f"
done
log "host $HOST  dir $REMOTE_DIR  seed $SEED_ARG  run_id $RUN_ID"
rssh "mkdir -p $RD/data $RD/logs" || die "ssh to $HOST failed"
(cd "$SCRIPT_DIR" && rscp "${files[@]}" "$HOST:$REMOTE_DIR/") || die "upload failed"
(cd "$SCRIPT_DIR" && rscp data/fineweb.py "$HOST:$REMOTE_DIR/data/") || die "upload of data/fineweb.py failed"
log "uploaded ${files[*]} data/fineweb.py"

# ---- 2. requirements -------------------------------------------------------
if [[ ${SKIP_PIP:-0} != 1 ]]; then
    log "installing requirements"
    rssh "cd $RD && $REMOTE_PIP install -r requirements.txt" || die "pip install failed on $HOST"
fi

# ---- 3. start run.sh detached ---------------------------------------------
env_q=""
for kv in "${env_pairs[@]}"; do env_q+=" $(sq "$kv")"; done
# The wrapper sh records its own pid (the one to watch) and run.sh's exit status.
start_cmd="cd $RD || exit 1; mkdir -p logs; rm -f $EXIT_REL $PID_REL; : > $OUT_REL; \
if command -v setsid >/dev/null 2>&1; then det=setsid; else det=; fi; \
env$env_q \$det nohup sh -c 'echo \$\$ > $PID_REL; bash run.sh; echo \$? > $EXIT_REL' > $OUT_REL 2>&1 < /dev/null & \
i=0; while [ ! -s $PID_REL ] && [ \$i -lt 100 ]; do sleep 0.1; i=\$((i+1)); done; cat $PID_REL"
pid_out=$(rssh "$start_cmd") || die "could not start run.sh on $HOST"
# from here on the logs come back however this script ends
trap copy_back EXIT
trap 'log "interrupted: the run goes on on $HOST; copying its logs so far"; exit 130' INT TERM
REMOTE_PID=$(printf '%s\n' "$pid_out" | tail -n 1 | tr -d '[:space:]')
[[ $REMOTE_PID =~ ^[0-9]+$ ]] || die "run.sh did not report a pid (got '$pid_out')"
log "run.sh started on $HOST, pid $REMOTE_PID; output -> $REMOTE_DIR/$OUT_REL"

# ---- 4. follow ---------------------------------------------------------------
mkdir -p "$LOCAL_LOG_DIR"
: >"$LOCAL_OUT"
FRE_Q=$(sq "/$FINAL_RE/q")
attempt=0
while :; do
    offset=$(wc -c <"$LOCAL_OUT" | tr -d '[:space:]')
    # tail feeds sed through a fifo so that sed stopping at the final line can
    # stop tail too (a plain pipe would keep tail, and ssh, alive until the
    # process exits); tail stops on its own when the process exits.  sed -u
    # reads line by line (awk may be mawk, which waits to fill its buffer).
    follow_cmd="cd $RD || exit 1; fifo=logs/.$RUN_ID.follow.\$\$; rm -f \$fifo; mkfifo \$fifo || exit 1; \
tail -s $TAIL_SLEEP -c +$((offset + 1)) --pid=$REMOTE_PID -f $OUT_REL > \$fifo 2>/dev/null < /dev/null & tp=\$!; \
sed -u -E $FRE_Q < \$fifo; st=\$?; \
kill \$tp 2>/dev/null; rm -f \$fifo; exit \$st"
    set +e
    rssh "$follow_cmd" | tee -a "$LOCAL_OUT"
    rc=${PIPESTATUS[0]}
    set -e
    if ((rc == 255)) && ((attempt < FOLLOW_RETRIES)); then
        attempt=$((attempt + 1))
        log "ssh dropped while following (attempt $attempt/$FOLLOW_RETRIES); reconnecting in ${RETRY_SLEEP}s"
        sleep "$RETRY_SLEEP"
        continue
    fi
    ((rc == 0)) || log "following ended with ssh status $rc"
    break
done

# Give the process a moment to finish writing logs after its final line.
state=$(rssh "i=0; while kill -0 $REMOTE_PID 2>/dev/null && [ \$i -lt $FINAL_WAIT ]; do sleep 1; i=\$((i+1)); done; \
if kill -0 $REMOTE_PID 2>/dev/null; then echo running; else echo exited; fi" 2>/dev/null || true)
still_running=0
[[ $state == *running* ]] && still_running=1

# ---- 5. copy logs back -----------------------------------------------------
copy_back
run_exit=$(rssh "cat $RD/$EXIT_REL 2>/dev/null" || true)
run_exit=$(printf '%s' "$run_exit" | tr -d '[:space:]')

final_seen=0
for f in "$LOCAL_LOG_DIR/$RUN_ID.txt" "$LOCAL_OUT"; do
    [[ -f $f ]] && grep -Eq -- "$FINAL_RE" "$f" && final_seen=1
done
if ((still_running)); then
    log "WARNING: run.sh (pid $REMOTE_PID) is still running on $HOST after the final line"
fi
if [[ -n $run_exit && $run_exit != 0 ]]; then
    log "run.sh exited with status $run_exit"
fi
if ((final_seen)); then
    log "done: final line seen; logs in $LOCAL_LOG_DIR ($RUN_ID.txt, $RUN_ID.stdout.txt)"
    exit 0
fi
log "FAILED: final line (/$FINAL_RE/) not seen; run.sh exit status '${run_exit:-unknown}'"
exit 1
