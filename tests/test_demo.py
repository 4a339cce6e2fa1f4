"""`make demo` end to end, shortened: every stage runs and the numbers it prints are consistent."""

import math

import pytest

from dmc.demo import main


def test_demo_runs_and_reports_consistent_numbers(tmp_path, capsys):
    result = main(["--pretrain-steps", "30", "--retrofit-steps", "12", "--finetune-steps", "6",
                   "--target-cr", "2", "--workdir", str(tmp_path)])
    printed = capsys.readouterr().out
    for line in ("1/4", "2/4", "3/4", "4/4", "perplexity", "realized CR", "per layer", "KV cache", "DMC sample"):
        assert line in printed
    # the compressed cache reproduces the full-sequence forward
    assert result["loss_dmc_cache"] == pytest.approx(result["loss_dmc_full"], rel=1e-4)
    assert result["kv_bytes_dmc"] == pytest.approx(result["kv_bytes_vanilla"] / result["cr"])
    assert all(math.isfinite(v) for v in result.values())
