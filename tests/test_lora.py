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


def test_a_lora_run_reuses_the_plain_runs_sft_policy_and_pairs(smoke_cfg, tmp_path):
    """π_SFT is not a LoRA stage: the adapter of the DPO stage (like β and the loss) is not in its key."""
    cache = tmp_path / "own_cache"
    plain = train_module.run(smoke_cfg(f"paths.cache_dir={cache}", f"paths.output_dir={tmp_path / 'plain'}"))
    entries = {stage: sorted(p.name for p in (cache / stage).iterdir() if p.is_dir()) for stage in ("sft", "pairs")}
    assert all(len(names) == 1 for names in entries.values())
    lora = train_module.run(smoke_cfg(f"paths.cache_dir={cache}", f"paths.output_dir={tmp_path / 'lora'}",
                                      "model.lora.r=4", "loss.beta=0.5", "loss=ipo"))
    assert {stage: sorted(p.name for p in (cache / stage).iterdir() if p.is_dir()) for stage in entries} == entries
    assert lora["sft_policy"] == plain["sft_policy"]


def test_the_sft_key_holds_what_makes_pi_sft_and_nothing_of_later_stages(smoke_cfg):
    from dpo_exp.stages import sft_key

    base = sft_key(smoke_cfg())
    for later in (["model.lora.r=16"], ["loss=ipo", "loss.beta=0.5"], ["data.max_length=96"],
                  ["model.block_class=LlamaDecoderLayer"], ["model.gradient_checkpointing=true"],
                  ["trainer.batch_size=8"], ["optimizer.lr=1e-3"]):
        assert sft_key(smoke_cfg(*later)) == base, later
    for sft_setting in (["sft.max_steps=41"], ["sft.optimizer.lr=1e-3"], ["seed=1"], ["data.vocab_size=301"],
                        ["model.architecture.hidden_size=48"], ["model.policy_dtype=bfloat16"],
                        ["trainer.precision=bf16"], ["data.max_prompt_length=6"]):
        assert sft_key(smoke_cfg(*sft_setting)) != base, sft_setting
