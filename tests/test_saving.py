"""Saving: LoRA adapters plain peft loads, full models transformers loads, configs that round-trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tokentune_peft import TokenTuneConfig

from helpers import build_model, make_batch


def train_one_step(model, batch):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    model.eval()


def test_lora_adapter_loads_in_plain_peft_with_identical_outputs(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    build_model("llama", "CAUSAL_LM").save_pretrained(base_dir)
    config = TokenTuneConfig(
        selection_ratio=0.5, task_type="CAUSAL_LM", seed=7, peft_config=LoraConfig(r=4, target_modules="all-linear")
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    batch = make_batch(model, "CAUSAL_LM")
    train_one_step(model, batch)
    model.save_pretrained(adapter_dir)
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.save({"batch": batch, "logits": expected}, tmp_path / "expected.pt")

    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert set(adapter_config) <= set(LoraConfig().to_dict()) | {"peft_type", "task_type"}
    assert os.path.isfile(adapter_dir / "adapter_model.safetensors")

    plain_peft = textwrap.dedent(f"""
        import sys, torch, warnings
        warnings.simplefilter("error", UserWarning)
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        saved = torch.load({str(tmp_path / "expected.pt")!r})
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base_dir)!r}),
                                          {str(adapter_dir)!r}).eval()
        batch = saved["batch"]
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert "tokentune_peft" not in sys.modules
        assert torch.equal(logits, saved["logits"]), (logits - saved["logits"]).abs().max()
        print("identical")
    """)
    result = subprocess.run(
        [sys.executable, "-c", plain_peft], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "identical" in result.stdout

    loaded = TokenTuneConfig.from_pretrained(adapter_dir)
    assert (loaded.selection_ratio, loaded.seed, loaded.task_type) == (0.5, 7, "CAUSAL_LM")
    assert loaded.peft_config.r == 4 and loaded.peft_config.target_modules == config.peft_config.target_modules


def test_full_fine_tuning_saves_a_transformers_checkpoint(tmp_path):
    model = get_peft_model(build_model("bert", "SEQ_CLS"), TokenTuneConfig(task_type="SEQ_CLS"))
    assert all(p.requires_grad for p in model.parameters())
    batch = make_batch(model, "SEQ_CLS")
    train_one_step(model, batch)
    model.save_pretrained(tmp_path)

    assert sorted(os.listdir(tmp_path)) == ["README.md", "config.json", "model.safetensors", "tokentune_config.json"]
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)
    assert reloaded.config._attn_implementation == "sdpa"
    assert TokenTuneConfig.from_pretrained(tmp_path).peft_config is None


def test_config_round_trips_through_json(tmp_path):
    config = TokenTuneConfig(
        num_selected=32,
        task_type="TOKEN_CLS",
        always_select=[0, 3],
        seed=3,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
    )
    config.save_pretrained(tmp_path)
    loaded = TokenTuneConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert json.loads((tmp_path / "tokentune_config.json").read_text())["tokentune_version"]
