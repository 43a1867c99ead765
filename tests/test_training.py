"""The pieces of the loop a researcher relies on: log-probs, batching, accumulation, schedule."""
import torch
import torch.nn.functional as F

from conftest import build_loop, make_cfg
from dpo_exp.algorithms import Resources
from dpo_exp.algorithms.base import PairBatch, batch_plan
from dpo_exp.config import Schedule
from dpo_exp.data import TokenizedPair, collate_pairs, collate_sequences
from dpo_exp.loop import lr_multiplier
from dpo_exp.models import sequence_logps
from dpo_exp.reference import Reference


def test_left_padded_layout_puts_responses_in_the_last_columns():
    batch = collate_sequences([[1, 5], [1, 5, 6]], [[7, 2], [8, 9, 2]], pad_id=0)
    assert batch["input_ids"].tolist() == [[0, 0, 1, 5, 7, 2], [1, 5, 6, 8, 9, 2]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
    assert batch["response_mask"].tolist() == [[False, True, True], [True, True, True]]


def test_sequence_logps_equal_an_unpadded_forward(tiny_lm):
    model, _ = tiny_lm
    prompts, responses = [[1, 5], [1, 5, 6, 7]], [[7, 9, 2], [8, 2]]
    batched = sequence_logps(model, collate_sequences(prompts, responses, pad_id=0))
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids = torch.tensor([p + r])
        logits = model(ids).logits[0, len(p) - 1:-1]          # predictions of the response tokens
        expected = F.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None]).sum()
        torch.testing.assert_close(batched.logps[i], expected, rtol=1e-6, atol=1e-6)
        assert batched.lengths[i].item() == len(r)


def test_sequence_logps_of_an_empty_response_is_zero_and_leaves_other_rows_alone(tiny_lm):
    model, _ = tiny_lm
    prompts, responses = [[1, 5, 6], [1, 5]], [[], [7, 9, 2]]
    batched = sequence_logps(model, collate_sequences(prompts, responses, pad_id=0))
    alone = sequence_logps(model, collate_sequences(prompts[1:], responses[1:], pad_id=0))
    assert batched.logps[0].item() == 0.0 and batched.lengths.tolist() == [0, 3]
    torch.testing.assert_close(batched.logps[1], alone.logps[0], rtol=1e-6, atol=1e-6)


def test_batch_plan_keeps_every_example_and_reshuffles_each_epoch():
    plan = batch_plan(10, batch_size=4, epochs=2, max_steps=None, seed=0)
    assert [len(b) for b in plan] == [4, 4, 4, 4, 4]
    flat = [i for b in plan for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]
    assert [len(b) for b in batch_plan(10, 4, 1, None, 0)] == [4, 4, 2]  # remainder kept, not dropped


def test_warmup_is_linear_from_zero_then_schedule():
    assert lr_multiplier(0, 4, 100, Schedule.constant) == 1 / 5
    assert lr_multiplier(3, 4, 100, Schedule.constant) == 4 / 5
    assert lr_multiplier(50, 4, 100, Schedule.constant) == 1.0
    assert lr_multiplier(4, 4, 104, Schedule.linear) == 1.0
    assert abs(lr_multiplier(54, 4, 104, Schedule.linear) - 0.5) < 1e-9
    assert abs(lr_multiplier(104, 4, 104, Schedule.cosine)) < 1e-9


def _pairs():
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(3, 32, (n,), generator=g).tolist()  # noqa: E731
    return [TokenizedPair(i, [1] + rand(2 + i % 3), rand(2 + i % 4) + [2], rand(1 + i % 5) + [2]) for i in range(6)]


def _grads_after_one_step(tiny_lm, loss_name, accumulation):
    import copy

    policy, ref = copy.deepcopy(tiny_lm[0]), tiny_lm[1]
    cfg = make_cfg({"loss": {"name": loss_name, "beta": 0.1}, "trainer": {"batch_size": 6},
                    "optimizer": {"lr": 1e-3, "warmup_steps": 0, "max_grad_norm": 0.0}})
    res = Resources(cfg, None, torch.device("cpu"), policy=policy, reference=Reference(lambda: ref, resident=True),
                    train_pairs=_pairs())
    loop = build_loop(cfg, res, grad_accumulation_steps=accumulation)
    grads = {}
    for p in policy.parameters():  # keep each gradient before the optimizer step clears it
        p.register_post_accumulate_grad_hook(lambda param: grads.__setitem__(id(param), param.grad.clone()))
    metrics = loop.optimizer_step(PairBatch(_pairs(), 0, with_rejected=loss_name != "sft"))
    return [grads[id(p)] for p in policy.parameters()], {k: total / count for k, (total, count) in metrics.items()}


def test_gradient_accumulation_equals_one_large_batch(tiny_lm):
    for loss in ("dpo", "sft"):  # per-pair mean and per-token mean
        full, m1 = _grads_after_one_step(tiny_lm, loss, 1)
        accumulated, m3 = _grads_after_one_step(tiny_lm, loss, 3)
        for a, b in zip(full, accumulated):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        assert abs(m1["loss"] - m3["loss"]) < 1e-10


def test_sft_loss_is_per_token_nll_of_chosen(tiny_lm):
    policy = tiny_lm[0]
    pairs = _pairs()
    _, metrics = _grads_after_one_step(tiny_lm, "sft", 2)
    batch = collate_pairs(pairs, 0, with_rejected=False)
    with torch.no_grad():
        out = sequence_logps(policy, batch)
    assert abs(metrics["loss"] - (-out.logps.sum() / out.lengths.sum()).item()) < 1e-10


def test_dropout_is_off_in_models_we_build():
    from dpo_exp.models import new_model

    class Tok:  # the four things new_model reads from a tokenizer
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self):
            return 50

    model = new_model({"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2, "resid_pdrop": 0.3,
                       "embd_pdrop": 0.3, "attn_pdrop": 0.3}, Tok(), torch.float32, "eager")
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)
