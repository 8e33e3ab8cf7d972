#!/usr/bin/env bash
# The GPU checks of issue 9 as one prepared run, for a machine with a CUDA GPU, PyTorch and no
# network (see docs/performance.md, "GPUs"):
#
#   bash bench/gpu_checks.sh --prepare     # here, with network or a pip cache: the missing wheels into .whl/
#   bash bench/gpu_checks.sh RESULTS_DIR   # there, from the repository root
#
# It trains the demo on the GPU in bf16 and fp16, resumes a run there and compares it with the
# uninterrupted one, trains under torchrun (NCCL), and runs the speed benchmarks against
# transformers. Every stage has its own time limit and a failed stage does not stop the others;
# RESULTS_DIR receives gpu_checks.log (all output), summary.txt (one line per stage) and the
# demo runs' metrics. GPU_CHECKS_DEVICE=cpu and GPU_CHECKS_STEPS=N rehearse it on a CPU.
set -uo pipefail

# Pure-Python packages that a PyTorch image usually lacks (the rest of pyproject.toml's
# dependencies are there); versions as this project's CI installs them.
WHEELS="gin-config==0.5.0 fvcore==0.1.5.post20221221 iopath==0.1.10 yacs==0.1.8 termcolor==3.3.0"

if [[ "${1:-}" == "--prepare" ]]; then
    python3 -m pip wheel --no-deps -w .whl $WHEELS && ls .whl
    exit
fi

results=$(realpath -m "${1:-${OUT:-gpu-results}}")
device=${GPU_CHECKS_DEVICE:-cuda}
steps=${GPU_CHECKS_STEPS:-100}
work=$(mktemp -d)
mkdir -p "$results"
log="$results/gpu_checks.log"
summary="$results/summary.txt"
: >"$log"
: >"$summary"

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" .whl/*.whl || exit 1
    export PYTHONPATH="$work/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HOME="$work/home"  # the demo data and caches of this run only
mkdir -p "$HOME"

stage() {  # stage NAME SECONDS COMMAND...: run it with a time limit, log it, summarise it
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "===== $name: $*" >>"$log"
    timeout "$limit" bash -c '"$@"' _ "$@" >>"$log" 2>&1  # through bash, so that the functions below run too
    local status=$?
    echo "$name: $([[ $status == 0 ]] && echo ok || echo "FAILED (exit $status)") in $((SECONDS - start)) s" | tee -a "$summary"
}

train() {  # train OUT_DIR [OPTIONS...]: the demo recipe on the device
    local out=$1
    shift
    exec python3 -m vlblocks train recipes/demo/vlbert_demo.gin --device "$device" --out "$out" "$@"  # exec: a kill reaches it
}

killed_then_resumed() {  # killed_then_resumed OUT_DIR [OPTIONS...]: SIGKILL after its first checkpoint, then --resume
    local out=$1
    shift
    (train "$out" "$@") &
    local pid=$!
    until compgen -G "$out/checkpoints/step-*" >/dev/null || ! kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid"
    echo "killed; checkpoints: $(ls "$out/checkpoints")"
    (train "$out" "$@" --resume)
}

same_weights() {  # same_weights RUN_A RUN_B: the last checkpoints' weights, bit for bit
    python3 - "$1" "$2" <<'EOF'
import sys
from pathlib import Path
from safetensors.torch import load_file

a, b = (load_file(sorted(Path(run, "checkpoints").glob("step-*"))[-1] / "model.safetensors") for run in sys.argv[1:])
differing = [name for name in a if not a[name].equal(b[name])]
largest = max(((a[name].double() - b[name].double()).abs().max().item() for name in differing), default=0.0)
print(f"{len(differing)} of {len(a)} tensors differ; largest difference {largest:g}")
sys.exit(1 if differing else 0)
EOF
}

{
    echo "date: $(date -u)"
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), '| transformers', transformers.__version__)"
} >>"$log" 2>&1

export -f train killed_then_resumed same_weights
export device
stage demo_bf16 300 train "$work/demo_bf16" --precision bf16 --max-steps "$steps"
stage demo_fp16 300 train "$work/demo_fp16" --precision fp16 --max-steps "$steps"
cp "$work/demo_bf16/metrics.jsonl" "$results/demo_bf16_metrics.jsonl" 2>/dev/null
cp "$work/demo_fp16/metrics.jsonl" "$results/demo_fp16_metrics.jsonl" 2>/dev/null
every=(--precision fp32 --max-steps "$steps" --bind "demo/Trainer.checkpoint_every = $((steps / 4))")
stage killed_then_resumed 400 killed_then_resumed "$work/resumed" "${every[@]}"
stage uninterrupted 300 train "$work/uninterrupted" "${every[@]}"
stage resume_bit_identical 60 same_weights "$work/resumed" "$work/uninterrupted"
stage torchrun_one_process 200 torchrun --standalone --nproc_per_node 1 -m vlblocks train recipes/demo/vlbert_demo.gin \
    --device "$device" --precision bf16 --out "$work/torchrun" --max-steps 20
stage bench_train_step 420 python3 bench/train_step.py --device "$device" --precisions fp32,bf16,fp16 --steps "$((steps / 5 > 2 ? steps / 5 : 2))"
stage bench_step_leads 420 python3 bench/step_leads.py --device "$device" --repeats 10 --steps 10
stage bench_optimizer_step 120 python3 bench/optimizer_step.py --device "$device"
rm -rf "$work"
