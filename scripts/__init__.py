"""Benchmarks and studies of TokenTune, run from a checkout (they are not installed with the package).

Run each as a module from the repository root, e.g. ``python -m scripts.benchmarks.benchmark --quick``:

* ``benchmarks/``: memory and speed on random-weight models (``benchmark``, ``engine_benchmark``,
  ``trainer_benchmark``, ``fsdp_benchmark``, ``long_context``, ``step_ops``), the model shapes they name
  (``shapes``) and their shared helpers (``common``);
* ``studies/``: accuracy on the offline recipes (``quality`` with its ``quality_report``, ``selection_study``,
  ``sft_trl``) and their shared helpers (``common``);
* ``gpu/``: the benchmark and profile run on a lent GPU machine (``gpu_run.sh`` runs them);
* ``common``: what every folder shares (the machine a report ran on, writing a report, one recipe run).

``setup.sh`` installs the package with everything its tests and examples need.
"""
