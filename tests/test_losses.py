"""Every loss against values worked out by hand from its formula (reference.md §2), and
the DPO gradient against the paper's expression."""
import math

import pytest
import torch

from dpo_exp.losses import preference_loss

# One pair: log π(y_w) = -10, log π(y_l) = -12, log π_ref(y_w) = -11, log π_ref(y_l) = -11.5
# chosen log-ratio = 1, rejected log-ratio = -0.5, h = 1.5; β = 0.1 so βh = 0.15;
# |y_w| = 5 tokens, |y_l| = 4 tokens.
#   -log σ(0.15)  = log(1 + e^-0.15) = log(1.8607080) = 0.6209570
#   -log σ(-0.15) = log(1 + e^0.15)  = log(2.1618342) = 0.7709570
POLICY_W, POLICY_L, REF_W, REF_L, BETA = -10.0, -12.0, -11.0, -11.5, 0.1
CASES = {
    # name: (kwargs, expected)
    "dpo": ({}, 0.6209570),
    "cdpo": ({"label_smoothing": 0.1}, 0.9 * 0.6209570 + 0.1 * 0.7709570),           # 0.6359570
    "rdpo": ({"label_smoothing": 0.1}, (0.9 * 0.6209570 - 0.1 * 0.7709570) / 0.8),   # 0.6022070
    "ipo": ({}, (1.5 - 1 / 0.2) ** 2),                                                # (1.5 - 5)² = 12.25
    "hinge": ({}, 1 - 0.15),                                                          # 0.85
    "rpo": ({"alpha": 1.0}, 0.6209570 + 10 / 5),                                      # DPO + per-token NLL 2.0
    # simpo, β = 2, γ = 0.5: 2·(-10/5 - (-12/4)) - 0.5 = 1.5; -log σ(1.5) = log(1 + e^-1.5) = 0.2014133
    "simpo": ({"gamma": 0.5}, 0.2014133),
}


def _one(x: float) -> torch.Tensor:
    return torch.tensor([x], dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_matches_hand_computed_value(name):
    kwargs, expected = CASES[name]
    beta = 2.0 if name == "simpo" else BETA
    out = preference_loss(name, _one(POLICY_W), _one(POLICY_L), _one(REF_W), _one(REF_L), beta,
                          chosen_length=_one(5), rejected_length=_one(4), **kwargs)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)


def test_reference_free_dpo_drops_reference_terms():
    # h = -10 - (-12) = 2; -log σ(0.2) = log(1 + e^-0.2) = 0.5981389
    out = preference_loss("dpo", _one(POLICY_W), _one(POLICY_L), None, None, BETA)
    assert out.loss.item() == pytest.approx(0.5981389, abs=1e-6)


def test_implicit_rewards_are_beta_times_log_ratios():
    out = preference_loss("dpo", _one(POLICY_W), _one(POLICY_L), _one(REF_W), _one(REF_L), BETA)
    assert out.chosen_rewards.item() == pytest.approx(0.1 * 1.0)
    assert out.rejected_rewards.item() == pytest.approx(0.1 * -0.5)


def test_cdpo_with_zero_smoothing_is_dpo_and_rdpo_is_unbiased_at_zero():
    args = (_one(POLICY_W), _one(POLICY_L), _one(REF_W), _one(REF_L), BETA)
    dpo = preference_loss("dpo", *args).loss
    assert preference_loss("cdpo", *args, label_smoothing=0.0).loss.item() == pytest.approx(dpo.item())
    assert preference_loss("rdpo", *args, label_smoothing=0.0).loss.item() == pytest.approx(dpo.item())


def test_unknown_loss_names_the_known_ones():
    with pytest.raises(ValueError, match="known: dpo"):
        preference_loss("dop", _one(0), _one(0), None, None, 0.1)


def test_dpo_gradient_matches_the_paper(tiny_lm):
    """∇L = -β·σ(r̂_l - r̂_w)·(∇log π(y_w) - ∇log π(y_l))  (Rafailov et al. 2023, §4)."""
    from dpo_exp.data import collate_sequences
    from dpo_exp.models import sequence_logps

    model, ref_model = tiny_lm
    prompt = [1, 5, 6, 7]
    batch = collate_sequences([prompt, prompt], [[8, 9, 10, 2], [11, 12, 2]], pad_id=0)
    params = [p for p in model.parameters() if p.requires_grad]

    def logps():
        return sequence_logps(model, batch).logps

    with torch.no_grad():
        ref = sequence_logps(ref_model, batch).logps
    beta = 0.5
    policy = logps()
    loss = preference_loss("dpo", policy[:1], policy[1:], ref[:1], ref[1:], beta).loss.sum()
    grads = torch.autograd.grad(loss, params)

    policy = logps()
    grad_w = torch.autograd.grad(policy[0], params, retain_graph=True)
    grad_l = torch.autograd.grad(policy[1], params)
    r_w = beta * (policy[0] - ref[0]).item()
    r_l = beta * (policy[1] - ref[1]).item()
    weight = -beta / (1 + math.exp(-(r_l - r_w)))  # -β·σ(r̂_l - r̂_w)
    assert abs(r_w - r_l) > 1e-3  # policy ≠ reference, so the weight is not the trivial σ(0)
    for g, gw, gl in zip(grads, grad_w, grad_l):
        torch.testing.assert_close(g, weight * (gw - gl), rtol=1e-4, atol=1e-7)
