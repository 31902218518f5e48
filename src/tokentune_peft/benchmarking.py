"""Measuring one training setting: saved activations, peak memory and step time.

Used by ``scripts/benchmark.py``, which runs each setting in a process of its own so that peak
memory figures do not mix.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

from .config import TokenTuneConfig
from .memory import saved_activation_bytes

#: Named model configs with random weights.
MODEL_CONFIGS = {
    "llama-256": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "llama-1024": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Setting:
    """One way to train: TokenTune ratio (None: off), LoRA, 4-bit base, gradient checkpointing.

    Example:
        >>> Setting.parse("tokentune-0.3+qlora+gc")
        Setting(ratio=0.3, lora=True, quantized=True, checkpointing=True)
        >>> Setting.parse("full").name
        'full'
    """

    ratio: float | None = None
    lora: bool = False
    quantized: bool = False
    checkpointing: bool = False

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
            if extra == "lora":
                setting.lora = True
            elif extra == "qlora":
                setting.lora = setting.quantized = True
            elif extra == "gc":
                setting.checkpointing = True
            else:
                raise ValueError(f"Unknown part {extra!r} of setting {name!r}: use '+lora', '+qlora' or '+gc'.")
        return setting

    @property
    def name(self) -> str:
        parts = [
            f"tokentune-{self.ratio:g}"
            if self.ratio is not None
            else ("qlora" if self.quantized else "lora" if self.lora else "full")
        ]
        if self.ratio is not None and self.lora:
            parts.append("qlora" if self.quantized else "lora")
        if self.checkpointing:
            parts.append("gc")
        return "+".join(parts)


def _load_base(model_name: str, dtype: torch.dtype, quantization, checkpoint_dir: str | None):
    if model_name in MODEL_CONFIGS:
        torch.manual_seed(0)
        config = LlamaConfig(**MODEL_CONFIGS[model_name])
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
        if quantization is None:
            return model
        # bitsandbytes quantizes while loading: stage the random weights, then load them in 4 bits.
        if checkpoint_dir is None:
            raise ValueError("A quantized named config needs `checkpoint_dir` to stage its weights.")
        model.save_pretrained(checkpoint_dir)
        model_name = checkpoint_dir
    return AutoModelForCausalLM.from_pretrained(
        model_name, attn_implementation="sdpa", dtype=dtype, quantization_config=quantization
    )


def build_model(model_name: str, setting: Setting, dtype: torch.dtype, device: str, checkpoint_dir: str | None):
    """The model of ``model_name`` (a named config, or a local pretrained folder) set up for ``setting``."""
    quantization = None
    if setting.quantized:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    model = _load_base(model_name, dtype, quantization, checkpoint_dir)
    if setting.quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = model.to(device)
    if setting.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    adapter = LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM") if setting.lora else None
    if setting.ratio is not None:
        config = TokenTuneConfig(selection_ratio=setting.ratio, task_type="CAUSAL_LM", peft_config=adapter)
        model = get_peft_model(model, config)
    elif adapter is not None:
        model = get_peft_model(model, adapter)
    return model.train()


@dataclass
class Measurement:
    setting: str
    saved_activation_bytes: int
    keys_values_bytes: int
    selected_fraction: float
    peak_memory_bytes: int
    step_seconds: float
    step_seconds_all: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def keys_and_values_bytes(model_config, batch_size: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of every layer's keys and values for one batch (what TokenTune must keep for all tokens).

    Example:
        >>> keys_and_values_bytes(LlamaConfig(**MODEL_CONFIGS["llama-256"]), 2, 512, torch.float32) // 2**20
        4
    """
    heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    element = torch.finfo(dtype).bits // 8
    return 2 * model_config.num_hidden_layers * batch_size * seq_len * heads * head_dim * element


def measure(
    model_name: str,
    setting_name: str,
    batch_size: int,
    seq_len: int,
    dtype: str = "float32",
    device: str = "cpu",
    steps: int = 5,
    warmup: int = 1,
    checkpoint_dir: str | None = None,
) -> Measurement:
    """Measure one setting: bytes saved for backward, process peak memory, median training-step time."""
    setting = Setting.parse(setting_name)
    torch_dtype = DTYPES[dtype]
    model = build_model(model_name, setting, torch_dtype, device, checkpoint_dir)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    outputs = {}
    saved = saved_activation_bytes(model, lambda: outputs.setdefault("out", model(**batch)))
    selected = outputs["out"].get("selected_positions")
    fraction = 1.0 if selected is None else float((selected >= 0).sum()) / input_ids.numel()
    outputs.clear()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(warmup + steps):
        _synchronize(device)
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return Measurement(
        setting=setting.name,
        saved_activation_bytes=saved,
        keys_values_bytes=keys_and_values_bytes(model.config, batch_size, seq_len, torch_dtype),
        selected_fraction=fraction,
        peak_memory_bytes=peak,
        step_seconds=statistics.median(times),
        step_seconds_all=times,
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
