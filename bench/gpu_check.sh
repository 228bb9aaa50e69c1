#!/usr/bin/env bash
# Issue 15's GPU checks in one run, for a CUDA machine (the device tool's lent GPU, whose python3 holds torch):
# the several-device, quantisation and compiled-kernel tests on cuda, then bench/generate.py in bf16 and int8 on
# cuda, eager and compiled. About 5 minutes on one H200. Nothing is installed: the package runs from src/.
#
#     bash bench/gpu_check.sh        # the log also goes to $OUT/gpu_check.log where $OUT is set
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DBRX_TEST_DEVICE=cuda
log="${OUT:-/tmp}/gpu_check.log"
{
    python3 -c 'import torch; print("torch", torch.__version__, "|", torch.cuda.get_device_name(0), "x",
                torch.cuda.device_count())' || exit 1
    # spread over the visible GPUs (one GPU: cuda:0 twice), quantised products and experts, compiled kernels
    python3 -m pytest -q -p no:cacheprovider -k "not quality and not demo" \
        tests/test_placement.py tests/test_quant.py tests/test_kernels.py
    python3 bench/load.py --dtype bfloat16 --devices cuda:0,cuda:0   # host memory while the blocks go to the GPU
    python3 bench/generate.py --device cuda --dtypes bfloat16 --quant int8,int8+head,int4+head --compile \
        --new-tokens 128 --reps 3 --no-hf
    python3 bench/generate.py --device cuda --dtypes bfloat16 --quant int8,int4 --compile --new-tokens 128 \
        --reps 3 --no-hf --d-model 1024 --n-layers 8 --ffn-hidden-size 2048
} 2>&1 | tee "$log"
