#!/usr/bin/env bash
# GPU smoke test: traces -> distill -> ensemble -> eval on llava-next-bench, on CUDA (bf16, and fp32
# for a tight comparison) under torchrun on every visible GPU, checked against the same pipeline on
# CPU fp32.  Installs what the machine lacks from bench/wheels first.  See docs/gpu-smoke.md.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    cat <<'EOF'
Usage: bench/gpu_smoke.sh [--examples N] [--prompts K] [--backbone NAME] [--out DIR] [--device cpu] [--no-install]
       bench/gpu_smoke.sh --fill-wheels [--python-version 3.11] [--platform manylinux2014_x86_64]

  --examples N      synthetic-charts examples per pipeline (default 8)
  --prompts K       pack prompts traced and distilled (default 2)
  --backbone NAME   registered backbone (default llava-next-bench; llava-next-tiny for a quick dry run)
  --out DIR         where the pipelines write (default: a new folder under /tmp)
  --device cpu      dry run without a GPU: the torchrun pipeline runs 2 CPU processes in fp32
  --no-install      skip installing from bench/wheels (sdrt is already installed)
  --fill-wheels     download into bench/wheels what a machine with torch, transformers and peft
                    lacks (run where the internet is reachable; match the GPU machine's python)
EOF
}

EXAMPLES=8
PROMPTS=2
BACKBONE=llava-next-bench
OUT=""
DEVICE=cuda
INSTALL=1
FILL=0
PY_VERSION=""
PLATFORM=""
WHEELS=bench/wheels

while [ $# -gt 0 ]; do
    case "$1" in
        --examples) EXAMPLES=$2; shift 2 ;;
        --prompts) PROMPTS=$2; shift 2 ;;
        --backbone) BACKBONE=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --device) DEVICE=$2; shift 2 ;;
        --no-install) INSTALL=0; shift ;;
        --fill-wheels) FILL=1; shift ;;
        --python-version) PY_VERSION=$2; shift 2 ;;
        --platform) PLATFORM=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_smoke.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

if [ "$FILL" = 1 ]; then
    # the project's dependencies minus what a CUDA machine already has (torch and its CUDA wheels,
    # transformers, peft, accelerate), plus the build backend for installing sdrt from source
    mapfile -t REQS < <(python3 - <<'EOF'
import re
import tomllib

deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
present = {"torch", "transformers", "peft", "accelerate"}
for dep in deps:
    if re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0].lower() not in present:
        print(dep)
print("setuptools>=68")
print("wheel")
EOF
    )
    TARGET=()
    if [ -n "$PY_VERSION" ]; then TARGET+=(--python-version "$PY_VERSION"); fi
    if [ -n "$PLATFORM" ]; then TARGET+=(--platform "$PLATFORM"); fi
    mkdir -p "$WHEELS"
    python3 -m pip download --dest "$WHEELS" --only-binary=:all: "${TARGET[@]}" "${REQS[@]}"
    echo "filled $WHEELS ($(find "$WHEELS" -name '*.whl' | wc -l) wheels)"
    exit 0
fi

case "$DEVICE" in
    cuda | cpu) ;;
    *) echo "gpu_smoke.sh: --device must be cuda or cpu, not $DEVICE" >&2; exit 2 ;;
esac

if [ "$INSTALL" = 1 ]; then
    if [ ! -d "$WHEELS" ]; then
        echo "gpu_smoke.sh: $WHEELS does not exist; fill it with bench/gpu_smoke.sh --fill-wheels where the internet is reachable (docs/gpu-smoke.md), or pass --no-install" >&2
        exit 1
    fi
    python -m pip install --quiet --no-index --find-links "$WHEELS" .
fi

if [ "$DEVICE" = cuda ]; then
    GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
    if [ "$GPUS" -lt 1 ]; then
        echo "gpu_smoke.sh: torch sees no CUDA device; run with --device cpu for a dry run" >&2
        exit 1
    fi
fi

OUT=${OUT:-$(mktemp -d /tmp/sdrt-gpu-smoke.XXXXXX)}
mkdir -p "$OUT"
echo "gpu_smoke.sh: writing to $OUT"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

# stage PIPELINE STAGE EXAMPLES PROCESSES COMMAND...: run it, log it, time it, sample GPU memory
stage() {
    local pipeline=$1 name=$2 examples=$3 processes=$4
    shift 4
    local dir="$OUT/$pipeline" sampler="" peak=null
    if command -v nvidia-smi > /dev/null && [ "$DEVICE" = cuda ]; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$dir/$name.gpumem" &
        sampler=$!
    fi
    local began
    began=$(date +%s.%N)
    if ! "$@" > "$dir/$name.log" 2>&1; then
        [ -n "$sampler" ] && kill "$sampler"
        echo "gpu_smoke.sh: $pipeline $name failed; the end of $dir/$name.log:" >&2
        tail -n 30 "$dir/$name.log" >&2
        exit 1
    fi
    local seconds
    seconds=$(python -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$began" "$(date +%s.%N)")
    if [ -n "$sampler" ]; then
        kill "$sampler"
        wait "$sampler" 2> /dev/null || true
        peak=$(sort -n "$dir/$name.gpumem" | tail -n 1)
    fi
    echo "{\"stage\": \"$name\", \"seconds\": $seconds, \"examples\": $examples, \"processes\": $processes, \"peak_gpu_mib\": ${peak:-null}}" >> "$dir/timings.jsonl"
    echo "  $pipeline $name: ${seconds%.*} s"
}

# pipeline NAME DEVICE DTYPE PROCESSES
pipeline() {
    local name=$1 device=$2 dtype=$3 processes=$4
    local dir="$OUT/$name"
    rm -rf "$dir"
    mkdir -p "$dir"
    local run=(python -m sdrt_cli)
    if [ "$processes" -gt 1 ]; then
        run=(python -m torch.distributed.run --standalone --nproc-per-node "$processes" -m sdrt_cli)
    fi
    local on=(--device "$device" --model-dtype "$dtype" --seed 0)
    stage "$name" traces "$EXAMPLES" "$processes" "${run[@]}" traces --backbone "$BACKBONE" "${on[@]}" \
        --dataset synthetic-charts --limit "$EXAMPLES" --prompts "$PROMPTS" --max-new-tokens-step1 16 \
        --max-new-tokens-step2 8 --store-dtype fp32 --batch-size 4 --out "$dir/traces"
    stage "$name" distill $((EXAMPLES * 2)) "$processes" "${run[@]}" distill --traces "$dir/traces" "${on[@]}" \
        --epochs 2 --batch-size 4 --out "$dir/adapters"
    stage "$name" ensemble "$EXAMPLES" "$processes" "${run[@]}" ensemble --adapters "$dir/adapters" \
        --traces "$dir/traces" "${on[@]}" --steps 50
    stage "$name" eval $((EXAMPLES * 2)) "$processes" "${run[@]}" eval --backbone "$BACKBONE" "${on[@]}" \
        --dataset synthetic-charts --limit "$EXAMPLES" --method prompt,sdrt --adapters "$dir/adapters" \
        --max-new-tokens 8 --batch-size 8 --out "$dir/eval"
}

pipeline cpu-fp32 cpu fp32 1
if [ "$DEVICE" = cuda ]; then
    # fp32 without TF32, so that the GPU reproduces the CPU up to summation order
    NVIDIA_TF32_OVERRIDE=0 pipeline cuda-fp32 cuda fp32 "$GPUS"
    pipeline cuda-bf16 cuda bf16 "$GPUS"
    python bench/gpu_smoke_check.py "$OUT" --reference cpu-fp32 --compare cuda-fp32:fp32 --compare cuda-bf16:bf16
else
    OMP_NUM_THREADS=1 pipeline cpu-fp32-torchrun cpu fp32 2
    python bench/gpu_smoke_check.py "$OUT" --reference cpu-fp32 --compare cpu-fp32-torchrun:fp32
fi
