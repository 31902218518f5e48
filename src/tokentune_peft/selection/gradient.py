"""The "gradient" strategy's score: how much loss gradient each position carries, from the no-grad pass.

Rho-1 (Lin et al., 2024) trains on the tokens whose loss is largest; TokenSeek (ICLR 2026) scores each
instance's tokens from attention and gradient signals. Here, at a position j that carries a label y_j,
the gradient of its cross-entropy at the logits is ``softmax(z_j) - onehot(y_j)``, so its norm

    g_j = ||softmax(z_j) - onehot(y_j)||

needs no backward pass: the output head runs, without autograd, on the labelled positions of pass 1's
last hidden states. A position without a label (a prompt token) gets gradient only through the attention
of the positions that read it, so it scores the attention those readers give it
(:class:`~tokentune_peft.selection.importance.AttentionImportance`), each reader weighted by its g:

    score_j = g_j / sum(g) + a_j / sum(a),   a_j = sum over readers i of g_i x (i's attention share on j).

Cost: the output head's logits for the labelled positions (without autograd, :data:`LOGITS_CHUNK` rows at
a time) on top of "importance"'s attention scores; the step runs two passes, as "importance" does.
"""

from __future__ import annotations

import torch
from peft.utils import TaskType
from torch import nn

from ..model_support import CLASSIFIER_NAMES
from .importance import AttentionImportance
from .labels import IGNORE_INDEX

#: Labelled positions whose logits are formed at once: bounds the extra memory of the score.
LOGITS_CHUNK = 256


def output_head(model: nn.Module, task_type: str) -> nn.Module:
    """The module that turns last hidden states into logits: the LM head (CAUSAL_LM) or the token
    classifier (TOKEN_CLS, named as in :data:`~tokentune_peft.model_support.CLASSIFIER_NAMES`).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                      num_attention_heads=2, vocab_size=64))
        >>> output_head(model, "CAUSAL_LM") is model.lm_head
        True
    """
    if task_type == TaskType.CAUSAL_LM:
        head = model.get_output_embeddings()
    else:
        # The first name present (a module's truth value is not its presence: a Sequential of length 0 is false).
        head = next((getattr(model, name) for name in CLASSIFIER_NAMES if getattr(model, name, None) is not None), None)
    if not isinstance(head, nn.Module):
        raise ValueError(
            f"selection='gradient' needs the output head of {type(model).__name__} (task {task_type}) to score the "
            "positions, and found none; use selection='importance' or 'supervised'."
        )
    return head


@torch.no_grad()
def output_gradient_norms(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """g [batch, seq]: the norm of each position's cross-entropy gradient at the logits; 0 where the
    target is -100.

    Args:
        head: maps hidden states [n, hidden] to logits [n, classes].
        hidden: last hidden states [batch, seq, hidden].
        targets: the label each position's loss reads, [batch, seq], -100 where none.

    Example:
        >>> head = nn.Linear(2, 2, bias=False); head.weight.data = torch.eye(2)
        >>> hidden = torch.tensor([[[0.0, 0.0], [9.0, 0.0], [9.0, 0.0]]])  # p = (0.5, 0.5), then almost (1, 0)
        >>> norms = output_gradient_norms(head, hidden, torch.tensor([[0, 0, -100]]))
        >>> [round(norm, 3) for norm in norms[0].tolist()]  # sqrt(0.5), nearly 0, no label
        [0.707, 0.0, 0.0]
    """
    norms = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    labelled = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    for start in range(0, labelled[0].numel(), LOGITS_CHUNK):
        rows, columns = (index[start : start + LOGITS_CHUNK] for index in labelled)
        probabilities = head(hidden[rows, columns]).float().softmax(dim=-1)
        target_probability = probabilities.gather(1, targets[rows, columns, None]).squeeze(1)
        squared = probabilities.square().sum(dim=1) - 2 * target_probability + 1  # ||p - onehot(y)||^2
        norms[rows, columns] = squared.clamp(min=0).sqrt()
    return norms


def gradient_scores(norms: torch.Tensor, meter: AttentionImportance) -> torch.Tensor:
    """score [batch, seq]: the positions' own gradient norms and the attention their readers give them,
    weighted by the readers' gradient norms, each normalised to sum to 1 per row. A row without a
    labelled position falls back to the readers' attention alone.

    Example:
        >>> meter = AttentionImportance(torch.tensor([[2]]))
        >>> meter.reader_scores = torch.tensor([[[0.5, 0.5, 0.0]]])  # reader 2 attends to 0 and 1
        >>> gradient_scores(torch.tensor([[0.0, 0.0, 0.8]]), meter).tolist()
        [[0.5, 0.5, 1.0]]
    """
    readers = meter.readers
    reader_norms = norms.gather(1, readers.clamp(min=0)) * (readers >= 0)
    through_attention = meter.weighted_scores(reader_norms)
    unlabelled = norms.sum(dim=1, keepdim=True) == 0
    through_attention = torch.where(unlabelled, meter.scores, through_attention)
    return _row_normalised(norms) + _row_normalised(through_attention)


def _row_normalised(scores: torch.Tensor) -> torch.Tensor:
    return scores / scores.sum(dim=1, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)
