"""Run under `accelerate launch` by test_distributed.py: `tokentune-train` with the arguments given, then
leave without the interpreter's teardown (see `helpers.leave_without_teardown`)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from tokentune_peft.cli.train import main  # noqa: E402

from helpers import leave_without_teardown  # noqa: E402

main(sys.argv[1:])
leave_without_teardown()
