"""Chunked LM head: log-probs through the head a chunk of kept positions at a time give the unchunked log-probs,
entropies and gradients (every layout, both position schemes, temperatures, the families' head variants, bf16
autocast, gradient checkpointing, LoRA), and no (kept tokens × vocab) tensor is ever made."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dpo_exp.config import LoraConfig
from dpo_exp.errors import ConfigError
from dpo_exp.data import PairLayout, TokenizedPair, collate_pairs
from dpo_exp.models import AdapterDisabled, apply_lora, sequence_logps
from dpo_exp.models.logps import ChunkedHeadLogps, HeadMath, chunk_size, chunkable_head, set_logits_chunk_tokens

from test_layout import LAYOUTS, PAIRS, tiny_model

TOL = dict(rtol=1e-5, atol=1e-5)
LAYOUTS = {"padded": PairLayout(), **LAYOUTS}


def logps_and_grads(model, batch, chunk, temperature=1.0):
    """Summed, per-token and entropy outputs and every parameter's gradient of a fixed weighting of the sums."""
    model.zero_grad()
    seq = sequence_logps(model, batch, temperature=temperature, per_token=True, with_entropy=True,
                         chunk_tokens=chunk)
    weights = torch.linspace(1.0, -1.0, seq.logps.shape[0])  # both signs, as DPO's chosen and rejected
    (seq.logps * weights).sum().backward()
    return seq, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, tol=TOL):
    (sa, ga), (sb, gb) = a, b
    torch.testing.assert_close(sa.logps, sb.logps, **tol)
    torch.testing.assert_close(sa.tokens, sb.tokens, **tol)
    torch.testing.assert_close(sa.entropy, sb.entropy, **tol)
    assert ga.keys() == gb.keys() and ga
    for name in ga:  # float32 rounding of a sum is relative to its largest terms
        scale = max(1.0, ga[name].abs().max().item())
        torch.testing.assert_close(ga[name], gb[name], rtol=tol["rtol"], atol=tol["atol"] * scale, msg=name)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("name", LAYOUTS)
def test_every_layout_gives_the_unchunked_log_probs_entropies_and_gradients(arch, name, temperature):
    """3-position chunks over 20-odd kept positions: chunk edges fall inside responses and, with a shared prompt,
    between the two targets of the prompt's last position."""
    model = tiny_model(arch, "sdpa")
    batch = collate_pairs(PAIRS, 0, True, LAYOUTS[name])
    assert int(batch.lengths.sum()) > 3 * 5
    assert_same(logps_and_grads(model, batch, 0, temperature), logps_and_grads(model, batch, 3, temperature))


def test_one_chunk_or_more_never_changes_the_result_and_eager_attention_agrees():
    model = tiny_model("llama", "eager")
    batch = collate_pairs(PAIRS, 0, True, LAYOUTS["shared"])
    whole = logps_and_grads(model, batch, 0)
    for chunk in (1, 7, int(batch.keep.sum()) - 1):
        assert_same(whole, logps_and_grads(model, batch, chunk))


def test_the_chunked_gradient_is_the_formula_checked_in_float64():
    """gradcheck through bias, scale, soft-capping and temperature with two targets on one row."""
    torch.manual_seed(0)
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    source, labels = torch.tensor([0, 1, 1, 3, 4, 2]), torch.tensor([3, 0, 10, 5, 5, 7])
    math_ = HeadMath(None, scale=0.8, softcap=3.0, temperature=0.7)
    fn = lambda h, w, b: ChunkedHeadLogps.apply(h, w, b, source, labels, math_, 2, False)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))
    logits = (torch.tanh(0.8 * (hidden @ weight.T + bias) / 3.0) * 3.0) / 0.7
    torch.testing.assert_close(fn(hidden, weight, bias), torch.log_softmax(logits, -1)[source, labels])


def family_model(model_type: str, **extra):
    """A tiny model of a family whose LM head differs from Llama's: GPT-J's biased head, Gemma-2/3's soft-capped
    logits, Cohere's and Granite's scaled logits, untied heads, GPT-NeoX's (Pythia's) separate embed_out."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    kwargs = {"gpt2": dict(n_embd=16, n_layer=2, n_head=2), "gptj": dict(n_embd=16, n_layer=2, n_head=2, rotary_dim=4),
              "gpt_neox": dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
              }.get(model_type, dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, head_dim=8))
    config = AutoConfig.for_model(model_type, vocab_size=40, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  **kwargs, **extra)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # random heads of a visible size, so scaling and capping matter
        model.get_output_embeddings().weight.normal_(0, 1.0)
    return model


FAMILIES = {"gpt2": {}, "gptj": {}, "gpt_neox": {}, "llama": {"tie_word_embeddings": False},
            "qwen2": {}, "mistral": {}, "phi3": {}, "gemma2": {"final_logit_softcapping": 2.0},
            "gemma3_text": {"final_logit_softcapping": 2.0}, "cohere": {"logit_scale": 0.5},
            "granite": {"logits_scaling": 4.0}}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_each_familys_head_is_computed_as_the_model_computes_it(model_type):
    model = family_model(model_type, **FAMILIES[model_type])
    assert chunkable_head(model) is not None
    if model_type == "gptj":
        assert model.get_output_embeddings().bias is not None
    batch = collate_pairs(PAIRS, 0, True, PairLayout())
    assert_same(logps_and_grads(model, batch, 0, 0.7), logps_and_grads(model, batch, 4, 0.7))


def test_bf16_autocast_chunks_compute_in_bf16_as_the_unchunked_head():
    model = tiny_model("llama", "sdpa")
    batch = collate_pairs(PAIRS, 0, True, LAYOUTS["shared"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        whole, chunked = logps_and_grads(model, batch, 0), logps_and_grads(model, batch, 3)
    (sa, ga), (sb, gb) = whole, chunked
    torch.testing.assert_close(sa.logps, sb.logps, rtol=0, atol=1e-4)
    for name in ga:  # one bf16 product per chunk against one for the batch: bf16's own rounding apart
        torch.testing.assert_close(ga[name], gb[name], rtol=2e-2, atol=2e-3, msg=name)
    # and it is a bf16 computation, not a float32 one: it differs from the float32 log-probs
    fp32 = sequence_logps(model, batch, chunk_tokens=3).logps
    assert (fp32 - sb.logps).abs().max() > 1e-6


def test_gradient_checkpointing_and_lora_take_the_chunked_head():
    model = tiny_model("llama", "sdpa")
    model.gradient_checkpointing_enable()
    model.train()
    batch = collate_pairs(PAIRS, 0, True, LAYOUTS["shared+packed"])
    assert_same(logps_and_grads(model, batch, 0), logps_and_grads(model, batch, 3))

    policy = apply_lora(tiny_model("llama", "sdpa"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.3)
    assert chunkable_head(policy) is not None and chunkable_head(AdapterDisabled(policy)) is not None
    assert_same(logps_and_grads(policy, batch, 0), logps_and_grads(policy, batch, 3))
    with torch.no_grad():
        reference = AdapterDisabled(policy)
        torch.testing.assert_close(sequence_logps(reference, batch, chunk_tokens=3).logps,
                                   sequence_logps(reference, batch, chunk_tokens=0).logps, **TOL)


def test_a_lora_adapted_head_takes_the_models_own_logits():
    policy = apply_lora(tiny_model("gpt2", "sdpa"), LoraConfig(r=4, target_modules=["c_attn", "lm_head"]))
    assert chunkable_head(policy) is None  # the adapter's path is not in the head's weight
    batch = collate_pairs(PAIRS, 0, True, PairLayout())
    torch.testing.assert_close(sequence_logps(policy, batch, chunk_tokens=3).logps,
                               sequence_logps(policy, batch, chunk_tokens=0).logps)


class LargestTensor(TorchDispatchMode):
    """The element count of the largest tensor any op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_kept_tokens_by_vocabulary_tensor_exists_in_forward_or_backward():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = 4096
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0,
                                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False))
    g = torch.Generator().manual_seed(1)
    pairs = [TokenizedPair(i, torch.randint(3, vocab, (6,), generator=g).tolist(),
                           torch.randint(3, vocab, (30,), generator=g).tolist() + [2],
                           torch.randint(3, vocab, (25,), generator=g).tolist() + [2]) for i in range(4)]
    batch = collate_pairs(pairs, 0, True, LAYOUTS["shared"])
    kept = int(batch.keep.sum())
    for chunk, bound in ((8, 8 * vocab), (0, kept * vocab)):
        with LargestTensor() as seen:
            sequence_logps(model, batch, chunk_tokens=chunk).logps.sum().backward()
        if chunk:  # a chunk's logits (and the head's (V, H) weight gradient) are the largest tensors
            assert seen.largest <= max(bound, vocab * 8) < kept * vocab
        else:
            assert seen.largest >= bound


def test_the_chunk_size_follows_the_vocabulary_unless_set():
    set_logits_chunk_tokens(None)
    assert chunk_size(8192) == 2048 and chunk_size(128_256) == 130 and chunk_size(262_144) == 64
    assert chunk_size(1_000_000) == 64 and chunk_size(128_256, 1024) == 1024 and chunk_size(128_256, 0) == 0
    try:
        set_logits_chunk_tokens(100)
        assert chunk_size(128_256) == 100
        set_logits_chunk_tokens(0)
        assert chunk_size(128_256) == 0
    finally:
        set_logits_chunk_tokens(None)
    with pytest.raises(ConfigError, match="logits_chunk_tokens"):
        set_logits_chunk_tokens(-1)
    assert math.isclose(chunk_size(151_936) * 151_936 * 4 / 2 ** 20, 64, rel_tol=0.01)
