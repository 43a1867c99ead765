"""LoRA: the reference is the policy's base model with the adapter off — one copy of the weights."""
import copy
import json
from pathlib import Path

import torch

from dpo_exp import train as train_module
from dpo_exp.config import LoraConfig
from dpo_exp.data import collate_sequences
from dpo_exp.models import AdapterDisabled, apply_lora, sequence_logps


def test_reference_of_a_lora_policy_shares_its_weights_and_matches_the_base(tiny_lm):
    base = tiny_lm[1]
    original = copy.deepcopy(base)
    policy = apply_lora(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # move the adapter off zero so policy ≠ reference
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    reference = AdapterDisabled(policy)
    assert {p.data_ptr() for p in reference.parameters()} == {p.data_ptr() for p in policy.parameters()}
    batch = collate_sequences([[1, 5, 6]], [[7, 8, 2]], pad_id=0)
    with torch.no_grad():
        ref_logps = sequence_logps(reference, batch).logps
        base_logps = sequence_logps(original, batch).logps
        policy_logps = sequence_logps(policy, batch).logps
    torch.testing.assert_close(ref_logps, base_logps)
    assert not torch.allclose(policy_logps, base_logps)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)


def test_lora_dpo_run_saves_an_adapter_and_a_merged_model(smoke_cfg):
    from transformers import AutoModelForCausalLM

    cfg = smoke_cfg("model.lora.r=4", "optimizer.lr=1e-2", "optimizer.warmup_steps=0")
    summary = train_module.run(cfg)
    final = Path(cfg.paths.output_dir) / "checkpoints" / "final"
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 4
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    assert sum(p.numel() for p in merged.parameters()) > 0
    assert summary["eval/kl"] > 0  # the adapter moved the policy away from its own base
