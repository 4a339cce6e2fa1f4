"""benchmarks/cost_model.py (GPU only to run): the decode cost model's arithmetic on engine rows."""

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import cost_model  # noqa: E402


def _row(config, cr, batch, dtype="auto", step_ms=30.0):
    return {"part": "engine", "config": config, "cr": cr, "kv_cache_dtype": dtype, "batch": batch, "step_ms": step_ms,
            "prompt_len": 2048, "gen_len": 2048, "measured_steps": 1023, "realized_cr": float(cr)}


def test_kv_bytes_follow_batch_context_cr_and_pool_dtype():
    """Llama-2-7B: 512 KiB a token in bf16 (32 layers x 32 heads x k, v of 128), half in fp8; the mean context
    of the last 1023 of 2048 decode steps after a 2048-token prompt is 3584; the profile's GEMMs are added
    where (CR, batch, dtype) match, the rest get no model."""
    assert cost_model.slot_bytes("auto") == 512 * 1024 and cost_model.slot_bytes("fp8") == 256 * 1024
    rows = [_row("cr1", 1, 51), _row("cr4", 4, 201), _row("cr4-fp8", 4, 397, "fp8"), {"part": "prefill"}]
    profile = [{"cr": 1, "batch": 51, "kv_cache_dtype": "auto", "eager": {"groups_ms": {"weight GEMMs": 3.5}}}]
    out = cost_model.model_rows(rows, profile, bandwidth=4e12)
    assert [r["config"] for r in out] == ["cr1", "cr4", "cr4-fp8"]
    cr1, cr4, fp8 = out
    assert cr1["kv_gb"] == pytest.approx(51 * 3584 * 512 * 1024 / 1e9)
    assert cr1["kv_ms"] == pytest.approx(cr1["kv_gb"] * 1e9 / 4e12 * 1e3)
    assert cr1["model_ms"] == pytest.approx(cr1["kv_ms"] + 3.5) and cr1["step_vs_model"] == pytest.approx(30 / cr1["model_ms"])
    assert cr4["kv_gb"] == pytest.approx(201 * 3584 / 4 * 512 * 1024 / 1e9)
    assert fp8["kv_gb"] == pytest.approx(397 * 3584 / 4 * 256 * 1024 / 1e9)
    assert cr4["model_ms"] is None and cr4["step_vs_model"] is None
    table = cost_model.report(out, {"gpu": "cpu", "command": "c", "copy_tb_s": 4.0})
    assert "| cr1 | 51 |" in table and "| cr4 | 201 |" in table and "4.00 TB/s" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_without_a_gpu_it_says_why(tmp_path, capsys):
    assert cost_model.main(["--rows", "r.json", "--profile", "p.json", "--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_an_earlier_runs_bandwidth_renders_new_rows_without_a_gpu(tmp_path):
    """--bandwidth-from: the copy bandwidth of an earlier cost_model.json of the rows' GPU; another GPU's refused."""
    import json
    rows, profile, earlier = tmp_path / "rows.json", tmp_path / "profile.json", tmp_path / "earlier.json"
    rows.write_text(json.dumps({"meta": {"gpu": "NVIDIA H200"}, "rows": [_row("cr1", 1, 51)]}))
    profile.write_text(json.dumps({"rows": [{"cr": 1, "batch": 51, "kv_cache_dtype": "auto",
                                              "eager": {"groups_ms": {"weight GEMMs": 3.5}}}]}))
    earlier.write_text(json.dumps({"meta": {"gpu": "NVIDIA H200", "copy_tb_s": 4.0}}))
    out = tmp_path / "out"
    assert cost_model.main(["--rows", str(rows), "--profile", str(profile), "--out", str(out),
                            "--bandwidth-from", str(earlier)]) == 0
    result = json.loads((out / "cost_model.json").read_text())
    assert result["meta"]["copy_tb_s"] == 4.0 and result["rows"][0]["model_ms"] == pytest.approx(
        51 * 3584 * 512 * 1024 / 4e12 * 1e3 + 3.5)
    assert cost_model.main(["--rows", str(tmp_path / "none.json"), "--profile", str(profile), "--out", str(out),
                            "--bandwidth-from", str(earlier)]) == 2
    earlier.write_text(json.dumps({"meta": {"gpu": "NVIDIA H100", "copy_tb_s": 3.0}}))
    assert cost_model.main(["--rows", str(rows), "--profile", str(profile), "--out", str(out),
                            "--bandwidth-from", str(earlier)]) == 2
