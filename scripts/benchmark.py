"""Benchmark TokenTune against full fine-tuning, LoRA, QLoRA and gradient checkpointing.

The same as the ``tokentune-benchmark`` command; see :mod:`tokentune_peft.benchmarking`.

    python scripts/benchmark.py --model llama-1024 --batch_size 2 --seq_len 512 --output_dir docs/benchmarks
    python scripts/benchmark.py --quick --output_dir /tmp/benchmark   # seconds, on a tiny config
"""

from tokentune_peft.benchmarking import main

if __name__ == "__main__":
    main()
