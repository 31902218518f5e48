"""All-gather traffic and step time of FSDP2 with and without TokenTune, on the same model and batch.

Run from a checkout on 2 processes (CPU, gloo, or GPUs with nccl):

    python -m torch.distributed.run --nproc_per_node 2 -m scripts.benchmarks.fsdp_benchmark \\
        --output docs/fsdp/results.md

Each setting shards a fresh copy of one random Llama-architecture model with ``fully_shard`` (every
decoder layer, then the root) and runs ``--warmup`` + ``--steps`` training steps (forward, backward,
SGD step) on the same batch. FSDP2 calls ``torch.distributed.all_gather_single`` for every parameter
group it unshards and ``reduce_scatter_single`` for every gradient it reduces; the script wraps both
and counts the calls and the bytes of their output (all-gather) or input (reduce-scatter) tensors on
rank 0, per step. Step time is the median over the timed steps, measured on rank 0 after a barrier.
Rank 0 prints a Markdown table and writes it to ``--output``.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.fsdp import fully_shard
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM

from tokentune_peft import TokenTuneConfig
from tokentune_peft.distributed import set_backward_prefetch
from tokentune_peft.memory import MIB


@dataclass
class FsdpBenchmarkArguments:
    """What to measure. Every field is a command-line option."""

    hidden_size: int = field(default=256, metadata={"help": "Model width (Llama architecture)."})
    num_layers: int = field(default=4, metadata={"help": "Decoder layers, each one fully_shard unit."})
    vocab_size: int = field(default=4096, metadata={"help": "Vocabulary size (embedding and head)."})
    batch_size: int = field(default=4, metadata={"help": "Rows per process."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per row."})
    selection_ratio: float = field(default=0.3, metadata={"help": "TokenTune's selection ratio."})
    warmup: int = field(default=2, metadata={"help": "Untimed steps first."})
    steps: int = field(default=5, metadata={"help": "Timed steps."})
    output: str | None = field(default=None, metadata={"help": "Markdown file for the table (rank 0)."})


class CollectiveCounter:
    """Counts FSDP2's all-gathers and reduce-scatters (calls and bytes) while active."""

    # function -> the argument whose size is counted: an all-gather's output, a reduce-scatter's (full) input
    WRAPPED = {
        "all_gather_single": "output_tensor",
        "all_gather_into_tensor": "output_tensor",
        "reduce_scatter_single": "input",
    }

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self._originals = {name: getattr(dist, name) for name in self.WRAPPED}

    def __enter__(self) -> CollectiveCounter:
        for name, tensor_arg in self.WRAPPED.items():
            kind = "all_gather" if name.startswith("all_gather") else "reduce_scatter"
            setattr(dist, name, self._counting(self._originals[name], kind, tensor_arg))
        return self

    def _counting(self, original, kind: str, tensor_arg: str):
        signature = inspect.signature(original)

        def wrapper(*args, **kwargs):
            tensor = signature.bind(*args, **kwargs).arguments[tensor_arg]
            self.calls[kind] += 1
            self.bytes[kind] += tensor.numel() * tensor.element_size()
            return original(*args, **kwargs)

        return wrapper

    def __exit__(self, *exc_info) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)


def build(
    args: FsdpBenchmarkArguments, tokentune: bool, reshard_after_forward: bool, prefetch: bool
) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden_size,
        intermediate_size=args.hidden_size * 11 // 4,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.hidden_size // 64,
        num_key_value_heads=args.hidden_size // 64,
        vocab_size=args.vocab_size,
        max_position_embeddings=max(args.seq_len, 128),
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).train()
    if tokentune:
        model = get_peft_model(model, TokenTuneConfig(task_type="CAUSAL_LM", selection_ratio=args.selection_ratio))
    layers = model.base_model.model.model.layers if tokentune else model.model.layers
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    model = fully_shard(model, reshard_after_forward=reshard_after_forward)
    if prefetch:
        set_backward_prefetch(model)
    return model


def measure(args: FsdpBenchmarkArguments, tokentune: bool, reshard_after_forward: bool, prefetch: bool) -> dict:
    model = build(args, tokentune, reshard_after_forward, prefetch)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)  # the same batch on every rank and in every setting
    input_ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    batch = {"input_ids": input_ids, "labels": input_ids}
    times, calls, gathered, scattered = [], [], [], []
    for step in range(args.warmup + args.steps):
        dist.barrier()
        start = time.perf_counter()
        with CollectiveCounter() as counter:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            calls.append(counter.calls["all_gather"])
            gathered.append(counter.bytes["all_gather"])
            scattered.append(counter.bytes["reduce_scatter"])
    if len(set(gathered)) != 1:
        raise RuntimeError(f"all-gathered bytes changed from step to step: {gathered}")
    return {
        "all_gathers": calls[0],
        "all_gather_mib": gathered[0] / MIB,
        "reduce_scatter_mib": scattered[0] / MIB,
        "step_s": statistics.median(times),
    }


def table(args: FsdpBenchmarkArguments, rows: list[tuple[str, bool, dict]]) -> str:
    world = dist.get_world_size()
    device = "CPU, gloo" if dist.get_backend() == "gloo" else dist.get_backend()
    lines = [
        f"Llama architecture, hidden {args.hidden_size}, {args.num_layers} layers, vocabulary {args.vocab_size}; "
        f"{world} processes ({device}), {args.batch_size} x {args.seq_len} tokens per process; "
        f"`fully_shard` on every decoder layer and the root; median of {args.steps} steps after {args.warmup}.",
        "",
        "| setting | reshard_after_forward | all-gathers / step | all-gathered MiB / step (rank 0) "
        "| reduce-scattered MiB / step | step time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, reshard, result in rows:
        lines.append(
            f"| {name} | {reshard} | {result['all_gathers']} | {result['all_gather_mib']:.2f} "
            f"| {result['reduce_scatter_mib']:.2f} | {result['step_s']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Measure every setting and print the table on rank 0."""
    (args,) = HfArgumentParser(FsdpBenchmarkArguments).parse_args_into_dataclasses(args=argv)
    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rows = []
    for reshard in (True, False):
        tokentune = f"FSDP2 + TokenTune {args.selection_ratio}"
        settings = (
            ("FSDP2", False, False),
            (tokentune, True, False),
            (f"{tokentune}, set_backward_prefetch", True, True),
        )
        for name, with_tokentune, prefetch in settings:
            rows.append((name, reshard, measure(args, with_tokentune, reshard, prefetch)))
    if dist.get_rank() == 0:
        text = table(args, rows)
        print(text)
        if args.output:
            with open(args.output, "w") as handle:
                handle.write(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
