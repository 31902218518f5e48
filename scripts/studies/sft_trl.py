"""Supervised fine-tuning through TRL's SFTTrainer with TokenTune, offline: SmolLM2-135M-Instruct on
chatterbot-corpus prompt/answer pairs (chat template, loss on the answers only), LoRA + TokenTune.

    python -m scripts.studies.sft_trl --train_samples 256 --selection_ratio 0.3 --output_dir outputs/sft_trl

It prints the held-out answer loss before and after training, and the activation memory of one step
(bytes autograd keeps for backward, TRL's fused LM head included) against LoRA without TokenTune on
the same batch; ``results.json`` in ``output_dir`` holds the same figures.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import cache

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, HfArgumentParser, set_seed
from trl import SFTConfig, SFTTrainer

from tokentune_peft import TokenTuneConfig, keep_4bit_layers_trainable, saved_activation_bytes
from tokentune_peft.cli.model_configs import llama_config
from tokentune_peft.cli.offline import load_chatterbot_pairs, smollm2_path
from tokentune_peft.cli.train import hide_peft_deprecation_warning
from tokentune_peft.memory import MIB
from tokentune_peft.sft_trainer import TokenTuneSFTTrainer


@dataclass
class SFTStudyArguments:
    """What this script sets; every ``SFTConfig`` field can be given on the command line too."""

    model_name: str = field(
        default="smollm2", metadata={"help": "'smollm2', or 'tiny-llama' (random, SmolLM2's tokenizer) for CI."}
    )
    tokentune: bool = field(default=True, metadata={"help": "Train with TokenTune (False: TRL's own LoRA run)."})
    selection_ratio: float = field(default=0.3, metadata={"help": "TokenTune's share of tokens with gradient."})
    selection: str = field(default="uniform", metadata={"help": "'uniform', 'supervised', 'importance' or 'gradient'."})
    dense_top_layers: int = field(default=0, metadata={"help": "TokenTune: last layers that train every token."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (every linear layer)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the base model in 4 bits (QLoRA)."})
    train_samples: int = field(default=256, metadata={"help": "Training pairs used (of 1,058); 0 for all."})
    eval_samples: int = field(default=0, metadata={"help": "Held-out pairs used (of 118); 0 for all."})


def conversations(split, samples: int):
    """Prompt/completion chats, the format TRL applies the chat template to."""
    if samples:
        split = split.select(range(min(samples, len(split))))
    return split.map(
        lambda row: {
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "completion": [{"role": "assistant", "content": row["answer"]}],
        },
        remove_columns=split.column_names,
    )


MODEL_NAMES = ("smollm2", "tiny-llama")
#: Layers of the tiny Llama: enough for the studies' 4 dense top layers to leave some below.
TINY_LLAMA_LAYERS = 6


@cache
def tiny_llama_path() -> str:
    """A folder holding a tiny random Llama ("llama-tiny" sizes with :data:`TINY_LLAMA_LAYERS` layers, seed 0)
    with SmolLM2's tokenizer and chat template, written once beside SmolLM2's folder: from a folder it loads in
    4 bits too (its sizes are multiples of 32, as bitsandbytes' 4-bit layers need).

    Example::

        model = AutoModelForCausalLM.from_pretrained(tiny_llama_path())
    """
    folder = os.path.join(os.path.dirname(smollm2_path()), f"tiny-llama-{TINY_LLAMA_LAYERS}-layers-smollm2-tokenizer")
    if os.path.isdir(folder):
        return folder
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    set_seed(0)
    config = llama_config("llama-tiny", vocab_size=len(tokenizer), num_hidden_layers=TINY_LLAMA_LAYERS)
    model = AutoModelForCausalLM.from_config(config)
    partial = tempfile.mkdtemp(prefix=".tiny-llama-partial-", dir=os.path.dirname(folder))
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.rename(partial, folder)
    except OSError:
        if not os.path.isdir(folder):  # else another process wrote it first
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def activation_mib(trainer: SFTTrainer, batch: dict | None = None) -> dict[str, float | None]:
    """Saved activations of one training step on ``batch`` (default: the first training batch): LoRA alone, and
    TokenTune + LoRA when the trainer is TokenTune's (None otherwise)."""
    model = trainer.model
    batch = next(iter(trainer.get_train_dataloader())) if batch is None else batch
    (batch,), _ = trainer.get_batch_samples(iter([batch]), 1, model.device)
    batch = {key: value for key, value in batch.items() if torch.is_tensor(value)}
    tokentune = None
    if isinstance(trainer, TokenTuneSFTTrainer):
        # As the trainer calls the model: its generator, and a loss count over the selected tokens.
        options = {"selection_generator": trainer.selection_generator, "loss_counted_over_selection": True}
        tokentune = saved_activation_bytes(
            model, lambda: model(**batch, **options, fused_lm_head=True, use_cache=False).loss
        )
    lora_model = model.base_model.model  # the transformers model with its LoRA layers, called without TokenTune
    plain = {key: value for key, value in batch.items() if key != "selected_positions"}
    lora = saved_activation_bytes(lora_model, lambda: lora_model(**plain, fused_lm_head=True, use_cache=False).loss)
    return {"tokentune_lora_mib": None if tokentune is None else tokentune / MIB, "lora_mib": lora / MIB}


def build_trainer(
    study: SFTStudyArguments, args: SFTConfig, train_dataset, eval_dataset, callbacks: list | None = None
) -> SFTTrainer:
    """SmolLM2-135M-Instruct (or the tiny Llama of ``study.model_name``) with LoRA (on a 4-bit base for QLoRA) in
    TRL's trainer: TokenTune's when ``study.tokentune``, TRL's own ``SFTTrainer`` otherwise."""
    if study.model_name not in MODEL_NAMES:
        raise ValueError(f"`model_name` must be one of {MODEL_NAMES}; got {study.model_name!r}.")
    set_seed(args.seed)
    folder = smollm2_path() if study.model_name == "smollm2" else tiny_llama_path()
    quantization = None
    if study.load_in_4bit:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", quantization_config=quantization)
    lora = LoraConfig(r=study.lora_r, lora_alpha=2 * study.lora_r, target_modules="all-linear")
    options = {
        "model": model,
        "args": args,
        "train_dataset": train_dataset,
        "eval_dataset": eval_dataset,
        "processing_class": AutoTokenizer.from_pretrained(folder),
        "callbacks": callbacks,
    }
    if not study.tokentune:
        keep_4bit_layers_trainable(model)  # plain QLoRA: get_peft_model of TokenTune does this otherwise
        return SFTTrainer(peft_config=lora, **options)
    config = TokenTuneConfig(
        task_type="CAUSAL_LM",
        selection_ratio=study.selection_ratio,
        selection=study.selection,
        dense_top_layers=study.dense_top_layers,
        peft_config=lora,
    )
    return TokenTuneSFTTrainer(peft_config=config, **options)


def main() -> None:
    hide_peft_deprecation_warning()
    study, args = HfArgumentParser((SFTStudyArguments, SFTConfig)).parse_args_into_dataclasses()
    pairs = load_chatterbot_pairs(seed=0)
    trainer = build_trainer(
        study,
        args,
        conversations(pairs["train"], study.train_samples),
        conversations(pairs["test"], study.eval_samples),
    )
    memory = activation_mib(trainer)
    before = trainer.evaluate()["eval_loss"]
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    after = trainer.evaluate()["eval_loss"]
    trainer.save_model(args.output_dir)
    results = {"held_out_answer_loss": {"before": before, "after": after}, "train_seconds": seconds, **memory}
    with open(os.path.join(args.output_dir, "results.json"), "w") as handle:
        json.dump({"arguments": vars(study), **results}, handle, indent=2)
    print(f"held-out answer loss: {before:.4f} -> {after:.4f}")
    if study.tokentune:
        print(
            f"activation memory of one step: {memory['tokentune_lora_mib']:.2f} MiB with TokenTune "
            f"{study.selection_ratio} vs {memory['lora_mib']:.2f} MiB for LoRA alone "
            f"({memory['tokentune_lora_mib'] / memory['lora_mib']:.1%})"
        )
    print(f"training: {seconds:.1f} s")


if __name__ == "__main__":
    main()
