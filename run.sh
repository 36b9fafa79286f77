#!/usr/bin/env bash
# Launch the submission.
#
#   bash run.sh                 GPU pod: preflight checks, fetch data if missing, then
#                               torchrun --standalone --nproc_per_node=$NPROC train_gpt.py
#                               (output tee'd to logs/run_<timestamp>.log)
#   SMOKE=1 bash run.sh         whole pipeline on CPU with a tiny model (no GPU, no network)
#   PREFLIGHT_ONLY=1 bash run.sh
#                               GPU checks only
#
# Settings (environment): PRESET=seed|record (passed to the trainer; record defaults VARIANT to sp8192_caseops
# when that data is already in data/datasets, else to sp8192),
# VARIANT=sp1024|sp8192|sp8192_caseops (data/tokenizer family, default sp1024; sp8192_caseops is the
# lossless-case export with its validation byte sidecar fineweb_val_bytes_*.bin),
# DATA_CHECK (default 1: before training, `data/fineweb.py check` validates every shard and stops the run
# if a validation document occurs in a training shard; 0 skips it), CHECK_MAX_LEAKED (default 0),
# TRAIN_SHARDS (default 80), NPROC (default: number of visible GPUs), PYTHON (default python3),
# TRAIN_SCRIPT (default train_gpt.py, else train_gpt_human.py), MIN_FREE_MB (default 2048),
# FINEWEB_MIRROR (copy data from this local folder laid out like the HF repo instead of downloading).
# SMOKE_DIR (default data/smoke), SMOKE_DOCS / SMOKE_TOKENIZER (default: ../shared corpus and
# tokenizer when present, else generated offline), SMOKE_MAX_DOCS (400), SMOKE_VAL_DOCS (50).
# Every other variable (SEED, RUN_ID, ITERATIONS, ...) is passed through to the trainer unchanged.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$(pwd)

PYTHON_GIVEN=${PYTHON:+1}
PYTHON=${PYTHON:-python3}
PRESET=${PRESET:-seed}
CASEOPS_DIR=./data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved
if [[ $PRESET != record ]]; then
    VARIANT=${VARIANT:-sp1024}
elif [[ -z ${VARIANT:-} ]] && compgen -G "$CASEOPS_DIR/fineweb_val_bytes_*.bin" >/dev/null; then
    VARIANT=sp8192_caseops # the record's data, when it is here (download it with VARIANT=sp8192_caseops)
else
    VARIANT=${VARIANT:-sp8192}
fi
TRAIN_SHARDS=${TRAIN_SHARDS:-80}
MIN_FREE_MB=${MIN_FREE_MB:-2048}
SHARD_MB=200 # one challenge train shard: 100M uint16 tokens
TS=$(date +%Y%m%d_%H%M%S)

info() { echo "run.sh: $*"; }
warn() { echo "run.sh: warning: $*" >&2; }
die() {
    echo "run.sh: preflight failed: $*" >&2
    exit 1
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# ---------------------------------------------------------------- shared checks
check_python() {
    command -v "$PYTHON" >/dev/null 2>&1 || die "Python interpreter '$PYTHON' not found (set PYTHON=...)"
    "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' ||
        die "Python >= 3.10 required, '$PYTHON' is $("$PYTHON" -V 2>&1)"
}

# ensure_module IMPORT_NAME [PIP_NAME]: pip install the package when the import fails.
ensure_module() {
    local mod=$1 pkg=${2:-$1}
    if ! "$PYTHON" -c "import $mod" >/dev/null 2>&1; then
        info "python module '$mod' missing: pip install $pkg"
        "$PYTHON" -m pip install -q "$pkg" || die "pip install $pkg failed"
        "$PYTHON" -c "import $mod" >/dev/null 2>&1 || die "'import $mod' still fails after pip install $pkg"
    fi
}

free_mb() { df -Pm "$1" | awk 'NR == 2 { print $4 }'; }

check_disk() {
    local need=$1 free
    free=$(free_mb "$ROOT")
    is_uint "$free" || die "could not read free disk space of $ROOT"
    if ((free < need)); then
        die "only ${free} MB free on the disk of $ROOT, need at least ${need} MB"
    fi
    info "disk: ${free} MB free (need ${need} MB)"
}

pick_train_script() {
    TRAIN_SCRIPT=${TRAIN_SCRIPT:-train_gpt.py}
    if [[ ! -f $TRAIN_SCRIPT ]]; then
        if [[ $TRAIN_SCRIPT == train_gpt.py && -f train_gpt_human.py ]]; then
            warn "train_gpt.py not found, using train_gpt_human.py"
            TRAIN_SCRIPT=train_gpt_human.py
        else
            die "training script $TRAIN_SCRIPT not found"
        fi
    fi
}

# export_default NAME VALUE: export NAME=VALUE unless NAME is already set in the environment.
export_default() {
    local name=$1 value=$2
    if [[ -z ${!name+x} ]]; then
        export "$name=$value"
    else
        export "${name?}"
    fi
}

# shard_count DIR SPLIT: number of fineweb_SPLIT_NNNNNN.bin files in DIR (SPLIT train, val or val_bytes;
# val does not count the byte sidecars fineweb_val_bytes_NNNNNN.bin).
shard_count() {
    local files
    shopt -s nullglob
    files=("$1"/fineweb_"$2"_[0-9]*.bin)
    shopt -u nullglob
    echo "${#files[@]}"
}

# check_shards DIR [ARGS...]: shard validation + the validation/train leak guard (data/fineweb.py check).
check_shards() {
    local dir=$1
    shift
    if [[ ${DATA_CHECK:-1} == 0 ]]; then
        warn "DATA_CHECK=0: not checking $dir for validation documents inside training shards"
        return
    fi
    local max_leaked=${CHECK_MAX_LEAKED:-0}
    is_uint "$max_leaked" || die "CHECK_MAX_LEAKED must be a non-negative integer, got '$max_leaked'"
    info "checking $dir: shard headers, token ids, validation docs inside training shards"
    "$PYTHON" data/fineweb.py check "$dir" --max-leaked "$max_leaked" "$@" ||
        die "data check of $dir failed (see above): a validation document inside a training shard makes" \
            "val_bpb meaningless; rebuild the data (python3 data/fineweb.py build, default --val-docs 50000)" \
            "or download it again (DATA_CHECK=0 skips this check)"
}

# ---------------------------------------------------------------- CPU smoke run
smoke() {
    info "SMOKE=1: CPU smoke run of the whole pipeline"
    check_python
    ensure_module numpy
    ensure_module sentencepiece
    ensure_module brotli
    "$PYTHON" -c 'import torch' >/dev/null 2>&1 || die "torch is not importable by $PYTHON (pip install torch)"
    pick_train_script

    local dir=${SMOKE_DIR:-data/smoke} shared
    shared="$(cd "$ROOT/.." && pwd)/shared"
    local docs=${SMOKE_DOCS:-$shared/corpus/docs_en.jsonl.xz}
    local tok=${SMOKE_TOKENIZER:-$shared/tokenizers/fineweb_1024_bpe.model}
    local max_docs=${SMOKE_MAX_DOCS:-400} val_docs=${SMOKE_VAL_DOCS:-50}
    mkdir -p "$dir"
    if [[ ! -f $docs ]]; then
        docs=$dir/pydoc_docs.jsonl
        info "no shared corpus: using offline pydoc text ($docs)"
        [[ -s $docs ]] || "$PYTHON" data/fineweb.py pydoc-corpus --out "$docs"
    fi
    if [[ ! -f $tok ]]; then
        tok=$dir/tokenizer/smoke_1024_bpe.model
        info "no shared tokenizer: training a 1024-piece SentencePiece BPE model ($tok)"
        [[ -s $tok ]] || "$PYTHON" data/fineweb.py train-tokenizer --docs "$docs" \
            --out "${tok%.model}" --vocab-size 1024 --max-docs "$max_docs"
    fi
    local data="$dir/datasets/fineweb10B_sp1024"
    "$PYTHON" data/fineweb.py build --docs "$docs" --tokenizer "$tok" --out "$data" \
        --val-docs "$val_docs" --max-docs "$max_docs" --shard-tokens 1000000
    check_shards "$data" --vocab-size 1024 # a second or so on the smoke data

    export DATA_PATH=$data TOKENIZER_PATH=$tok VOCAB_SIZE=1024
    export_default RUN_ID "smoke_$TS"
    export_default DEVICE cpu
    if [[ ${PRESET:-seed} == record ]]; then # the record's recurrence and parallel lanes, scaled to 4 layers
        export_default NUM_LAYERS 4
        export_default LOOP_START 1
        export_default LOOP_END 2
        export_default PARALLEL_START 3
    else
        export_default ENGRAM_BUCKETS 512
        export_default VE_DIM 32
    fi
    export_default NUM_LAYERS 2
    export_default MODEL_DIM 64
    export_default NUM_HEADS 4
    export_default NUM_KV_HEADS 2
    export_default MLP_MULT 2
    export_default TRAIN_SEQ_LEN 128
    export_default EVAL_SEQ_LEN 128
    export_default TRAIN_BATCH_TOKENS 4096
    export_default GRAD_ACCUM_STEPS 1
    export_default EMA_DECAY 0.9
    export_default TRAIN_LOG_EVERY 10
    export_default ITERATIONS 60
    export_default WARMUP_STEPS 2
    export_default WARMDOWN_ITERS 20
    export_default EVAL_STRIDE 64
    export_default MAX_WALLCLOCK_SECONDS 0
    export_default TTT_CHUNK_TOKENS 4096
    export_default GPTQ_CALIB_BATCHES 4
    export_default VAL_MAX_TOKENS 65536

    mkdir -p logs
    local log="logs/smoke_$TS.log" rc=0
    info "running $PYTHON $TRAIN_SCRIPT (tiny CPU config), log: $log"
    "$PYTHON" "$TRAIN_SCRIPT" 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}
    if ((rc != 0)); then
        echo "run.sh: smoke run failed (exit $rc), see $log" >&2
        exit "$rc"
    fi
    info "smoke run OK, log: $log"
}

# ---------------------------------------------------------------- GPU preflight
check_gpus() {
    command -v nvidia-smi >/dev/null 2>&1 ||
        die "nvidia-smi not found: no NVIDIA driver on this machine (SMOKE=1 bash run.sh runs a CPU smoke test)"
    local out rc=0 names visible
    out=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>&1) || rc=$?
    if ((rc != 0)) && ! grep -qi 'no devices' <<<"$out"; then
        die "nvidia-smi failed (exit $rc): $(head -n 1 <<<"$out")"
    fi
    names=$(grep -vi -e 'no devices' -e '^[[:space:]]*$' <<<"$out" || true)
    GPU_COUNT=$(grep -c . <<<"$names" || true)
    if ((GPU_COUNT == 0)); then
        die "nvidia-smi reports 0 GPUs (need at least 1; SMOKE=1 bash run.sh runs a CPU smoke test)"
    fi
    visible=$GPU_COUNT
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        visible=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . || true)
        ((visible <= GPU_COUNT)) || visible=$GPU_COUNT
    fi
    info "GPUs: $(sort <<<"$names" | uniq -c | sed -e 's/^ *//' -e 's/ / x /' | paste -sd ',' -)" \
        "($visible visible)"
    grep -q 'H100' <<<"$names" || warn "no H100 found: timings will not match the challenge's 8xH100 reference"

    NPROC=${NPROC:-$visible}
    if ! is_uint "$NPROC" || ((NPROC < 1)); then
        die "NPROC must be a positive integer, got '$NPROC'"
    fi
    ((NPROC <= visible)) || die "NPROC=$NPROC but only $visible GPU(s) visible"
    ((NPROC == 8)) || warn "NPROC=$NPROC: the challenge's reference run uses 8 GPUs"
}

check_torch_cuda() {
    local out
    out=$("$PYTHON" - 2>&1 <<'EOF'
import sys
try:
    import torch
except Exception as e:
    print(f"torch is not importable: {e}")
    sys.exit(1)
if not torch.cuda.is_available():
    print(f"torch {torch.__version__} cannot use CUDA (torch.cuda.is_available() is False; CPU-only build or driver mismatch)")
    sys.exit(1)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)")
EOF
    ) || die "$(tail -n 1 <<<"$out")"
    info "$out"
}

check_data() {
    local vocab dataset tokenizer sidecar=0
    case $VARIANT in
    sp1024) vocab=1024 dataset=fineweb10B_sp1024 tokenizer=fineweb_1024_bpe ;;
    sp8192) vocab=8192 dataset=fineweb10B_sp8192 tokenizer=fineweb_8192_bpe ;;
    sp8192_caseops)
        vocab=8192 sidecar=1
        dataset=fineweb10B_sp8192_lossless_caps_caseops_v1_reserved
        tokenizer=fineweb_8192_bpe_lossless_caps_caseops_v1_reserved
        ;;
    *) die "VARIANT must be sp1024 or sp8192 (or sp8192_caseops), got '$VARIANT'" ;;
    esac
    is_uint "$TRAIN_SHARDS" || die "TRAIN_SHARDS must be a non-negative integer, got '$TRAIN_SHARDS'"
    local default_data="./data/datasets/$dataset"
    local default_tok="./data/tokenizers/$tokenizer.model"
    export_default DATA_PATH "$default_data"
    export_default TOKENIZER_PATH "$default_tok"
    export_default VOCAB_SIZE "$vocab"
    local check_args=(--vocab-size "$VOCAB_SIZE")
    ((sidecar == 0)) || check_args+=(--require-sidecar)

    local n_train n_val n_bytes want_train
    n_train=$(shard_count "$DATA_PATH" train)
    n_val=$(shard_count "$DATA_PATH" val)
    n_bytes=$(shard_count "$DATA_PATH" val_bytes)
    want_train=$((TRAIN_SHARDS > 0 ? TRAIN_SHARDS : 1))
    if ((n_val >= 1 && n_train >= want_train && (sidecar == 0 || n_bytes >= n_val))) &&
        [[ -f $TOKENIZER_PATH ]]; then
        info "data: $n_train train + $n_val val shards in $DATA_PATH, tokenizer $TOKENIZER_PATH"
        check_shards "$DATA_PATH" "${check_args[@]}"
        return
    fi
    if [[ $DATA_PATH != "$default_data" || $TOKENIZER_PATH != "$default_tok" ]]; then
        ((n_val >= 1 && n_train >= 1)) || die "no fineweb_train/val shards in DATA_PATH=$DATA_PATH"
        ((sidecar == 0 || n_bytes >= n_val)) ||
            die "VARIANT=$VARIANT needs the byte sidecar fineweb_val_bytes_*.bin beside the val shards in" \
                "DATA_PATH=$DATA_PATH ($n_bytes for $n_val val shards)"
        [[ -f $TOKENIZER_PATH ]] || die "tokenizer not found: TOKENIZER_PATH=$TOKENIZER_PATH"
        info "data: $n_train train + $n_val val shards in $DATA_PATH (custom path, not downloading)"
        check_shards "$DATA_PATH" "${check_args[@]}"
        return
    fi

    info "data incomplete ($n_train/$TRAIN_SHARDS train, $n_val val shards, tokenizer" \
        "$([[ -f $TOKENIZER_PATH ]] && echo present || echo missing)): downloading $VARIANT"
    local missing=$((TRAIN_SHARDS > n_train ? TRAIN_SHARDS - n_train : 0))
    ((n_val >= 1)) || missing=$((missing + 1))
    check_disk $((MIN_FREE_MB + missing * SHARD_MB))
    [[ -n ${FINEWEB_MIRROR:-} ]] || ensure_module huggingface_hub
    "$PYTHON" data/fineweb.py download --variant "$VARIANT" --train-shards "$TRAIN_SHARDS" ||
        die "data download failed (python3 data/fineweb.py download --variant $VARIANT --train-shards $TRAIN_SHARDS)"
    n_train=$(shard_count "$DATA_PATH" train)
    n_val=$(shard_count "$DATA_PATH" val)
    n_bytes=$(shard_count "$DATA_PATH" val_bytes)
    ((n_val >= 1 && n_train >= want_train)) || die "after download: $n_train train / $n_val val shards in $DATA_PATH"
    ((sidecar == 0 || n_bytes >= n_val)) || die "after download: $n_bytes byte sidecar(s) for $n_val val shards in $DATA_PATH"
    [[ -f $TOKENIZER_PATH ]] || die "after download: tokenizer $TOKENIZER_PATH missing"
    info "data: $n_train train + $n_val val shards in $DATA_PATH, tokenizer $TOKENIZER_PATH"
    check_shards "$DATA_PATH" "${check_args[@]}"
}

gpu_run() {
    check_gpus
    check_python
    ensure_module numpy
    ensure_module sentencepiece
    ensure_module brotli
    check_torch_cuda
    "$PYTHON" -c 'import flash_attn_interface' >/dev/null 2>&1 ||
        warn "flash_attn_interface (FlashAttention 3) does not import:" \
            "attention runs on compiled flex_attention / PyTorch SDPA (slower)"
    check_data
    check_disk "$MIN_FREE_MB"
    pick_train_script
    if [[ -n ${PREFLIGHT_ONLY:-} && ${PREFLIGHT_ONLY:-} != 0 ]]; then
        info "preflight OK (PREFLIGHT_ONLY set, not training)"
        return
    fi

    local launcher=()
    if [[ -z $PYTHON_GIVEN ]] && command -v torchrun >/dev/null 2>&1; then
        launcher=(torchrun)
    else
        launcher=("$PYTHON" -m torch.distributed.run)
    fi
    mkdir -p logs
    export_default RUN_ID "run_$TS" # the trainer's logs/<RUN_ID>.txt sits beside this launch log
    # TTT's shapes change every step: expandable segments keep the allocator from fragmenting
    export_default PYTORCH_CUDA_ALLOC_CONF expandable_segments:True
    # compiled kernels kept beside the repo: a second seed on the same pod (deploy_3seeds.sh) compiles from the cache
    export_default TORCHINDUCTOR_CACHE_DIR "$PWD/.compile_cache/inductor"
    export_default TRITON_CACHE_DIR "$PWD/.compile_cache/triton"
    local log="logs/run_$TS.log" rc=0
    info "launching ${launcher[*]} --standalone --nproc_per_node=$NPROC $TRAIN_SCRIPT, log: $log"
    "${launcher[@]}" --standalone --nproc_per_node="$NPROC" "$TRAIN_SCRIPT" 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}
    if ((rc != 0)); then
        echo "run.sh: training failed (exit $rc), see $log" >&2
        exit "$rc"
    fi
    info "done, log: $log"
}

if [[ -n ${SMOKE:-} && ${SMOKE:-} != 0 ]]; then
    smoke
else
    gpu_run
fi
