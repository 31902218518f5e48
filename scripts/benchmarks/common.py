"""What the benchmarks share (the GPU benchmark in ``scripts/gpu/`` too): the settings they compare and how a model
is set up for one, random batches, a training step, peak memory, and the ratios and cells of their tables."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model

from tokentune_peft.config import TokenTuneConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: TokenTune's engines (TokenTuneConfig.engine) a setting may name; "auto" when it names none.
ENGINES = ("single-pass", "two-pass")


@dataclass
class Setting:
    """One way to train: TokenTune ratio (None: off), LoRA, 4-bit base, gradient checkpointing,
    TokenTune's selection strategy ("+supervised", "+importance", "+gradient"; uniform by default), engine
    ("+single-pass", "+two-pass"; "auto" by default) and dense top layers ("+dense<L>"; 0 by default).

    Example:
        >>> Setting.parse("tokentune-0.3+qlora+gc")
        Setting(ratio=0.3, lora=True, quantized=True, checkpointing=True, selection='uniform', engine='auto', dense=0)
        >>> Setting.parse("tokentune-0.3+two-pass").engine
        'two-pass'
        >>> Setting.parse("tokentune-0.1+importance").selection
        'importance'
        >>> Setting.parse("tokentune-0.3+lora").baseline
        'lora'
        >>> Setting.parse("tokentune-0.1+lora+dense2").dense, Setting.parse("tokentune-0.1+lora+dense2").without_dense
        (2, 'tokentune-0.1+lora')
    """

    ratio: float | None = None
    lora: bool = False
    quantized: bool = False
    checkpointing: bool = False
    selection: str = "uniform"
    engine: str = "auto"
    dense: int = 0

    @classmethod
    def parse(cls, name: str) -> Setting:
        head, *extras = name.split("+")
        setting = cls()
        if head.startswith("tokentune-"):
            setting.ratio = float(head.removeprefix("tokentune-"))
        elif head in ("lora", "qlora"):
            extras.append(head)
        elif head != "full":
            raise ValueError(f"Unknown setting {name!r}: start with 'full', 'lora', 'qlora' or 'tokentune-<ratio>'.")
        for extra in extras:
            if extra in ("supervised", "importance", "gradient") and setting.ratio is not None:
                setting.selection = extra
                continue
            if extra in ENGINES and setting.ratio is not None:
                setting.engine = extra
                continue
            if extra.startswith("dense") and extra[5:].isdigit() and setting.ratio is not None:
                setting.dense = int(extra[5:])
                continue
            if extra not in ("lora", "qlora", "gc"):
                raise ValueError(
                    f"Unknown part {extra!r} of setting {name!r}: use '+lora', '+qlora', '+gc', or with TokenTune "
                    "'+supervised', '+importance', '+gradient', '+single-pass', '+two-pass' or '+dense<L>'."
                )
            setting.lora |= extra in ("lora", "qlora")
            setting.quantized |= extra == "qlora"
            setting.checkpointing |= extra == "gc"
        return setting

    @property
    def baseline(self) -> str:
        """The same setting without TokenTune."""
        name = "qlora" if self.quantized else "lora" if self.lora else "full"
        return name + ("+gc" if self.checkpointing else "")

    @property
    def without_dense(self) -> str:
        """The same setting with TokenTune's dense top layers off."""
        parts = [f"tokentune-{self.ratio}"] + [
            part
            for part, on in (
                ("qlora", self.quantized),
                ("lora", self.lora and not self.quantized),
                ("gc", self.checkpointing),
                (self.selection, self.selection != "uniform"),
                (self.engine, self.engine != "auto"),
            )
            if on
        ]
        return "+".join(parts)


def set_up(model, setting: Setting, task: str, lora_rank: int = 8, lora_targets: str = "all-linear"):
    """``model`` set up for ``setting`` (gradient checkpointing, LoRA of rank ``lora_rank`` on ``lora_targets``,
    TokenTune), in training mode.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> from scripts.benchmarks.shapes import llama_config
        >>> model = AutoModelForCausalLM.from_config(llama_config("llama-tiny"))
        >>> type(set_up(model, Setting.parse("tokentune-0.3+lora"), "CAUSAL_LM").base_model).__name__
        'TokenTuneLoraModel'
    """
    if setting.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    adapter = LoraConfig(r=lora_rank, target_modules=lora_targets, task_type=task) if setting.lora else None
    if setting.ratio is not None:
        config = TokenTuneConfig(
            selection_ratio=setting.ratio,
            task_type=task,
            peft_config=adapter,
            selection=setting.selection,
            engine=setting.engine,
            dense_top_layers=setting.dense,
        )
        model = get_peft_model(model, config)
    elif adapter is not None:
        model = get_peft_model(model, adapter)
    return model.train()


def keys_and_values_bytes(model_config, batch_size: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of every layer's keys and values for one batch (what TokenTune keeps for all tokens); a
    vision-language model's are its language model's.

    Example:
        >>> from scripts.benchmarks.shapes import llama_config
        >>> keys_and_values_bytes(llama_config("llama-256"), 2, 512, torch.float32) // 2**20
        4
    """
    model_config = getattr(model_config, "text_config", model_config)
    heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    element = torch.finfo(dtype).bits // 8
    return 2 * model_config.num_hidden_layers * batch_size * seq_len * heads * head_dim * element


def random_batch(vocab_size: int, batch_size: int, seq_len: int, task: str, device: torch.device) -> dict:
    """A batch of random token ids (seed 0) without padding, with labels for ``task`` (the ids themselves
    for causal LM, one of two classes per sequence otherwise), on ``device``.

    Example:
        >>> batch = random_batch(1000, 2, 8, "CAUSAL_LM", torch.device("cpu"))
        >>> batch["input_ids"].shape, bool(batch["attention_mask"].all()), batch["labels"] is batch["input_ids"]
        (torch.Size([2, 8]), True, True)
    """
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device)
    labels = input_ids if task == "CAUSAL_LM" else torch.randint(0, 2, (batch_size,), generator=generator).to(device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def training_step(model, batch: dict, optimizer: torch.optim.Optimizer) -> None:
    """One training step: forward, backward, optimizer step, gradients freed."""
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def reset_peak_memory(device: torch.device) -> None:
    """Start counting peak memory from now: the training steps, not the model's loading.

    On CPU, writing 5 to /proc/self/clear_refs resets the process's peak resident set (VmHWM); loading
    a 4-bit model reads its full-precision weights first, which would otherwise set the peak.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")


def peak_memory(device: torch.device) -> int:
    """Peak bytes since :func:`reset_peak_memory`: allocated on the GPU, resident on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError("/proc/self/status has no VmHWM line: peak memory needs Linux.")


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_rows(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """The rows that were measured (not failed, not skipped), by setting and sequence length.

    Example:
        >>> list(measured_rows([{"setting": "full", "seq_len": 8, "step_seconds": 1.0},
        ...                     {"setting": "lora", "seq_len": 8, "error": "RuntimeError"}]))
        [('full', 8)]
    """
    return {(row["setting"], row["seq_len"]): row for row in rows if "step_seconds" in row}


def add_ratios(row: dict, reference: dict | None, keys: tuple[str, ...], name: str) -> None:
    """Set ``row[f"{key}_vs_{name}"]``, ``row``'s figure over ``reference``'s, for each of ``keys`` both have;
    nothing when there is no reference.

    Example:
        >>> row = {"step_seconds": 1.0}
        >>> add_ratios(row, {"step_seconds": 4.0, "peak_memory_bytes": 8}, ("step_seconds", "peak_memory_bytes"), "x")
        >>> row
        {'step_seconds': 1.0, 'step_seconds_vs_x': 0.25}
    """
    for key in keys if reference is not None else ():
        if key in row and key in reference:
            row[f"{key}_vs_{name}"] = row[key] / reference[key]


def table_head(header: str) -> list[str]:
    """A Markdown table's first two lines: ``header``, then a rule with the first column left-aligned and the
    others right-aligned.

    Example:
        >>> table_head("| setting | MiB | vs full |")[1]
        '|---|---:|---:|'
    """
    return [header, "|---|" + "---:|" * (header.count("|") - 2)]


def ratio_cell(row: dict, key: str) -> str:
    """A ratio of ``row`` to three decimals, or "-" when it has none.

    Example:
        >>> ratio_cell({"step_seconds_vs_full": 0.5}, "step_seconds_vs_full"), ratio_cell({}, "step_seconds_vs_full")
        ('0.500', '-')
    """
    return f"{row[key]:.3f}" if key in row else "-"
