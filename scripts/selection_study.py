"""Compare uniform, supervised and importance-guided selection; see tokentune_peft.selection_study.

python scripts/selection_study.py --output_dir docs/selection
"""

from tokentune_peft.selection_study import main

if __name__ == "__main__":
    main()
