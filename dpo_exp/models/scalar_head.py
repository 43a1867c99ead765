"""A causal-LM backbone with a scalar head: the reward model and PPO's value model."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from dpo_exp.data import Batch
from dpo_exp.models.loading import disable_dropout, load_model

HEAD_FILE = "score_head.safetensors"
HEAD_CONFIG = "scalar_head.json"


class ScalarHeadModel(nn.Module):
    """A causal-LM backbone (AutoModelForCausalLM) + nn.Linear(hidden, 1): one scalar per token.

    The backbone's base model (`backbone.base_model`, e.g. LlamaModel) gives the final
    hidden states, so the vocabulary projection is never computed. The head runs in float32.
    `offset` is the reward normalisation: `score` returns raw − offset, so that π_SFT's
    samples have mean score 0 (N+ details, "reward normalisation"). A response's score is read at its end
    token: the first of `end_ids` (the policy's stop tokens, dpo_exp.models.templates.stop_token_ids) in it,
    where a sample stops, even when a template writes more after it (Qwen's newline after `<|im_end|>`); else
    its last token.

    Saved in Hugging Face format: `backbone.save_pretrained(folder)` (a loadable causal LM)
    + `score_head.safetensors` (weight (1, H), bias (1,)) + `scalar_head.json` (offset, end_ids).
    """

    def __init__(self, backbone: nn.Module, head_init_std: Optional[float] = None, offset: float = 0.0,
                 end_ids: Sequence[int] = ()):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.get_text_config().hidden_size
        self.head = nn.Linear(hidden, 1)
        # reward head: N(0, 1/sqrt(H+1)) (N+ details); value head from scratch: zeros (lm-human-preferences)
        std = 1.0 / math.sqrt(hidden + 1) if head_init_std is None else head_init_std
        with torch.no_grad():
            if std > 0:
                nn.init.normal_(self.head.weight, std=std)
            else:
                nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.head.to(device=next(backbone.parameters()).device)
        self.offset = float(offset)
        self.end_ids = [int(i) for i in end_ids]

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, L) ids → (B, L) raw scalars, float32 (one per position; no offset)."""
        body = getattr(self.backbone, "base_model", None)
        if body is not None and body is not self.backbone:
            hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        else:  # models without a separate base model: ask for the hidden states
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=False, output_hidden_states=True).hidden_states[-1]
        with torch.autocast(device_type=hidden.device.type, enabled=False):  # float32 head even under bf16 autocast
            return self.head(hidden.float()).squeeze(-1)

    def forward_batch(self, batch: Batch) -> torch.Tensor:
        """(B, L) raw scalars of a padded batch's rows."""
        device = self.head.weight.device
        return self(batch.input_ids.to(device), batch.attention_mask.to(device), batch.position_ids.to(device))

    def raw_score(self, batch: Batch) -> torch.Tensor:
        """(B,) scalar at each row's end token (see the class docstring) of a left-padded batch."""
        if not batch.padded or not bool(batch.attention_mask[:, -1].all()):
            raise ValueError("ScalarHeadModel.score expects left-padded batches (data.collate_sequences)")
        scalars = self.forward_batch(batch)
        return scalars.gather(1, self.end_columns(batch).to(scalars.device)[:, None]).squeeze(1)

    def end_columns(self, batch: Batch) -> torch.Tensor:
        """(B,) column of each row's end token: its response's first end id, else the last column."""
        ids = batch.input_ids
        width = ids.shape[1]
        last = torch.full((ids.shape[0],), width - 1, dtype=torch.long, device=ids.device)
        if not self.end_ids:
            return last
        mask = batch.response_mask.to(ids.device)                        # (B, R), the last R columns
        responses = mask.shape[1]
        ends = torch.isin(ids[:, width - responses:], torch.tensor(self.end_ids, device=ids.device)) & mask
        first = ends.long().argmax(-1)                                     # the first end token (argmax: first max)
        return torch.where(ends.any(-1), width - responses + first, last)

    def score(self, batch: Batch) -> torch.Tensor:
        """(B,) normalised score: raw − offset."""
        return self.raw_score(batch) - self.offset

    def save_pretrained(self, folder: Union[str, Path], tokenizer=None, state_dict: Optional[dict] = None) -> None:
        """`state_dict`: this model's full weights when they are not its own tensors (gathered from FSDP shards)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            self.backbone.save_pretrained(folder)
            weight, bias = self.head.weight, self.head.bias
        else:
            self.backbone.save_pretrained(folder, state_dict={k.removeprefix("backbone."): v for k, v in state_dict.items()
                                                              if k.startswith("backbone.")})
            weight, bias = state_dict["head.weight"], state_dict["head.bias"]
        save_file({"weight": weight.detach().float().cpu().contiguous(),
                   "bias": bias.detach().float().cpu().contiguous()}, str(folder / HEAD_FILE))
        (folder / HEAD_CONFIG).write_text(json.dumps(
            {"offset": self.offset, "hidden_size": self.head.in_features, "end_ids": self.end_ids,
             "format": "dpo_exp.ppo.ScalarHeadModel/1"},
            indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path], dtype: torch.dtype = torch.float32,
                        attn_implementation: str = "sdpa", device: Optional[Union[str, torch.device]] = None
                        ) -> "ScalarHeadModel":
        from safetensors.torch import load_file

        folder = Path(folder)
        backbone = load_model(str(folder), dtype, attn_implementation)  # dropout off
        if device is not None:
            backbone.to(device)
        meta = json.loads((folder / HEAD_CONFIG).read_text())
        model = cls(backbone, head_init_std=0.0, offset=meta["offset"], end_ids=meta.get("end_ids", ()))
        state = load_file(str(folder / HEAD_FILE))
        with torch.no_grad():
            model.head.weight.copy_(state["weight"])
            model.head.bias.copy_(state["bias"])
        return model


def make_value_model(reward_model: Optional[ScalarHeadModel] = None, policy: Optional[nn.Module] = None
                     ) -> ScalarHeadModel:
    """The value model: a deep copy of the reward model when there is one (its offset is
    irrelevant: values use raw scalars), else a copy of the (initial) policy with a zero head."""
    if reward_model is not None:
        value = copy.deepcopy(reward_model)
    elif policy is not None:
        if hasattr(policy, "peft_config"):
            raise ValueError("make_value_model: pass the plain π_SFT model (e.g. load_model(sft_dir)), not a LoRA "
                             "policy; the value model trains all its weights")
        value = ScalarHeadModel(copy.deepcopy(policy), head_init_std=0.0)
    else:
        raise ValueError("make_value_model needs a reward model or a policy to copy")
    disable_dropout(value)
    value.requires_grad_(True)
    value.train()
    return value
