"""Image classification: TokenTune on the sequence a vision transformer builds from ``pixel_values``.

A vision transformer builds its sequence inside the model (patch embeddings, the class token, position
embeddings), so a step selects positions of the sequence that enters the first transformer layer:

1. a short probe runs the model without autograd and with every transformer layer skipped, to learn
   that sequence's length (:func:`~tokentune_peft.layers.first_layer_input`);
2. pass 1 (no autograd) runs the backbone on the whole batch, recording every attention's keys and values;
3. the grad call is the model's stock call on the whole batch, whose first layer takes the selected rows
   of its input (:mod:`tokentune_peft.whole_batch`): the patch projection, class token and
   position embeddings get the gradient of the selected rows, and every layer runs the selected rows
   only, their queries attending to every recorded key and value, as in a text step.

Configure it with ``task_type="SEQ_CLS"``, which adds the head to LoRA's ``modules_to_save`` (PEFT's
image-classification guide leaves the task type unset, but peft's plain ``PeftModel`` then calls the model
around TokenTune's step, so TokenTune refuses it). The class token, which the head reads, is always
selected. Supported are heads that read the class token alone
(:data:`IMAGE_CLASSIFIERS`); other vision models are refused at ``get_peft_model``, by name and reason.
The step always runs in two passes.

Example:
    >>> import tokentune_peft, torch
    >>> from peft import get_peft_model
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> base = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...     intermediate_size=64, image_size=32, patch_size=8, num_labels=3, attn_implementation="sdpa"))
    >>> model = get_peft_model(base, tokentune_peft.TokenTuneConfig(task_type="SEQ_CLS", selection_ratio=0.3))
    >>> output = model(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 2]))
    >>> output.selected_positions.shape  # 16 patches and the class token: 0.3 x 17, rounded up
    torch.Size([2, 6])
"""

from __future__ import annotations

from peft.utils import TaskType
from torch import nn

#: Image classification models whose head reads the class token alone (position 0 of the sequence).
IMAGE_CLASSIFIERS = ("ViTForImageClassification", "DeiTForImageClassification")
#: Why other vision models are refused, where the reason is known.
REFUSED_IMAGE_MODELS = {
    "Dinov2ForImageClassification": "its head reads the class token and the mean of every patch token",
    "Dinov2WithRegistersForImageClassification": "its head reads the class token and the mean of every patch token",
    "DeiTForImageClassificationWithTeacher": "its heads read two tokens, the class and distillation tokens",
    "BeitForImageClassification": "its head averages the patch tokens (use_mean_pooling)",
    "SiglipForImageClassification": "its head averages the patch tokens",
    "SwinForImageClassification": "its sequence gets shorter between layers (patch merging)",
    "Swinv2ForImageClassification": "its sequence gets shorter between layers (patch merging)",
}
#: What the step gives the backbone's calls; the model's other keywords go to the grad call only.
IMAGE_CLASSIFIER_INPUTS = ("pixel_values", "interpolate_pos_encoding")
#: Why such a step runs in two passes.
TWO_PASS_REASON = "the model builds its sequence from `pixel_values`"


def fed_pixel_values(model: nn.Module) -> bool:
    """Whether ``model`` is fed ``pixel_values``, building the sequence of its transformer layers from them.

    Example:
        >>> from transformers import ViTConfig, ViTModel
        >>> fed_pixel_values(ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                                     intermediate_size=64, image_size=16, patch_size=8)))
        True
    """
    return getattr(model, "main_input_name", None) == "pixel_values"


def check_image_model_supported(model: nn.Module, task_type: str | None) -> None:
    """Raise ValueError when ``model`` (one fed ``pixel_values``) is not an image classifier TokenTune runs exactly.

    Example:
        >>> from transformers import Dinov2Config, Dinov2ForImageClassification
        >>> model = Dinov2ForImageClassification(Dinov2Config(hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8))
        >>> check_image_model_supported(model, "SEQ_CLS")
        Traceback (most recent call last):
        ...
        ValueError: TokenTune cannot train Dinov2ForImageClassification exactly: its head reads the class token ...
    """
    name = type(model).__name__
    if name not in IMAGE_CLASSIFIERS:
        reason = REFUSED_IMAGE_MODELS.get(
            name, "it is not among the image classifiers whose head reads the class token"
        )
        raise ValueError(
            f"TokenTune cannot train {name} exactly: {reason}. Supported vision models: {', '.join(IMAGE_CLASSIFIERS)}."
        )
    if task_type != TaskType.SEQ_CLS:
        raise ValueError(f"{name} classifies images: use task_type='SEQ_CLS'; got {task_type!r}.")
