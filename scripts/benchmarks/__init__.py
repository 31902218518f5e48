"""Memory and speed benchmarks: ``python -m scripts.benchmarks.<name>`` from the repository root."""
