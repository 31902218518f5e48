import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A script that `accelerate launch` runs (test_distributed.py); importing it would start the check.
collect_ignore = ["ddp_gradient_check.py", "fsdp_check.py", "fsdp_trainer_check.py"]
