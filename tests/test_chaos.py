"""A 2-process torchrun DPO run SIGKILLed at random moments, several times (once inside a checkpoint write, once
resumed by one process), ends with the uninterrupted run's metrics and final weights (scripts/chaos.py)."""
import json
import math
import sys

import pytest
import torch

from conftest import ROOT, read_jsonl

sys.path.insert(0, str(ROOT / "scripts"))
import chaos  # noqa: E402

TOL = 1e-5
PAIR_METRICS = ("eval/loss", "eval/logps/chosen", "eval/logps/rejected", "eval/rewards/margins")


def rows(run_dir, key):
    return {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if key in r}


def final_weights(run_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "final").state_dict()


@pytest.mark.slow
def test_a_run_killed_again_and_again_ends_as_the_uninterrupted_run(tmp_path):
    cache = tmp_path / "cache"
    reference = tmp_path / "uninterrupted"
    seconds = chaos.uninterrupted(reference, cache, chaos.DPO)
    run_dir = tmp_path / "chaos"
    report = chaos.chaos(run_dir, cache, chaos.DPO, kills=3, seed=0, reference_seconds=seconds)
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert report["status"] == "complete" and report["steps"] == chaos.STEPS
    assert report["kills"] == 3 and report["kills_inside_checkpoint_write"] >= 1, report
    assert {a["processes"] for a in report["attempts"]} == {1, 2}, report  # resumed across a change of world size
    train, again = rows(reference, "train/loss"), rows(run_dir, "train/loss")
    assert sorted(train) == sorted(again) == list(range(1, chaos.STEPS + 1))  # every step once: no row lost or repeated
    for step in train:
        for key in ("train/loss", "train/grad_norm", "train/rewards/margins"):
            assert math.isclose(train[step][key], again[step][key], rel_tol=TOL, abs_tol=TOL), (step, key, report)
    evals, evals_again = rows(reference, "eval/loss"), rows(run_dir, "eval/loss")
    assert sorted(evals) == sorted(evals_again)
    for step in evals:
        for key in PAIR_METRICS:
            assert math.isclose(evals[step][key], evals_again[step][key], rel_tol=TOL, abs_tol=TOL), (step, key)
    a, b = final_weights(reference), final_weights(run_dir)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=TOL) for k in a)
