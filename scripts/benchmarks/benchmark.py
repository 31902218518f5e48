"""Benchmark TokenTune against full fine-tuning, LoRA, QLoRA and gradient checkpointing.

Each setting runs in a process of its own, so that peak-memory figures do not mix. For one batch it
reports the bytes saved for backward, the peak memory of the training steps (peak resident set on
CPU, ``torch.cuda.max_memory_allocated`` on GPU, both counted from after the model is loaded) and
the median training-step time (optimizer step included), with ratios to full fine-tuning from the
same run, and writes a Markdown table, JSON and PNG plots.

    python -m scripts.benchmarks.benchmark --model llama-1024 --batch_size 2 --seq_len 512 --output_dir docs/benchmarks

Image models (:data:`~scripts.benchmarks.shapes.IMAGE_MODELS`) take random images: "vit-b16" classifies
224 px images (197 tokens; ``seq_len`` is unused), "smolvlm-512" reads one 512 px image (64 image tokens) before
``seq_len`` text tokens; its LoRA settings put LoRA on the language model only, so its vision tower is frozen,
while full fine-tuning trains the tower too (with its full activations: TokenTune selects on the language model).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
from peft import prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForImageTextToText,
    AutoModelForSequenceClassification,
    BitsAndBytesConfig,
    HfArgumentParser,
)

from tokentune_peft.cli.plots import new_figure, save_figure
from tokentune_peft.layers import transformer_layers
from tokentune_peft.memory import MIB, SavedTensorMeter

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
    synchronize,
    table_head,
    training_step,
)
from scripts.benchmarks.shapes import IMAGE_MODELS, LLAMA_SHAPES, SMOLVLM_IMAGE_TOKEN, image_model_config, llama_config
from scripts.common import ROOT, machine_description

#: Real pretrained models installed offline (see :mod:`tokentune_peft.cli.offline`), and their task.
PRETRAINED_TASKS = {"smollm2": "CAUSAL_LM", "minilm": "SEQ_CLS"}
#: The task of each image model, the auto class that loads it, and its LoRA targets.
IMAGE_TASKS = {"vit-b16": "SEQ_CLS", "smolvlm-512": "CAUSAL_LM"}
IMAGE_AUTO_CLASSES = {"vit-b16": AutoModelForImageClassification, "smolvlm-512": AutoModelForImageTextToText}
LORA_TARGETS = {"smolvlm-512": r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"}
RATIOS = (0.1, 0.2, 0.3, 0.5)
DEFAULT_SETTINGS = ["full", "full+gc", "lora", "qlora"] + [
    f"tokentune-{ratio}{extra}" for ratio in RATIOS for extra in ("", "+lora", "+qlora", "+gc")
]
DEFAULT_SETTINGS.insert(DEFAULT_SETTINGS.index("tokentune-0.3") + 1, "tokentune-0.3+two-pass")


@dataclass
class Measurement:
    setting: str
    seq_len: int
    saved_activation_bytes: int
    #: Of those, the bytes saved from each transformer layer's input on (that layer, those above, the head, the loss).
    saved_bytes_from_layer: list[int]
    keys_values_bytes: int
    selected_fraction: float
    peak_memory_bytes: int
    step_seconds: float
    step_seconds_all: list[float]


def model_task(model_name: str) -> str:
    return {**PRETRAINED_TASKS, **IMAGE_TASKS}.get(model_name, "CAUSAL_LM")


def stage_model(model_name: str, staging_dir: str, num_hidden_layers: int | None = None) -> str:
    """The folder a setting loads its model from. A named config's random weights (seed 0) are saved
    into ``staging_dir`` first, so every setting, quantized or not, loads the same weights from disk
    and no worker's peak memory includes building them."""
    if model_name in LLAMA_SHAPES:
        torch.manual_seed(0)
        config = llama_config(model_name, **({"num_hidden_layers": num_hidden_layers} if num_hidden_layers else {}))
        AutoModelForCausalLM.from_config(config).save_pretrained(staging_dir)
        return staging_dir
    if model_name in IMAGE_MODELS:
        torch.manual_seed(0)
        IMAGE_AUTO_CLASSES[model_name].from_config(image_model_config(model_name)).save_pretrained(staging_dir)
        return staging_dir
    if model_name in PRETRAINED_TASKS:
        from tokentune_peft.cli import offline

        return offline.minilm_path() if model_name == "minilm" else offline.smollm2_path()
    return model_name


def build_model(model_name: str, folder: str, setting: Setting, dtype: torch.dtype, device: str):
    """The model saved in ``folder`` set up for ``setting``, in training mode."""
    quantization = None
    if setting.quantized:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    task = model_task(model_name)
    auto = AutoModelForSequenceClassification if task == "SEQ_CLS" else AutoModelForCausalLM
    auto = IMAGE_AUTO_CLASSES.get(model_name, auto)
    model = auto.from_pretrained(folder, attn_implementation="sdpa", dtype=dtype, quantization_config=quantization)
    if setting.quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = model.to(device)
    return set_up(model, setting, task, lora_targets=LORA_TARGETS.get(model_name, "all-linear"))


def image_batch(model_name: str, batch_size: int, text_tokens: int, device: torch.device) -> dict:
    """Random images (seed 0) for an image model, with labels: 224 px and a class for "vit-b16"; for
    "smolvlm-512" one 512 px image whose 64 image tokens open each row, then ``text_tokens`` random tokens,
    all of them labels.

    Example:
        >>> batch = image_batch("smolvlm-512", 2, 8, torch.device("cpu"))
        >>> batch["input_ids"].shape, batch["pixel_values"].shape
        (torch.Size([2, 72]), torch.Size([2, 1, 3, 512, 512]))
    """
    generator = torch.Generator().manual_seed(0)
    if model_name == "vit-b16":
        pixel_values = torch.randn(batch_size, 3, 224, 224, generator=generator)
        labels = torch.randint(0, 10, (batch_size,), generator=generator)
        return {"pixel_values": pixel_values.to(device), "labels": labels.to(device)}
    text = torch.randint(0, SMOLVLM_IMAGE_TOKEN, (batch_size, text_tokens), generator=generator)
    input_ids = torch.cat([torch.full((batch_size, 64), SMOLVLM_IMAGE_TOKEN), text], dim=1).to(device)
    labels = input_ids.masked_fill(input_ids == SMOLVLM_IMAGE_TOKEN, -100)
    pixel_values = torch.randn(batch_size, 1, 3, 512, 512, generator=generator).to(device)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": pixel_values,
    }


def sequence_length(model, batch: dict) -> int:
    """Tokens per row of the sequence TokenTune selects from: the text, or a vision transformer's patches
    and class token."""
    if "input_ids" in batch:
        return batch["input_ids"].shape[1]
    return (model.config.image_size // model.config.patch_size) ** 2 + 1


def measure(args: BenchmarkArguments, setting_name: str, seq_len: int, steps: int) -> Measurement:
    """Measure one setting: bytes saved for backward, process peak memory, median training-step time."""
    setting = Setting.parse(setting_name)
    torch_dtype = DTYPES[args.dtype]
    model = build_model(args.model, args.model_folder, setting, torch_dtype, args.device)
    model_name, batch_size, warmup = args.model, args.batch_size, args.warmup
    device = next(model.parameters()).device
    if model_name in IMAGE_MODELS:
        batch = image_batch(model_name, batch_size, seq_len, device)
    else:
        batch = random_batch(model.config.vocab_size, batch_size, seq_len, model_task(model_name), device)
    seq_len = sequence_length(model, batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    meter = SavedTensorMeter(model, measure_only=True)
    at_layer_start = []  # for a setting without TokenTune, whose layers each run once
    hooks = [
        layer.register_forward_pre_hook(lambda *_: at_layer_start.append(meter.saved_bytes))
        for layer in (transformer_layers(model) if setting.ratio is None else [])
    ]
    with meter:
        output = model(**batch)
    for hook in hooks:
        hook.remove()
    saved = meter.saved_bytes
    selected = output.get("selected_positions")
    del output
    fraction = 1.0 if selected is None else float((selected >= 0).sum()) / (batch_size * seq_len)

    reset_peak_memory(device)
    times = []
    for step in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        training_step(model, batch, optimizer)
        synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    peak = peak_memory(device)
    return Measurement(
        setting=setting_name,
        seq_len=seq_len,
        saved_activation_bytes=saved,
        saved_bytes_from_layer=[saved - start for start in at_layer_start],
        keys_values_bytes=keys_and_values_bytes(model.config, batch_size, seq_len, torch_dtype),
        selected_fraction=fraction,
        peak_memory_bytes=peak,
        step_seconds=statistics.median(times),
        step_seconds_all=times,
    )


@dataclass
class BenchmarkArguments:
    model: str = field(
        default="llama-1024",
        metadata={
            "help": f"A named config {tuple(LLAMA_SHAPES)} or image model {IMAGE_MODELS} with random "
            f"weights, an offline pretrained model {tuple(PRETRAINED_TASKS)}, or a local folder."
        },
    )
    settings: list[str] = field(
        default_factory=lambda: list(DEFAULT_SETTINGS),
        metadata={"help": "Settings: full, lora, qlora or tokentune-<ratio>, each optionally with +lora, +qlora, +gc."},
    )
    num_hidden_layers: int | None = field(
        default=None, metadata={"help": "A named config's number of transformer layers, if not its own."}
    )
    batch_size: int = field(default=2, metadata={"help": "Sequences per batch."})
    seq_len: int = field(default=512, metadata={"help": "Tokens per sequence for the settings table."})
    sweep: bool = field(default=True, metadata={"help": "Also run the sequence-length sweep."})
    sweep_seq_lens: list[int] = field(
        default_factory=lambda: [256, 512, 1024, 2048, 4096],
        metadata={"help": "Sequence lengths of the sweep (empty: no sweep)."},
    )
    sweep_settings: list[str] = field(
        default_factory=lambda: ["full", "tokentune-0.3"], metadata={"help": "Settings measured at each sweep length."}
    )
    dtype: str = field(default="float32", metadata={"help": f"One of {tuple(DTYPES)}."})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda."})
    steps: int = field(default=5, metadata={"help": "Timed training steps; the median is reported."})
    warmup: int = field(default=1, metadata={"help": "Untimed steps first."})
    sweep_steps: int = field(default=2, metadata={"help": "Timed steps per sweep point."})
    output_dir: str = field(default="outputs/benchmark", metadata={"help": "Where results and plots go."})
    quick: bool = field(default=False, metadata={"help": "A seconds-long run on a tiny config, in one process (CI)."})
    separate_processes: bool = field(
        default=True,
        metadata={"help": "Measure each setting in a process of its own (otherwise peak memory is the whole run's)."},
    )
    worker: bool = field(default=False, metadata={"help": "Internal: measure one setting, print JSON."})
    model_folder: str | None = field(default=None, metadata={"help": "Internal: where workers load the model."})

    def __post_init__(self):
        if self.quick:
            self.model, self.batch_size, self.seq_len, self.steps, self.sweep_steps = "llama-tiny", 2, 64, 2, 1
            self.settings = [
                "full",
                "lora",
                "tokentune-0.3",
                "tokentune-0.3+dense1",
                "tokentune-0.3+lora",
                "tokentune-0.3+gc",
            ]
            self.sweep_seq_lens = [32, 64]
            self.separate_processes = False
        if self.dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {tuple(DTYPES)}; got {self.dtype!r}.")


def run_worker(args: BenchmarkArguments, setting: str, seq_len: int, steps: int) -> dict:
    """Measure one setting, in a process of its own unless ``args.separate_processes`` is off."""
    if not args.separate_processes:
        return asdict(measure(args, setting, seq_len, steps))
    flags = {
        "model": args.model,
        "model_folder": args.model_folder,
        "settings": setting,
        "seq_len": seq_len,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "device": args.device,
        "steps": steps,
        "warmup": args.warmup,
    }
    command = [sys.executable, "-m", __spec__.name, "--worker"]
    for name, value in flags.items():
        command += [f"--{name}", str(value)]
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))  # the worker imports `scripts`
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path})
    if result.returncode != 0:
        return {"setting": setting, "seq_len": seq_len, "error": result.stderr.strip().splitlines()[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def ideal_bytes(row: dict, baseline: dict, dense: int) -> float:
    """What a TokenTune row should keep: r x the baseline's bytes below the first dense layer, plus every
    token's keys and values in those layers, plus the baseline's bytes from the first dense layer on
    (the top ``dense`` layers, the head and the loss); without dense layers, r x baseline + (1 - r) x keys
    and values.

    Example:
        >>> ideal_bytes({"selected_fraction": 0.5, "keys_values_bytes": 40}, {"saved_activation_bytes": 100,
        ...     "saved_bytes_from_layer": [90, 70, 50, 30]}, dense=1)
        80.0
    """
    r = row["selected_fraction"]
    from_layer = baseline["saved_bytes_from_layer"]
    layers = len(from_layer)
    top = from_layer[layers - dense] if dense else 0
    keys_values = row["keys_values_bytes"] * (layers - dense) / layers
    return r * (baseline["saved_activation_bytes"] - top) + (1 - r) * keys_values + top


#: Columns each row is compared on, against full fine-tuning and against its setting without dense layers.
COMPARED = ("saved_activation_bytes", "peak_memory_bytes", "step_seconds")


def with_ratios(rows: list[dict]) -> list[dict]:
    """Add ratios to full fine-tuning; to the ideal against each row's own baseline (the same setting without
    TokenTune, :func:`ideal_bytes`); and, for rows with dense top layers, to the same setting without them."""
    measured = measured_rows(rows)
    for (name, seq_len), row in measured.items():
        full = measured.get(("full", seq_len))
        if full is None:
            continue
        add_ratios(row, full, COMPARED, "full")
        setting = Setting.parse(name)
        baseline = measured.get((setting.baseline, seq_len))
        if setting.ratio is not None and baseline is not None:
            row["saved_vs_ideal"] = row["saved_activation_bytes"] / ideal_bytes(row, baseline, setting.dense)
        if setting.dense:
            add_ratios(row, measured.get((setting.without_dense, seq_len)), COMPARED, "dense0")
    return rows


def markdown_table(rows: list[dict]) -> str:
    dense = any("saved_activation_bytes_vs_dense0" in row for row in rows)
    header = "| setting | tokens | saved activations (MiB) | vs full | vs ideal | peak memory (MiB) | vs full "
    header += "| step (s) | vs full |" + (" saved vs L=0 | peak vs L=0 | step vs L=0 |" if dense else "")
    lines = table_head(header)
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['setting']} | {row['seq_len']} | failed: {row['error'][:80]} |||||||")
            continue
        line = (
            f"| {row['setting']} | {row['seq_len']} | {row['saved_activation_bytes'] / MIB:.1f} "
            f"| {ratio_cell(row, 'saved_activation_bytes_vs_full')} | {ratio_cell(row, 'saved_vs_ideal')} "
            f"| {row['peak_memory_bytes'] / MIB:.0f} | {ratio_cell(row, 'peak_memory_bytes_vs_full')} "
            f"| {row['step_seconds']:.3f} | {ratio_cell(row, 'step_seconds_vs_full')} |"
        )
        if dense:
            line += "".join(f" {ratio_cell(row, f'{key}_vs_dense0')} |" for key in COMPARED)
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list[dict], sweep: list[dict], output_dir: str, caption: str) -> list[str]:
    """memory_vs_ratio.png, step_time_vs_ratio.png and memory_vs_seq_len.png; returns their paths."""
    paths = []
    families = {}
    for row in rows:
        if "error" in row:
            continue
        setting = Setting.parse(row["setting"])
        if setting.selection != "uniform" or setting.engine != "auto" or setting.dense:  # in tables of their own
            continue
        families.setdefault(setting.baseline, {})[setting.ratio if setting.ratio is not None else 1.0] = row
    for key, label, name in [
        ("saved_activation_bytes", "saved activations (MiB)", "memory_vs_ratio.png"),
        ("step_seconds", "training step (s)", "step_time_vs_ratio.png"),
    ]:
        figure, (axis,) = new_figure()
        for family, points in sorted(families.items()):
            ratios = sorted(points)
            scale = MIB if key.endswith("bytes") else 1
            axis.plot(
                ratios,
                [points[r][key] / scale for r in ratios],
                marker="o",
                label=f"TokenTune{'' if family == 'full' else ' + ' + family} (1.0 = {family})",
            )
        axis.set_xlabel("selection ratio")
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
        paths.append(save_figure(figure, os.path.join(output_dir, name), caption))
    if sweep:
        figure, (axis,) = new_figure()
        for setting in sorted({row["setting"] for row in sweep}):
            points = sorted(
                (row["seq_len"], row["saved_activation_bytes"] / MIB)
                for row in sweep
                if row["setting"] == setting and "error" not in row
            )
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=setting)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("tokens per sequence")
        axis.set_ylabel("saved activations (MiB)")
        axis.legend(fontsize=8)
        paths.append(save_figure(figure, os.path.join(output_dir, "memory_vs_seq_len.png"), caption))
    return paths


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m scripts.benchmarks.benchmark``."""
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(args=argv)
    if args.worker:
        print(json.dumps(asdict(measure(args, args.settings[0], args.seq_len, args.steps))))
        return
    with tempfile.TemporaryDirectory() as staging_dir:
        args.model_folder = stage_model(args.model, staging_dir, args.num_hidden_layers)
        run_all(args)


def run_all(args: BenchmarkArguments) -> None:
    """Measure every setting and the sweep; write the table, the JSON and the plots."""
    settings = args.settings if "full" in args.settings else ["full", *args.settings]
    rows = []
    for setting in settings:
        rows.append(run_worker(args, setting, args.seq_len, args.steps))
        print(f"{setting}: {json.dumps({k: v for k, v in rows[-1].items() if k != 'step_seconds_all'})}", flush=True)
    sweep = []
    for seq_len in args.sweep_seq_lens if args.sweep else []:
        for setting in args.sweep_settings:
            sweep.append(run_worker(args, setting, seq_len, args.sweep_steps))
            print(
                f"sweep {seq_len} {setting}: {sweep[-1].get('saved_activation_bytes', sweep[-1].get('error'))}",
                flush=True,
            )
    rows, sweep = with_ratios(rows), with_ratios(sweep)
    machine = machine_description(args.device)
    caption = f"{args.model}, batch {args.batch_size}, {args.dtype}, {args.device}; {machine}"
    os.makedirs(args.output_dir, exist_ok=True)
    report = (
        f"Model {args.model}, batch {args.batch_size} (tokens per row in the table), {args.dtype}, {args.device}; "
        f"machine: {machine}.\n\n{markdown_table(rows)}\n"
    )
    if sweep:
        report += f"\nSequence-length sweep (batch {args.batch_size}):\n\n{markdown_table(sweep)}\n"
    with open(os.path.join(args.output_dir, "results.md"), "w") as handle:
        handle.write(report)
    results = {
        "arguments": asdict(args),
        "machine": machine,
        "results": rows,
        "sweep": sweep,
        "plots": plot(rows, sweep, args.output_dir, caption),
    }
    with open(os.path.join(args.output_dir, "results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    print(report)


if __name__ == "__main__":
    main()
