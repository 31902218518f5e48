"""Run a training recipe: ``python scripts/train.py --config configs/X.yaml [--any_field value ...]``.

The same as the ``tokentune-train`` command; see :mod:`tokentune_peft.train`.
"""

from tokentune_peft.train import main

if __name__ == "__main__":
    main()
