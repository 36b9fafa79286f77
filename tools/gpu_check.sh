#!/usr/bin/env bash
# Everything one GPU can tell us about train_gpt_human.py, in one call of at most 8 minutes (tools/gpu_check.py).
#
#   bash tools/gpu_check.sh OUT_DIR [gpu_check.py options]         full size on one CUDA GPU
#   bash tools/gpu_check.sh --cpu OUT_DIR [gpu_check.py options]   tiny size on the CPU (CI: the same code path)
#
# Full size first installs the wheels carried in .whl/ (brotli, flash-attn-4 and its dependencies), offline:
# `pip install --no-index --find-links .whl`, one wheel at a time, never the network; a wheel that fails is logged
# (OUT_DIR/install.log, OUT_DIR/install.tsv), not fatal.  Then writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md
# (the table) and OUT_DIR/logs/<part>.log.  Commits nothing.  Exit status: 0 all parts ok, 3 some part failed (the
# JSON says which and why), anything else: the check itself broke.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || exit 2
PY="${PYTHON:-python3}"
CPU=()
if [ "${1:-}" = "--cpu" ]; then
  CPU=(--cpu)
  shift
fi
OUT="${1:-$ROOT/.gpu_check}"
[ $# -gt 0 ] && shift
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2  # relative to the caller's directory
cd "$ROOT" || exit 2

if [ ${#CPU[@]} -eq 0 ] && compgen -G ".whl/*.whl" > /dev/null; then
  : > "$OUT/install.tsv"
  for whl in .whl/*.whl; do
    status=failed
    pip_args=(-m pip install --no-index --find-links .whl --disable-pip-version-check "$whl")
    echo "== $PY ${pip_args[*]}" >> "$OUT/install.log"
    if timeout 300 "$PY" "${pip_args[@]}" >> "$OUT/install.log" 2>&1; then
      status=ok
    elif tail -n 20 "$OUT/install.log" | grep -q externally-managed-environment \
        && timeout 300 "$PY" "${pip_args[@]}" --break-system-packages >> "$OUT/install.log" 2>&1; then
      status=ok  # a system Python (PEP 668) on a throwaway GPU box
    fi
    printf '%s\t%s\n' "$(basename "$whl")" "$status" >> "$OUT/install.tsv"
    echo "[gpu_check] install $(basename "$whl"): $status"
  done
fi

exec "$PY" tools/gpu_check.py ${CPU[@]+"${CPU[@]}"} --out "$OUT" "$@"
