#!/usr/bin/env bash
# Everything a lent GPU machine runs, in one call of about 3 to 6 minutes: the CUDA tests, the benchmark on the
# Llama-3.2-1B shape (2,048 and 8,192 tokens), and full fine-tuning, LoRA and LoRA + TokenTune on the paper's
# Llama-2-7B shape (2,048 tokens). Results go to $OUT (default outputs/gpu_run).
#
#     bash scripts/gpu_run.sh
#
# Wheels in .whl/ (transformers, peft and their needs at the versions CI uses, liger-kernel) are installed first
# when present, because the machine's own transformers may be older than this package is tested with. Fetch
# them here (`echo /.whl/ >> .git/info/exclude` first) and name `.whl` in the device call's carry:
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#         transformers==5.25.0 peft==0.21.2 liger-kernel==0.8.5 huggingface_hub==2.4.0 kernels==0.19.1 \
#         regex==2026.11.19 tokenizers==0.23.3 httpx2==2.16.2 httpcore2==2.16.2 truststore click==8.5.1 \
#         hf-xet==1.8.0 tomlkit==0.15.3 anyio==4.16.0 idna==3.20 h11==0.16.0
set -uo pipefail
OUT=${OUT:-outputs/gpu_run}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, peft, tokentune_peft; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$OUT/versions.txt"

timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log"
cd scripts
timeout 200 python3 gpu_benchmark.py --output_dir "$OUT/llama-3.2-1b" --time_budget_s 150 2>&1 \
    | tee "$OUT/benchmark_1b.log"
timeout 90 python3 gpu_benchmark.py --model llama-2-7b --seq_lens 2048 --time_budget_s 40 --output_dir "$OUT/llama-2-7b" \
    --settings full lora tokentune-0.3+lora tokentune-0.1+lora lora+gc tokentune-0.3 2>&1 | tee "$OUT/benchmark_7b.log"
