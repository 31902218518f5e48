#!/usr/bin/env bash
# Everything a lent GPU machine runs, in one call of at most 9 minutes: the CUDA tests (host syncs included), the
# benchmark on the Llama-3.2-1B shape (2,048 and 8,192 tokens; TokenTune's two engines side by side, and under
# torch.compile), and QLoRA and LoRA, each with TokenTune's two engines, on the paper's Llama-2-7B shape (2,048
# tokens). Each setting is measured in a process of its own. Results go to $OUT (default outputs/gpu_run); PARTS picks some of
# "tests 1b 7b" (default all). Run it from the repository root:
#
#     bash scripts/gpu/gpu_run.sh
#     PARTS="tests 7b" bash scripts/gpu/gpu_run.sh
#
# Wheels in .whl/ (transformers, peft and their needs at the versions CI uses, liger-kernel, bitsandbytes for
# the 4-bit settings) are installed first when present, because the machine's own transformers may be older than
# this package is tested with. Fetch them here (`echo /.whl/ >> .git/info/exclude` first) and name `.whl` in the
# device call's carry:
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#         transformers==5.25.0 peft==0.21.2 liger-kernel==0.8.5 huggingface_hub==2.4.0 kernels==0.19.1 \
#         regex==2026.11.19 tokenizers==0.23.3 httpx2==2.16.2 httpcore2==2.16.2 truststore click==8.5.1 \
#         hf-xet==1.8.0 tomlkit==0.15.3 anyio==4.16.0 idna==3.20 h11==0.16.0
#
# bitsandbytes' wheel (43 MB) holds a library for every CUDA version; the carry allows 64 MiB in all, so keep
# only the CUDA 13 ones the machine's torch uses (7 MB), and drop the others from its RECORD:
#
#     whl=$PWD/.whl && python3 -m pip download --no-deps --only-binary=:all: --platform manylinux_2_24_x86_64 \
#         -d /tmp/bnb bitsandbytes==0.50.2 && cd /tmp/bnb && mkdir w && cd w && unzip -q ../bitsandbytes-*.whl \
#         && rm bitsandbytes/libbitsandbytes_{cuda1[12]*,rocm*,xpu*}.so \
#         && sed -i -E '/libbitsandbytes_(cuda1[12]|rocm|xpu)/d' bitsandbytes-*.dist-info/RECORD \
#         && zip -q -r "$whl/$(basename ../bitsandbytes-*.whl)" .
set -uo pipefail
cd "$(dirname "$0")/../.."  # the repository root: `python3 -m scripts.gpu...` and .whl/ are found from there
OUT=${OUT:-outputs/gpu_run}
PARTS=${PARTS:-tests 1b 7b}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, peft, tokentune_peft; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$OUT/versions.txt"

[[ " $PARTS " == *" tests "* ]] && timeout 75 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    tests/test_host_syncs.py -k "cuda" 2>&1 | tee "$OUT/test_cuda.log"
[[ " $PARTS " == *" 1b "* ]] && timeout 200 python3 -m scripts.gpu.gpu_benchmark --output_dir "$OUT/llama-3.2-1b" \
    --time_budget_s 150 2>&1 | tee "$OUT/benchmark_1b.log"
# The 4-bit settings load the model's random weights from a folder written once (about 13 GB, 1 to 2 minutes).
[[ " $PARTS " == *" 7b "* ]] && timeout 250 python3 -m scripts.gpu.gpu_benchmark --model llama-2-7b --seq_lens 2048 \
    --time_budget_s 180 --output_dir "$OUT/llama-2-7b" --settings qlora tokentune-0.3+qlora+two-pass \
    tokentune-0.3+qlora+single-pass lora tokentune-0.3+lora+two-pass tokentune-0.3+lora+single-pass \
    2>&1 | tee "$OUT/benchmark_7b.log"
exit 0
