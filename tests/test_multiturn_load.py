"""benchmarks/multiturn_load.py against a real `dmc serve` on a tiny DMC model (CPU): conversations resend their
growing history, TTFT is taken per turn, one row per run (replaced on a re-run) and the report written from the
rows. Nothing here asserts a wall-clock value."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from test_serve_load import SERVER_ARGS, model_dir  # noqa: E402,F401 (the fixture)

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import multiturn_load as ml  # noqa: E402


def test_conversations_resend_their_history_and_rows_are_kept(model_dir, tmp_path, monkeypatch):  # noqa: F811
    sent = []
    one_request = ml.sl.one_request

    async def recording(client, body, t0):
        sent.append(list(body["prompt"]))
        return await one_request(client, body, t0)

    monkeypatch.setattr(ml.sl, "one_request", recording)
    results, report = tmp_path / "multiturn.json", tmp_path / "multiturn.md"
    argv = ["--model", model_dir, "--server-args", SERVER_ARGS, "--server-log", str(tmp_path / "server.log"),
            "--clients", "2", "--turns", "3", "--system-tokens", "16", "--turn-tokens", "8", "--gen-tokens", "4",
            "--vocab-size", "300", "--results", str(results), "--report", str(report), "--commit", "c0ffee1",
            "--device-name", "test CPU"]
    row = ml.main(argv)
    assert row["requests"] == 6 and row["failed"] == 0 and row["prefix_caching"] is False
    assert len(row["ttft_p50_ms_by_turn"]) == 3 and all(v is not None and v > 0 for v in row["ttft_p50_ms_by_turn"])
    # every conversation opens with the shared system prompt, and each turn resends the turn before it
    assert len({tuple(p[:16]) for p in sent}) == 1
    by_length = sorted(sent, key=len)
    assert [len(p) for p in by_length] == [24, 24, 36, 36, 48, 48]
    assert all(any(longer[:len(p)] == p for longer in sent if len(longer) == len(p) + 12) for p in sent if len(p) < 48)
    ml.main(argv)  # the same run again replaces its row
    rows = json.loads(results.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["commit"] == "c0ffee1"
    assert "| test CPU |" in report.read_text() and "| off | 2 x 3 | 16 / 8 / 4 |" in report.read_text()
    # with prefix caching: later turns start from the snapshot of the turn before (64-token blocks: longer prompts)
    cached = ml.main(argv[:2] + ["--server-args", SERVER_ARGS + " --enable-prefix-caching"] + argv[4:12]
                     + ["--system-tokens", "70"] + argv[12:])
    assert cached["prefix_caching"] is True and cached["failed"] == 0
    pc = cached["prefix_cache"]
    assert pc["dmc_prefix_cache_hits_total"] >= 64 and pc["dmc_prefix_cache_queries_total"] > pc["dmc_prefix_cache_hits_total"]
    assert len(json.loads(results.read_text())["rows"]) == 2 and "| on | 2 x 3 | 70 / 8 / 4 |" in report.read_text()


@pytest.mark.parametrize("argv, message", [
    (["--clients", "2"], "give --model DIR"),
    (["--url", "http://x", "--turns", "0"], "--turns must be >= 1"),
    (["--url", "http://x", "--report", "r.md"], "--report is written from --results"),
])
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        ml.parse_args(argv)
    assert message in capsys.readouterr().err
