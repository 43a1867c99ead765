"""The GPU check's code path at toy size on the CPU, so that scripts/gpu_check.py does not rot between the sessions
that are lent a GPU: every dpo_exp layout in bf16 and FSDP2 on one process run and agree, TRL runs where installed."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_the_gpu_check_runs_every_row_at_toy_size_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--size", "tiny", "--device", "cpu", "--steps", "3",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert not [name for name, r in rows.items() if "failed" in r]
    ours = {name: r for name, r in rows.items() if name.startswith("dpo_exp")}
    assert len(ours) == 4  # FlashAttention's row needs a GPU
    sharded = ours["dpo_exp bf16 shared prompt, FSDP2 on one process"]
    assert sharded["sharded"] and not ours["dpo_exp bf16 shared prompt (sdpa)"]["sharded"]
    first = ours["dpo_exp bf16 shared prompt (sdpa)"]["losses"]
    assert first[0] == pytest.approx(0.693147, abs=1e-5)  # log 2: policy = reference at the first step
    for r in ours.values():  # the layouts and the sharded path train alike (bf16 autocast rounding apart)
        assert r["losses"] == pytest.approx(first, abs=2e-4) and r["tokens_per_second"] > 0
