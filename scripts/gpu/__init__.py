"""The GPU benchmark and profile: ``bash scripts/gpu/gpu_run.sh`` from the repository root runs them."""
