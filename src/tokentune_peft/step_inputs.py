"""What a TokenTune step is fed, read into one shape: the input feeds and the checks every batch passes.

A model is fed one way, known when it is wrapped (:func:`feed_for`):

* :class:`TextFeed`: ``input_ids``, or ``inputs_embeds`` (embeddings computed outside the model);
* :class:`VisionLanguageFeed`: ``input_ids`` with ``pixel_values``, merged first into the language model's
  ``inputs_embeds`` (:mod:`tokentune_peft.multimodal`), then read as text;
* :class:`ImageFeed`: an image classifier's ``pixel_values`` (:mod:`tokentune_peft.vision`); its sequence is
  the one the model builds before its first layer.

Each turns a forward's keywords into a :class:`StepBatch`, and every batch passes the same checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .layers import first_layer_input
from .multimodal import (
    VISION_LANGUAGE_IMAGE_INPUTS,
    VISION_LANGUAGE_MODELS,
    is_vision_language_model,
    merged_inputs_embeds,
)
from .vision import IMAGE_CLASSIFIER_INPUTS, TWO_PASS_REASON, fed_pixel_values

#: Flash-attention "varlen" inputs (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``).
FLASH_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
UNSUPPORTED_INPUTS = {
    "past_key_values": "It trains on whole sequences, without a cache.",
    "encoder_hidden_states": "Cross-attention is not supported.",
    "shift_labels": "Pass `labels`: TokenTune aligns the targets with the selected positions itself.",
}


@dataclass
class StepBatch:
    """A step's batch, read by its feed.

    Args:
        tokens: the sequence as a call of the model takes it, ``{"input_ids": ...}`` or ``{"inputs_embeds": ...}``;
            empty when the model builds its sequence itself (then no call runs on the selected tokens alone).
        sequence: the sequence positions are selected over: [batch, N] ids or [batch, N, hidden] embeddings.
        attention_mask: [batch, N], or None (a packed batch, or images).
        labels: the caller's labels, or None.
        backbone_inputs: what the backbone takes for the whole batch (pass 1, the probes): the caller's own
            ``attention_mask`` and ``position_ids`` (None included: the model then builds its masks as in a stock
            step), and no cache.
        whole_batch_inputs: what the model's stock call on the whole batch takes, labels aside.
        per_token: each token's own inputs (ids or embeddings, position ids as the model computes them, token
            types): a row group's call takes them at its positions.
        extra: the forward's other keywords, for the call that carries gradient only.
    """

    tokens: dict[str, torch.Tensor]
    sequence: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor | None
    backbone_inputs: dict[str, Any]
    whole_batch_inputs: dict[str, Any]
    per_token: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input_ids(self) -> torch.Tensor | None:
        return self.tokens.get("input_ids")

    @property
    def inputs_embeds(self) -> torch.Tensor | None:
        return self.tokens.get("inputs_embeds", None if self.tokens else self.sequence)

    @property
    def seq_len(self) -> int:
        return self.sequence.shape[1]


def drop_varlen_boundaries(kwargs: dict, position_ids: torch.Tensor | None) -> None:
    """Remove flash-attention "varlen" document boundaries from ``kwargs`` when ``position_ids`` say the same.

    TokenTune runs on sdpa or eager attention, which ignore these keywords: the stock model keeps packed
    documents apart by ``position_ids`` that restart at 0 per document (with no ``attention_mask``), and so
    does TokenTune. Boundaries that disagree with the position ids are refused: no sdpa model honours them.

    Example:
        >>> kwargs = {"cu_seq_lens_q": torch.tensor([0, 2, 5]), "max_length_q": 3}
        >>> drop_varlen_boundaries(kwargs, torch.tensor([[0, 1, 0, 1, 2]]))
        >>> kwargs
        {}
    """
    given = {name: kwargs.pop(name) for name in FLASH_VARLEN_KWARGS if kwargs.get(name) is not None}
    if not given:
        return
    documents = None
    if position_ids is not None:
        flat = position_ids.flatten()
        starts = (flat == 0).nonzero().flatten()
        documents = torch.cat([starts, starts.new_tensor([flat.numel()])])
    for name in ("cu_seq_lens_q", "cu_seq_lens_k"):
        boundaries = given.get(name)
        if boundaries is not None and (documents is None or not torch.equal(boundaries.to(documents), documents)):
            raise ValueError(
                f"`{name}` gives document boundaries that `position_ids` do not repeat. TokenTune runs on sdpa or "
                "eager attention, which separate packed documents by `position_ids` restarting at 0 per document "
                "(with no `attention_mask`); pass those."
            )


def full_position_ids(model: nn.Module, tokens: dict, position_ids: torch.Tensor | None) -> torch.Tensor:
    """Position ids of every token, as the model would compute them when none are given.

    Example:
        >>> full_position_ids(nn.Module(), {"input_ids": torch.ones(2, 3, dtype=torch.long)}, None).tolist()
        [[0, 1, 2], [0, 1, 2]]
    """
    ((name, sequence),) = tokens.items()
    batch, seq_len = sequence.shape[:2]
    if position_ids is not None:
        if position_ids.shape[-1] != seq_len:
            raise ValueError(
                f"`position_ids` must have {seq_len} positions per row; got shape {tuple(position_ids.shape)}."
            )
        return position_ids.expand(batch, seq_len)
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    from_tokens = getattr(type(embeddings), f"create_position_ids_from_{name}", None)
    if from_tokens is not None:  # RoBERTa family: positions skip padding and start after padding_idx
        return from_tokens(sequence, embeddings.padding_idx)
    return torch.arange(seq_len, device=sequence.device).expand(batch, seq_len)


def check_batch(batch: StepBatch, name: str) -> None:
    """The checks every step's batch passes, whatever its feed; ``name`` is what the sequence came as."""
    for unsupported, why in UNSUPPORTED_INPUTS.items():
        if batch.extra.get(unsupported) is not None:
            raise ValueError(f"A TokenTune training step does not take `{unsupported}`. {why}")
    shape = tuple(batch.sequence.shape[:2])
    if batch.attention_mask is not None and tuple(batch.attention_mask.shape) != shape:
        raise ValueError(
            f"`attention_mask` must have the [batch, sequence] shape of `{name}` {shape}; "
            f"got {tuple(batch.attention_mask.shape)}."
        )
    labels = batch.labels
    if labels is not None and labels.dim() == 2 and tuple(labels.shape) != shape:
        raise ValueError(f"`labels` of shape {tuple(labels.shape)} do not match `{name}` {shape}.")


class TextFeed:
    """A batch of ``input_ids``, or of ``inputs_embeds`` (whose selected rows enter the selected tokens' call,
    so a tensor that requires grad gets the gradient of the selected rows)."""

    #: Why this feed cannot run the single pass (None: it can).
    single_pass_blocker: str | None = None

    def read(self, model: nn.Module, inputs: dict[str, Any]) -> StepBatch:
        """Read a forward's keywords (consumed from ``inputs``; what is left goes to :attr:`StepBatch.extra`)."""
        input_ids, inputs_embeds = inputs.pop("input_ids", None), inputs.pop("inputs_embeds", None)
        if inputs.get("pixel_values") is not None:
            raise ValueError(
                "Images (`pixel_values`) go with `input_ids` to a vision-language model "
                f"({', '.join(VISION_LANGUAGE_MODELS)}), whose image tokens mark where the images go."
            )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("A TokenTune training step needs exactly one of `input_ids` and `inputs_embeds`.")
        if inputs_embeds is not None and inputs_embeds.dim() != 3:
            raise ValueError(
                f"`inputs_embeds` must be [batch, sequence, hidden]; got shape {tuple(inputs_embeds.shape)}."
            )
        name, sequence = ("input_ids", input_ids) if input_ids is not None else ("inputs_embeds", inputs_embeds)
        attention_mask, position_ids = inputs.pop("attention_mask", None), inputs.pop("position_ids", None)
        token_type_ids = inputs.pop("token_type_ids", None)
        labels = inputs.pop("labels", None)
        inputs.pop("use_cache", None)
        drop_varlen_boundaries(inputs, position_ids)
        tokens = {name: sequence}
        per_token = {**tokens, "position_ids": full_position_ids(model, tokens, position_ids)}
        if token_type_ids is not None:
            per_token["token_type_ids"] = token_type_ids
        # The caller's own arguments of the model's masks: the whole batch's calls build them as the stock step does.
        # No cache: with one, transformers would let packed documents attend to each other.
        backbone_inputs = {
            **per_token,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "use_cache": False,
        }
        batch = StepBatch(
            tokens=tokens,
            sequence=sequence,
            attention_mask=attention_mask,
            labels=labels,
            backbone_inputs=backbone_inputs,
            whole_batch_inputs=backbone_inputs,
            per_token=per_token,
            extra=inputs,
        )
        check_batch(batch, name)
        return batch


class VisionLanguageFeed(TextFeed):
    """``input_ids`` with images: the language model's merged sequence is computed first, with autograd, and the
    step runs on it as on ``inputs_embeds``; a batch without images is plain text."""

    def read(self, model: nn.Module, inputs: dict[str, Any]) -> StepBatch:
        images = {name: inputs.pop(name) for name in VISION_LANGUAGE_IMAGE_INPUTS if inputs.get(name) is not None}
        if images:
            if inputs.get("input_ids") is None or inputs.get("inputs_embeds") is not None:
                raise ValueError(
                    "Images (`pixel_values`) go with `input_ids` to a vision-language model "
                    f"({', '.join(VISION_LANGUAGE_MODELS)}), whose image tokens mark where the images go."
                )
            input_ids = inputs.pop("input_ids")
            inputs["inputs_embeds"] = merged_inputs_embeds(model, input_ids, inputs.get("attention_mask"), images)
        return super().read(model, inputs)


class ImageFeed:
    """An image classifier's ``pixel_values``: positions are selected over the sequence its first layer receives."""

    single_pass_blocker: str | None = TWO_PASS_REASON

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers

    def read(self, model: nn.Module, inputs: dict[str, Any]) -> StepBatch:
        """Read a forward's keywords (consumed from ``inputs``), computing the first layer's input once."""
        if inputs.get("pixel_values") is None:
            raise ValueError(f"{type(model).__name__} is fed `pixel_values`; the step got {sorted(inputs)}.")
        images = {name: inputs.pop(name) for name in IMAGE_CLASSIFIER_INPUTS if name in inputs}
        labels = inputs.pop("labels", None)
        sequence = first_layer_input(model.base_model, images, self.layers)
        batch = StepBatch(
            tokens={},
            sequence=sequence,
            attention_mask=None,
            labels=labels,
            backbone_inputs=images,
            whole_batch_inputs=images,
            extra=inputs,
        )
        check_batch(batch, "pixel_values")
        return batch


def feed_for(model: nn.Module, layers: list[nn.Module]) -> TextFeed | ImageFeed:
    """The feed of ``model`` (a transformers model TokenTune supports); ``layers`` are its transformer layers.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> type(feed_for(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                                    intermediate_size=64)), [])).__name__
        'TextFeed'
    """
    if fed_pixel_values(model):
        return ImageFeed(layers)
    return VisionLanguageFeed() if is_vision_language_model(model) else TextFeed()
