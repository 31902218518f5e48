"""Which tokens a TokenTune step selects.

* :mod:`~tokentune_peft.selection.strategies`: the budget, the always-selected tokens and the strategy
  ("uniform", "supervised", "importance", "gradient" or a function), and :func:`build_selector`, which makes the
  selector a config asks for;
* :mod:`~tokentune_peft.selection.sampling`: drawing and checking positions;
* :mod:`~tokentune_peft.selection.importance`: the attention-based score "importance" samples by;
* :mod:`~tokentune_peft.selection.gradient`: the loss-gradient score "gradient" samples by;
* :mod:`~tokentune_peft.selection.labels`: which label each position carries, and the selected targets.
"""

from .sampling import PAD_POSITION, sample_positions, validate_selected_positions
from .strategies import SELECTION_STRATEGIES, TokenSelector, build_selector

__all__ = [
    "PAD_POSITION",
    "SELECTION_STRATEGIES",
    "TokenSelector",
    "build_selector",
    "sample_positions",
    "validate_selected_positions",
]
