"""`TokenTuneSFTTrainer`: TRL's ``SFTTrainer`` with TokenTune steps (needs ``pip install tokentune-peft[trl]``).

TRL's ``SFTTrainer`` runs a fused LM head that returns per-token log-probabilities instead of logits
and divides their sum by the Trainer's count of supervised tokens. Under TokenTune the fused head
scores the selected slots (the step hands the model their targets as ``shift_labels``), and the
mixin counts the selected supervised tokens, so the division is exact.

Example:
    >>> import tokentune_peft
    >>> from trl import SFTConfig
    >>> trainer = TokenTuneSFTTrainer(  # doctest: +SKIP
    ...     model=base_model, args=SFTConfig("out"), train_dataset=data,
    ...     peft_config=tokentune_peft.TokenTuneConfig(task_type="CAUSAL_LM", peft_config=LoraConfig(r=8)),
    ... )
    >>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

from .import_utils import require_trl
from .trainer import TokenTuneTrainerMixin

require_trl("tokentune_peft.sft_trainer")

from trl import SFTTrainer  # noqa: E402


class TokenTuneSFTTrainer(TokenTuneTrainerMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` with TokenTune steps; takes ``SFTTrainer``'s arguments.

    Packing and padding-free batches keep each document to itself, as in the stock model; completion-only
    loss counts the selected completion tokens. See :class:`~tokentune_peft.trainer.TokenTuneTrainerMixin`.
    """
