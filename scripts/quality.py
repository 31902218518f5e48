"""Quality of TokenTune against full fine-tuning and LoRA on real data; see :mod:`tokentune_peft.quality`.

python scripts/quality.py --output_dir docs/quality        # the full run (under an hour on 2 cores)
python scripts/quality.py --quick --output_dir /tmp/quality  # tiny models and slices, for CI
"""

from tokentune_peft.quality import main

if __name__ == "__main__":
    main()
