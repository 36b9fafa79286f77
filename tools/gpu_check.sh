#!/usr/bin/env bash
# The one-GPU check (tools/gpu_check.py): train_gpt.py itself, short, part by part, in one call of at most 8 minutes.
#   bash tools/gpu_check.sh OUT [gpu_check.py options]         full size on one CUDA GPU
#   bash tools/gpu_check.sh --cpu OUT [gpu_check.py options]   a tiny model on the CPU (CI: the same driver)
# First the wheels in .whl/ (brotli; FlashAttention-3 when a wheel fits): their sizes and total against the 64 MiB a
# device call can carry (over it: exit 2 before anything starts); at full size they are installed offline, one at a
# time, never from the network; a failure is logged (OUT/install.log, OUT/install.tsv), not fatal.  OUT/compile_cache
# (every part's compile caches) is removed at the end unless GPU_CHECK_KEEP_CACHE=1, so what a call brings back stays
# small.  Exit 0: every part ok or skipped; 3: some part failed or timed out (OUT/gpu_check.json says why); else broken.
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

CARRY_LIMIT=$((64 * 1024 * 1024))
if compgen -G ".whl/*.whl" > /dev/null; then
  total=0
  for whl in .whl/*.whl; do
    size=$(stat -c %s "$whl")
    total=$((total + size))
    awk -v n="$(basename "$whl")" -v s="$size" 'BEGIN { printf "[gpu_check] wheel %-64s %8.1f MiB\n", n, s / 1048576 }'
  done
  awk -v s="$total" 'BEGIN { printf "[gpu_check] wheels total %.1f MiB of the 64 MiB a call carries\n", s / 1048576 }'
  if [ "$total" -gt "$CARRY_LIMIT" ]; then
    echo "[gpu_check] error: .whl/ is over the 64 MiB a device call can carry; drop wheels before the call" >&2
    exit 2
  fi
  if [ ${#CPU[@]} -eq 0 ]; then
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
fi

"$PY" tools/gpu_check.py ${CPU[@]+"${CPU[@]}"} --out "$OUT" "$@"
rc=$?
[ "${GPU_CHECK_KEEP_CACHE:-0}" = 1 ] || rm -rf "$OUT/compile_cache"
exit $rc
