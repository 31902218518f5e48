"""Benchmark TokenTune on a GPU: a Llama-3.2-1B-shaped model against full fine-tuning and LoRA.

Settings run in a fixed order, each in a process of its own (spawned, so that its peak memory is its own).
Each setting's model is built once (random weights, seed 0, straight on the device; a ``+qlora`` setting's are
saved once to a temporary folder and loaded with the decoder's linear layers in 4-bit NF4 by bitsandbytes),
measured at every sequence length, then freed. ``+single-pass`` and ``+two-pass`` pick TokenTune's engine (side by
side); ``+compile`` and ``+cudagraphs`` wrap the model in ``torch.compile`` (default mode, and "reduce-overhead",
which replays CUDA graphs). At each length it reports the bytes saved for backward (one training forward,
:func:`tokentune_peft.saved_activation_bytes`), the peak memory of the training steps
(``torch.cuda.max_memory_allocated``, reset after the model is built and measured) and the median step
time (forward, backward and AdamW step, timed by CUDA events after warm-up steps), with ratios to full
fine-tuning, LoRA and QLoRA at the same length, and writes a Markdown table and JSON. Settings left when
``--time_budget_s`` is spent are skipped with a note.

    PYTHONPATH=src python -m scripts.gpu.gpu_benchmark --output_dir docs/benchmarks/gpu

``--device cpu --smoke`` is the seconds-long version on a tiny config (wall-clock times, peak resident set)
that the tests run.
"""

from __future__ import annotations

import gc
import importlib.util
import multiprocessing
import os
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, HfArgumentParser

from tokentune_peft import saved_activation_bytes
from tokentune_peft.memory import MIB

from scripts.benchmarks.common import (
    DTYPES,
    Setting,
    add_ratios,
    keys_and_values_bytes,
    measured_rows,
    peak_memory,
    random_batch,
    ratio_cell,
    reset_peak_memory,
    set_up,
    table_head,
    training_step,
)
from scripts.benchmarks.shapes import LLAMA_SHAPES, llama_config
from scripts.common import machine_description, write_report

GIB = 2**30
#: The suffix of a setting that computes the causal-LM loss with Liger-Kernel's fused linear cross-entropy.
LIGER = "+liger"
#: The suffixes of a setting whose model is wrapped in ``torch.compile``, and the mode of each.
COMPILE_MODES = {"+compile": "default", "+cudagraphs": "reduce-overhead"}
#: In order of importance, so that a spent time budget cuts the least important: the engines side by side first.
DEFAULT_SETTINGS = [
    "full",
    "lora",
    "tokentune-0.3+lora+single-pass",
    "tokentune-0.3+lora+two-pass",
    "tokentune-0.3+single-pass",
    "tokentune-0.3+two-pass",
    "tokentune-0.3+lora+compile",
    "tokentune-0.3+lora+cudagraphs",
    "lora+compile",
    "tokentune-0.1+lora",
    "lora+gc",
    "tokentune-0.3+lora+gc",
    "full+gc",
    "tokentune-0.3+lora+dense2",
    "lora+liger",
    "tokentune-0.3+lora+liger",
]
SMOKE_SETTINGS = [
    "full",
    "lora",
    "tokentune-0.3+single-pass",
    "tokentune-0.3+two-pass",
    "tokentune-0.3+lora+gc",
    "tokentune-0.3+dense1",
    "qlora",
    "tokentune-0.3+qlora",
    "tokentune-0.3+compile",
    "lora+liger",
]
#: The settings every row is compared with, at the same sequence length.
BASELINES = {"full": "full", "lora": "LoRA", "qlora": "QLoRA"}
COMPARED = ("peak_memory_bytes", "step_seconds", "saved_activation_bytes")


@dataclass
class GpuBenchmarkArguments:
    model: str = field(default="llama-3.2-1b", metadata={"help": f"A named config, one of {tuple(LLAMA_SHAPES)}."})
    settings: list[str] = field(
        default_factory=lambda: list(DEFAULT_SETTINGS),
        metadata={
            "help": "Settings, measured in this order: full, lora or tokentune-<ratio>, each optionally with +lora, "
            "+qlora (LoRA over a 4-bit NF4 base), +gc, +dense<L> (TokenTune's dense top layers), +single-pass or "
            f"+two-pass (TokenTune's engine), {LIGER} (Liger-Kernel's fused linear cross-entropy), and last "
            f"{' or '.join(COMPILE_MODES)} (torch.compile, default or reduce-overhead mode)."
        },
    )
    seq_lens: list[int] = field(default_factory=lambda: [2048, 8192], metadata={"help": "Tokens per sequence."})
    batch_size: int = field(default=1, metadata={"help": "Sequences per batch."})
    dtype: str = field(default="bfloat16", metadata={"help": f"One of {tuple(DTYPES)}."})
    device: str = field(default="cuda", metadata={"help": "cuda, or cpu (with --smoke)."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA's rank, on every linear layer."})
    warmup: int = field(default=3, metadata={"help": "Untimed training steps before the timed ones."})
    steps: int = field(default=5, metadata={"help": "Timed training steps; the median is reported."})
    time_budget_s: float = field(
        default=420.0, metadata={"help": "Seconds of measuring; settings not started by then are skipped."}
    )
    output_dir: str = field(default="outputs/gpu_benchmark", metadata={"help": "Where results.md and results.json go."})
    own_process: bool = field(
        default=True,
        metadata={"help": "Measure each setting in a process of its own, so that its peak memory is its own."},
    )
    smoke: bool = field(
        default=False, metadata={"help": "A seconds-long run: tiny config, a few settings, 1 warm-up and 1 timed step."}
    )

    def __post_init__(self):
        if self.smoke:
            self.model, self.settings, self.seq_lens, self.dtype = "llama-tiny", list(SMOKE_SETTINGS), [64], "float32"
            self.warmup, self.steps = 1, 1
        if self.dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {tuple(DTYPES)}; got {self.dtype!r}.")
        quantized = [name for name in self.settings if parse_setting(name)[0].quantized]  # parsing checks every name
        if quantized and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(f"`settings` {quantized} need a 4-bit base, and bitsandbytes is not installed.")
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"`device` is {self.device!r}, but torch sees no CUDA device; use --device cpu --smoke.")


def parse_setting(name: str) -> tuple[Setting, bool, str | None]:
    """A setting's name as the benchmarks' :class:`~scripts.benchmarks.common.Setting`, whether it uses
    Liger-Kernel, and its ``torch.compile`` mode (None: eager).

    Example:
        >>> setting, liger, compiled = parse_setting("tokentune-0.3+lora+liger+cudagraphs")
        >>> setting.ratio, setting.lora, liger, compiled
        (0.3, True, True, 'reduce-overhead')
    """
    compiled = next((mode for suffix, mode in COMPILE_MODES.items() if name.endswith(suffix)), None)
    for suffix in COMPILE_MODES:
        name = name.removesuffix(suffix)
    return Setting.parse(name.removesuffix(LIGER)), name.endswith(LIGER), compiled


def liger_unavailable(device: torch.device) -> str | None:
    """Why the Liger-Kernel settings cannot run here, or None when they can.

    Example:
        >>> liger_unavailable(torch.device("cpu"))
        'Liger-Kernel needs a CUDA device'
    """
    if device.type != "cuda":
        return "Liger-Kernel needs a CUDA device"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel is not installed"
    return None


def random_model(args: GpuBenchmarkArguments, device: torch.device):
    """The benchmark's model with random weights (seed 0), built on ``device``."""
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(
            llama_config(args.model), dtype=DTYPES[args.dtype], attn_implementation="sdpa"
        )


def four_bit_model(args: GpuBenchmarkArguments, device: torch.device, staging_dir: str):
    """The same random weights with the decoder's linear layers in 4-bit NF4 (bitsandbytes, computing in the
    benchmark's dtype), loaded as transformers loads a QLoRA base; saved to ``staging_dir`` the first time.
    The other weights keep the benchmark's dtype (no fp32 upcast, as ``prepare_model_for_kbit_training`` does).
    Hub kernels stay off, as in the settings built from the config (``from_pretrained`` would fetch them)."""
    folder = os.path.join(staging_dir, args.model)
    if not os.path.isdir(folder):
        random_model(args, device).save_pretrained(folder)
        free_memory(device)
    dtype = DTYPES[args.dtype]
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=dtype,
        attn_implementation="sdpa",
        quantization_config=quantization,
        device_map={"": device},
        use_kernels=False,
    )


def build_model(args: GpuBenchmarkArguments, name: str, device: torch.device, staging_dir: str):
    """The model of setting ``name`` on ``device``, set up for training."""
    setting, liger, compiled = parse_setting(name)
    model = four_bit_model(args, device, staging_dir) if setting.quantized else random_model(args, device)
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        # Only the loss: this instance's forward computes it from the last hidden states in chunks, never
        # holding the logits. Liger's other kernels are left off, so the rows differ from their base by that alone.
        apply_liger_kernel_to_llama(
            rope=False, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=False, swiglu=False, model=model
        )
    model = set_up(model, setting, "CAUSAL_LM", lora_rank=args.lora_rank)
    return model if compiled is None else torch.compile(model, mode=compiled)


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step`` after ``warmup`` untimed ones: CUDA events on a GPU,
    the wall clock elsewhere.

    Example:
        >>> times = time_steps(lambda: None, torch.device("cpu"), warmup=1, steps=3)
        >>> len(times), all(t >= 0 for t in times)
        (3, True)
    """
    for _ in range(warmup):
        step()
    if device.type != "cuda":
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1000 for start, end in events]


def measure(args: GpuBenchmarkArguments, name: str, model, optimizer, seq_len: int, device: torch.device) -> dict:
    """One setting at one sequence length: saved activations, peak memory of the steps, median step time."""
    batch = random_batch(model.config.vocab_size, args.batch_size, seq_len, "CAUSAL_LM", device)
    saved = saved_activation_bytes(model, lambda: model(**batch))
    reset_peak_memory(device)
    times = time_steps(lambda: training_step(model, batch, optimizer), device, args.warmup, args.steps)
    return {
        "setting": name,
        "seq_len": seq_len,
        "peak_memory_bytes": peak_memory(device),
        "step_seconds": statistics.median(times),
        "step_seconds_all": times,
        "saved_activation_bytes": saved,
        "keys_values_bytes": keys_and_values_bytes(model.config, args.batch_size, seq_len, DTYPES[args.dtype]),
    }


def failed(name: str, seq_len: int, error: Exception) -> dict:
    """The row of a setting that raised ``error`` at ``seq_len`` (the traceback is printed by the caller).

    Example:
        >>> failed("full", 8, RuntimeError("CUDA out of memory.\\nMore."))["error"]
        'RuntimeError: CUDA out of memory.'
    """
    message = str(error).splitlines()[0] if str(error) else ""
    return {"setting": name, "seq_len": seq_len, "error": f"{type(error).__name__}: {message}"}


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_setting(args: GpuBenchmarkArguments, name: str, device: torch.device, staging_dir: str) -> list[dict]:
    """Build setting ``name``'s model once, measure it at every sequence length, free it."""
    try:
        model = build_model(args, name, device, staging_dir)
    except Exception as error:  # a setting that cannot run is a row of the table, not the end of the run
        traceback.print_exc()
        return [failed(name, seq_len, error) for seq_len in args.seq_lens]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    rows = []
    for seq_len in args.seq_lens:
        try:
            rows.append(measure(args, name, model, optimizer, seq_len, device))
        except Exception as error:  # out of memory, say: the next length or setting may still run
            traceback.print_exc()
            optimizer.zero_grad(set_to_none=True)
            rows.append(failed(name, seq_len, error))
        free_memory(device)
    del model, optimizer
    free_memory(device)
    return rows


def run_setting_in_own_process(
    args: GpuBenchmarkArguments, name: str, device: torch.device, staging_dir: str
) -> list[dict]:
    """:func:`run_setting` in a spawned process: it starts with no memory of another setting's in use or cached."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        try:
            return pool.submit(run_setting, args, name, device, staging_dir).result()
        except BrokenProcessPool as error:  # the process died (killed for memory, say): a row, not the end of the run
            return [failed(name, seq_len, error) for seq_len in args.seq_lens]


def run_all(args: GpuBenchmarkArguments) -> tuple[list[dict], list[str]]:
    """Every setting at every length, in order, within the time budget; the rows and the notes on skips."""
    device = torch.device(args.device)
    no_liger = liger_unavailable(device)
    start = time.perf_counter()
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="gpu_benchmark_") as staging:  # the 4-bit settings' weights, once
        for name in args.settings:
            reason = None
            if parse_setting(name)[1] and no_liger:
                reason = no_liger
            elif time.perf_counter() - start > args.time_budget_s:
                reason = f"the time budget of {args.time_budget_s:.0f} s was spent"
            if reason:
                rows += [{"setting": name, "seq_len": seq_len, "skipped": reason} for seq_len in args.seq_lens]
                notes.append(f"{name} skipped: {reason}.")
            else:
                run = run_setting_in_own_process if args.own_process else run_setting
                rows += run(args, name, device, staging)
            print(f"{name}: {time.perf_counter() - start:.0f} s so far", flush=True)
    return with_ratios(rows), notes


def with_ratios(rows: list[dict]) -> list[dict]:
    """Add each measured row's ratios to full fine-tuning and to LoRA at the same sequence length.

    Example:
        >>> rows = with_ratios([{"setting": "full", "seq_len": 8, "step_seconds": 2.0},
        ...                     {"setting": "x", "seq_len": 8, "step_seconds": 1.0}])
        >>> rows[1]["step_seconds_vs_full"], "step_seconds_vs_lora" in rows[1]
        (0.5, False)
    """
    measured = measured_rows(rows)
    for (_, seq_len), row in measured.items():
        for baseline in BASELINES:
            add_ratios(row, measured.get((baseline, seq_len)), COMPARED, baseline)
    return rows


def markdown_table(rows: list[dict]) -> str:
    vs = " | ".join(f"vs {label}" for label in BASELINES.values())
    header = f"| setting | tokens | peak (GiB) | {vs} | step (ms) | {vs} | saved activations (MiB) | vs full |"
    columns = header.count("|") - 1
    lines = table_head(header)

    def ratios(row: dict, key: str, baselines=tuple(BASELINES)) -> str:
        return " | ".join(ratio_cell(row, f"{key}_vs_{baseline}") for baseline in baselines)

    for row in rows:
        if "step_seconds" not in row:
            outcome = f"skipped: {row['skipped']}" if "skipped" in row else f"failed: {row['error'][:100]}"
            lines.append(f"| {row['setting']} | {row['seq_len']} | {outcome} |" + " |" * (columns - 3))
            continue
        lines.append(
            f"| {row['setting']} | {row['seq_len']} | {row['peak_memory_bytes'] / GIB:.2f} "
            f"| {ratios(row, 'peak_memory_bytes')} | {row['step_seconds'] * 1000:.1f} | {ratios(row, 'step_seconds')} "
            f"| {row['saved_activation_bytes'] / MIB:.1f} | {ratios(row, 'saved_activation_bytes', ('full',))} |"
        )
    return "\n".join(lines)


def describe(args: GpuBenchmarkArguments, machine: str) -> str:
    config = llama_config(args.model)
    cuda = torch.device(args.device).type == "cuda"
    return (
        f"Model {args.model} (hidden {config.hidden_size}, {config.num_hidden_layers} layers, vocabulary "
        f"{config.vocab_size}, random weights), batch {args.batch_size}, {args.dtype}, sdpa attention, "
        f"{args.device}; machine: {machine}. LoRA r={args.lora_rank} on every linear layer; +qlora: the same over "
        "a 4-bit NF4 base (bitsandbytes; the other weights unquantized, not upcast); +gc: non-reentrant "
        f"gradient checkpointing; +dense<L>: TokenTune's dense top layers; {LIGER}: Liger-Kernel's fused linear "
        f"cross-entropy; +single-pass / +two-pass: TokenTune's engine (auto otherwise); "
        f"{' / '.join(COMPILE_MODES)}: torch.compile in mode {' / '.join(COMPILE_MODES.values())}. "
        f"{'Each setting in a process of its own. ' if args.own_process else 'All settings in one process. '}"
        f"Step: forward, backward and AdamW step, median of {args.steps} after {args.warmup} "
        f"warm-up ({'CUDA events' if cuda else 'wall clock'}). Peak: "
        f"{'torch.cuda.max_memory_allocated' if cuda else 'the process peak resident set'} over the steps, "
        "counted from after the model is built. Saved activations: bytes autograd keeps for backward in one "
        "training forward."
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m scripts.gpu.gpu_benchmark``."""
    (args,) = HfArgumentParser(GpuBenchmarkArguments).parse_args_into_dataclasses(args=argv)
    rows, notes = run_all(args)
    machine = machine_description(torch.device(args.device).type)
    report = describe(args, machine) + "\n\n" + "".join(f"- {note}\n" for note in notes)
    report += ("\n" if notes else "") + markdown_table(rows) + "\n"
    data = {"arguments": asdict(args), "machine": machine, "notes": notes, "results": rows}
    write_report(args.output_dir, "results.md", report, "results.json", data)


if __name__ == "__main__":
    main()
