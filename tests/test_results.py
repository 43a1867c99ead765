"""Reading runs back for the comparison: the cost of reaching a gold-reward level."""
from dpo_exp.results import Run, cheapest_to_reach


def _point(step, gold, kl, flops, seconds):
    return {"step": step, "eval/gold_reward": gold, "eval/kl": kl, "cost/train_flops": flops,
            "cost/train_seconds": seconds}


def test_cheapest_point_reaching_a_level_counts_training_so_far_plus_cached_stages():
    stages = {"cost/pair_sampling_flops": 1e12, "cost/pair_sampling_seconds": 10.0,
              "cost/reward_model_flops": 2e12, "cost/reward_model_seconds": 20.0}
    dpo_stages = {**stages, "algorithm/stages": ["pair_sampling"]}
    ppo_stages = {**stages, "algorithm/stages": ["pair_sampling", "reward_model"]}
    dpo_slow = Run("DPO β=1", "dpo-family", [_point(0, 0.6, 0, 0, 0), _point(50, 0.80, 3, 4e12, 40)], dpo_stages)
    # reaches the level at step 20, then again later (the later, costlier point must not count)
    dpo_fast = Run("DPO β=0.1", "dpo-family", [_point(0, 0.6, 0, 0, 0), _point(20, 0.85, 5, 2e12, 20),
                                               _point(40, 0.90, 8, 4e12, 40)], dpo_stages)
    ppo = Run("PPO target KL=6", "ppo", [_point(0, 0.6, 0, 0, 0), _point(10, 0.82, 4, 3e12, 90)], ppo_stages)

    dpo = cheapest_to_reach([dpo_slow, dpo_fast, ppo], "dpo-family", 0.8)
    assert (dpo["method"], dpo["step"]) == ("DPO β=0.1", 20)
    assert dpo["tflops"] == 2.0 + 1.0 and dpo["seconds"] == 20 + 10          # + sampled pairs
    reached = cheapest_to_reach([dpo_slow, dpo_fast, ppo], "ppo", 0.8)
    assert reached["tflops"] == 3.0 + 1.0 + 2.0 and reached["seconds"] == 90 + 10 + 20  # + pairs + reward model
    assert cheapest_to_reach([dpo_slow, dpo_fast, ppo], "ppo", 0.95) is None


def test_the_frontier_axis_ends_past_the_last_whole_sample_point_not_at_a_collapsed_one(tmp_path):
    """One collapsed evaluation (KL 406, most samples cut) must not squeeze the frontier into a corner: the
    x-axis ends 15% past the largest KL of a point with whole samples, and the outlier is drawn on the edge."""
    import importlib.util
    import sys

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("frontier", ROOT / "scripts" / "frontier.py")
    frontier = importlib.util.module_from_spec(spec)
    sys.modules["frontier"] = frontier
    spec.loader.exec_module(frontier)
    points = [{**_point(s, g, kl, 0, 0), "eval/gold_reward_ref": 0.6, "eval/truncated_fraction": cut}
              for s, g, kl, cut in [(0, 0.6, 0.0, 0.0), (20, 0.9, 12.0, 0.0), (40, 0.95, 20.0, 0.01),
                                    (60, 0.86, 406.0, 0.65)]]
    runs = [Run("DPO β=0.05", "dpo-family", points)]
    assert frontier.auto_max_kl(runs) == 1.15 * 20.0
    out = tmp_path / "frontier.png"
    frontier.draw(runs, out, "test")
    assert out.stat().st_size > 10_000
