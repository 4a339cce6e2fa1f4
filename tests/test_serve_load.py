"""benchmarks/serve_load.py: its pure functions (arrival times, percentiles, TPOT / ITL, goodput, the rows and
their table), its flags, and runs against a real `dmc serve` on a tiny DMC model (CPU): fixed clients, a
Poisson sweep of two rates started by the script itself, rows replaced on a re-run, the table rewritten from
the JSON. Nothing here asserts a wall-clock value."""

from __future__ import annotations

import json
import math
import pathlib
import statistics
import sys

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import serve_load as sl  # noqa: E402

TEXTS = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n", "hello world, the quick brown fox\n"] * 20
KEY = "load-key"


# ---------------------------------------------------------------------- pure functions
def test_arrival_times_poisson_mean_and_seed():
    rate = 4.0
    times = sl.arrival_times(4000, rate, seed=3)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0 and all(g >= 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.06)
    assert statistics.pstdev(gaps) == pytest.approx(1 / rate, rel=0.1)  # exponential: sd = mean
    assert sl.arrival_times(50, rate, seed=3) == times[:50]  # the seed fixes them
    assert sl.arrival_times(50, rate, seed=4) != times[:50]
    bursty = sl.arrival_times(4000, rate, seed=3, burstiness=0.25)  # same mean, more spread
    bgaps = [b - a for a, b in zip(bursty, bursty[1:])]
    assert statistics.fmean(bgaps) == pytest.approx(1 / rate, rel=0.15)
    assert statistics.pstdev(bgaps) > 1.5 / rate
    assert sl.arrival_times(5, math.inf) == [0.0] * 5
    with pytest.raises(ValueError):
        sl.arrival_times(5, 0)


def test_percentiles_interpolate_like_numpy():
    np = pytest.importorskip("numpy")
    values = [5.0, 1.0, 9.0, 3.0, 7.5, 2.0, 100.0]
    for p in (0, 10, 50, 90, 99, 100):
        assert sl.percentile(values, p) == pytest.approx(float(np.percentile(values, p)))
    assert sl.percentiles([4.0]) == {"p50": 4.0, "p90": 4.0, "p99": 4.0}
    assert sl.percentiles([]) == {"p50": None, "p90": None, "p99": None}


def test_request_metrics_tpot_and_itl():
    # sent at 1.0; chunks at 1.5 (1 token), 1.7 (1), 2.1 (2 tokens in one chunk), 2.2 (1)
    m = sl.request_metrics({"start": 1.0, "stamps": [[1.5, 1], [1.7, 1], [2.1, 2], [2.2, 1]]})
    assert m["tokens"] == 5
    assert m["ttft"] == pytest.approx(0.5) and m["e2e"] == pytest.approx(1.2)
    assert m["tpot"] == pytest.approx((1.2 - 0.5) / 4)
    assert m["itl"] == pytest.approx([0.2, 0.2, 0.2, 0.1])  # one gap per token after the first chunk
    assert sum(m["itl"]) == pytest.approx(m["e2e"] - m["ttft"])
    one = sl.request_metrics({"start": 0.0, "stamps": [[0.3, 1]]})
    assert one["tpot"] is None and one["itl"] == [] and one["ttft"] == one["e2e"]


def test_goodput_counts_requests_meeting_every_slo():
    def m(ttft, tpot):
        return {"ttft": ttft, "tpot": tpot, "e2e": ttft + (tpot or 0) * 9}
    ms = [m(0.1, 0.01), m(0.1, 0.06), m(3.0, 0.01), m(1.9, 0.049), m(0.5, None)]
    slos = {"ttft": 2000.0, "tpot": 50.0}
    assert [sl.meets_slos(x, slos) for x in ms] == [True, False, False, True, True]
    assert sl.goodput(ms, slos, duration=2.0) == pytest.approx(3 / 2)
    assert sl.goodput(ms, {"ttft": 2000.0}, duration=2.0) == pytest.approx(4 / 2)
    assert sl.goodput(ms, {"e2el": 1000.0}, duration=1.0) == pytest.approx(3)
    assert sl.goodput(ms, {}, duration=5.0) == pytest.approx(1.0)  # no SLO: the completed rate


def test_summarize_counts_failures_and_the_p99_verdict():
    ok = [{"start": 0.0, "stamps": [[0.1, 1], [0.11, 1], [0.12, 1]], "max_tokens": 3, "prompt_tokens": 4,
           "compression": {"cr": 2.0, "slots": 10}} for _ in range(3)]
    short = {"start": 0.0, "stamps": [[0.1, 1]], "max_tokens": 3, "prompt_tokens": 4,
             "compression": {"cr": 4.0, "slots": 30}}
    s = sl.summarize(ok + [short], 2.0, {"ttft": 2000.0, "tpot": 50.0})
    assert s["completed"] == 4 and s["failed"] == 0 and s["short_outputs"] == 1 and s["slo_met"]
    assert s["output_tokens"] == 10 and s["output_tokens_per_s"] == pytest.approx(5.0)
    assert s["total_tokens_per_s"] == pytest.approx((10 + 16) / 2)
    assert s["goodput_rps"] == pytest.approx(2.0) == s["requests_per_s"]
    assert s["realized_cr_responses"] == pytest.approx((2 * 30 + 4 * 30) / 60)  # slot-weighted
    failed = sl.summarize(ok + [{"start": 0.0, "stamps": [], "max_tokens": 3, "prompt_tokens": 4, "error": "x"}],
                          2.0, {"ttft": 2000.0})
    assert failed["failed"] == 1 and failed["errors"] == ["x"] and not failed["slo_met"]
    slow = sl.summarize(ok, 1.0, {"ttft": 50.0})  # TTFT 100 ms > 50 ms
    assert not slow["slo_met"] and slow["goodput_rps"] == 0


def test_parse_slos_and_rates():
    assert sl.parse_slos(["ttft:2000", "tpot:50", "e2el:9e3"]) == {"ttft": 2000.0, "tpot": 50.0, "e2el": 9000.0}
    for bad in ("ttft", "itl:5", "tpot:-1", "tpot:x", "ttft:inf"):
        with pytest.raises(ValueError, match="--goodput"):
            sl.parse_slos([bad])
    assert sl.parse_rate("inf") == math.inf and sl.parse_rate("0.5") == 0.5
    for bad in ("0", "-2", "fast", "nan"):
        with pytest.raises(ValueError):
            sl.parse_rate(bad)


def _row(**kw) -> dict:
    row = {k: None for k in sl.ROW_FIELDS}
    row.update(gpu="G", model="m", method="dmc", target_cr=4.0, realized_cr=3.9, kv_cache_gib=1.0, prompts="text",
               prompt_lens=[8], gen_lens=[4], clients=8, requests=10, completed=10, failed=0, short_outputs=0,
               output_tokens_per_s=100.0, total_tokens_per_s=300.0, ttft_p50_ms=5.0, ttft_p99_ms=9.0,
               itl_p50_ms=1.0, tpot_p50_ms=1.0, tpot_p99_ms=2.0, goodput_rps=3.0, slo="ttft:2000 tpot:50",
               slo_met=True, commit="abc")
    row.update(kw)
    return row


def test_rows_replaced_by_key_and_table_written_in_place(tmp_path):
    rows = sl.upsert_rows([], [_row(), _row(method="vanilla", target_cr=1.0), _row(clients=None, request_rate=2.0),
                               _row(clients=None, request_rate=4.0, slo_met=False)])
    assert len(rows) == 4 and [r["method"] for r in rows[:2]] == ["vanilla", "dmc"]  # vanilla first at a load
    rows = sl.upsert_rows(rows, [_row(output_tokens_per_s=555.0, commit="def", target_cr=4)])  # same run again
    assert len(rows) == 4 and sum(r["output_tokens_per_s"] == 555.0 for r in rows) == 1
    assert sum(r["commit"] == "abc" and r["method"] == "dmc" and r["clients"] == 8 for r in rows) == 0
    md = tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n\nintro\n\n## Serving\n\nhand-written prose\n\n## Later\n\nkept\n")
    sl.write_serving_section(md, sl.serving_table(rows))
    sl.write_serving_section(md, sl.serving_table(rows))  # idempotent
    text = md.read_text()
    assert text.count(sl.MD_BEGIN) == 1 and text.count("| G | m |") == 4 + 1  # 4 runs, 1 sweep's summary
    assert text.index("## Serving") < text.index(sl.MD_BEGIN) < text.index("hand-written prose")
    assert "## Serving\n\n" + sl.MD_BEGIN in text and sl.MD_END + "\n\nhand-written prose" in text
    assert text.startswith("# Benchmarks\n\nintro\n") and text.rstrip().endswith("## Later\n\nkept")
    assert "| 2, 4 | 2 |" in text  # the sweep: rates 2 and 4 run, 2 the highest that met the SLOs
    other = tmp_path / "new.md"
    sl.write_serving_section(other, sl.serving_table([]))
    assert "## Serving" in other.read_text() and "(no runs recorded)" in other.read_text()


def test_derive_method(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dmc_llama", "dmc": {"target_cr": 4.0}}))
    assert sl.derive_method(str(tmp_path), "") == ("dmc", 4.0)
    assert sl.derive_method(str(tmp_path), "--vanilla --kv-cache-memory-gib 1") == ("vanilla", 1.0)
    assert sl.derive_method(str(tmp_path), "--forced-cr 8") == ("dmc", 8.0)
    assert sl.derive_method(str(tmp_path), "--eviction tova --eviction-budget 64") == ("tova", None)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert sl.derive_method(str(tmp_path), "") == ("vanilla", 1.0)
    assert sl.server_flag("--kv-cache-memory-gib=2 --vanilla", "--kv-cache-memory-gib") == "2"


@pytest.mark.parametrize("argv, message", [
    (["--url", "http://x", "--clients", "4", "--request-rate", "2"], "two kinds of load"),
    (["--url", "http://x", "--request-rate", "0"], "--request-rate"),
    (["--url", "http://x", "--request-rate", "fast"], "--request-rate"),
    (["--url", "http://x", "--clients", "0"], "--clients"),
    (["--url", "http://x", "--max-concurrency", "4"], "--max-concurrency"),
    (["--url", "http://x", "--goodput", "ttft=2000"], "--goodput"),
    (["--url", "http://x", "--prompt-lens", "8,x"], "--prompt-lens"),
    (["--url", "http://x", "--requests", "0"], "--requests"),
    (["--url", "http://x", "--results", "r.json"], "--method"),
    (["--url", "http://x", "--results", "r.json", "--method", "dmc"], "--target-cr"),
    (["--url", "http://x", "--results", "r.txt"], ".json"),
    (["--url", "http://x", "--results", "r.json", "--method", "vanilla"], "--device-name"),
    (["--url", "http://x", "--save-detailed"], "--out"),
    (["--url", "http://x", "--merge", "a.json"], "--render-only"),
    (["--url", "http://x", "--method", "vanilla", "--target-cr", "4"], "vanilla"),
    (["--clients", "4"], "--url URL"),
    (["--render-only"], "--results"),
])
def test_bad_flags_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        sl.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and message in err, err


def test_method_flags_against_the_started_server(tmp_path, capsys):
    """With --model, --method / --target-cr / --kv-cache-gib default to what the server args and config.json say,
    and a flag that contradicts them is refused."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dmc_llama", "vocab_size": 50,
                                                      "dmc": {"target_cr": 4.0}}))
    base = ["--model", str(tmp_path), "--results", "r.json"]
    args = sl.parse_args(base + ["--server-args", "--kv-cache-memory-gib 1"])
    assert (args.method, args.target_cr, args.kv_cache_gib, args.vocab_size) == ("dmc", 4.0, 1.0, 50)
    args = sl.parse_args(base + ["--server-args", "--max-model-len 64 --vanilla"])
    assert (args.method, args.target_cr, args.kv_cache_gib) == ("vanilla", 1.0, None)
    for extra, message in ((["--server-args=--vanilla", "--method", "dmc"], "runs vanilla"),
                           (["--server-args", "--forced-cr 8", "--target-cr", "4"], "target CR is 8"),
                           (["--target-cr", "8"], "target CR is 4"),
                           (["--server-args", "--kv-cache-memory-gib 1", "--kv-cache-gib", "2"], "--kv-cache-gib")):
        with pytest.raises(SystemExit):
            sl.parse_args(base + extra)
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------------- against a real server
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import transformers
    from conftest import drive_merges

    import dmc
    from dmc.tiny import write_tiny_model_dir

    path = tmp_path_factory.mktemp("load_model")
    write_tiny_model_dir(path, TEXTS, vocab_size=300, hidden=32, max_positions=256)
    model = dmc.convert(transformers.AutoModelForCausalLM.from_pretrained(path),
                        dmc.DMCConfig(window=4, init_offset=1.0))
    drive_merges(model, shift=1.5)
    model.save_pretrained(path)
    return str(path)


SERVER_ARGS = "--device cpu --max-model-len 256 --max-num-seqs 16 --kv-cache-memory-gib 0.01"


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = sl.Server(model_dir, f"{SERVER_ARGS} --api-key {KEY}", str(tmp_path_factory.mktemp("log") / "server.log"))
    try:
        srv.wait_ready(300)
        yield srv
    finally:
        srv.stop()


def _check_detail(result: dict, vocab_prompts: bool = True) -> None:
    """Every request completed with the tokens it asked for; TPOT / ITL as the recorded timestamps give."""
    assert result["completed"] == result["requests"] == len(result["detail"]) and result["failed"] == 0
    assert result["short_outputs"] == 0
    tpots, itls = [], []
    for rec in result["detail"]:
        tokens = sum(n for _, n in rec["stamps"])
        assert "error" not in rec and rec["finish_reason"] == "length"
        assert tokens == rec["max_tokens"] == rec["usage_completion_tokens"]  # ignore_eos: every token counted
        times = [t for t, _ in rec["stamps"]]
        assert rec["start"] <= times[0] and times == sorted(times)
        ttft, e2e = times[0] - rec["start"], times[-1] - rec["start"]
        m = sl.request_metrics(rec)
        assert m["ttft"] == pytest.approx(ttft) and m["e2e"] == pytest.approx(e2e)
        assert m["tpot"] == pytest.approx((e2e - ttft) / (tokens - 1))
        assert sum(m["itl"]) == pytest.approx(e2e - ttft)
        assert len(m["itl"]) == tokens - rec["stamps"][0][1]
        tpots.append(m["tpot"])
        itls += m["itl"]
    assert result["tpot_s"]["p50"] == pytest.approx(sl.percentile(tpots, 50))
    assert result["itl_s"]["p50"] == pytest.approx(sl.percentile(itls, 50))
    assert result["goodput_rps"] <= result["requests_per_s"] + 1e-12
    assert result["output_tokens"] == sum(r["max_tokens"] for r in result["detail"])


def _check_row(row: dict, result: dict) -> None:
    assert list(row) == list(sl.ROW_FIELDS)
    assert row["requests"] == row["completed"] == result["requests"] and row["failed"] == 0
    assert row["output_tokens_per_s"] > 0 and row["total_tokens_per_s"] > row["output_tokens_per_s"]
    assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"] and 0 < row["tpot_p50_ms"] <= row["tpot_p99_ms"]
    assert 0 < row["itl_p50_ms"] and row["goodput_rps"] <= row["requests_per_s"]
    assert row["tpot_p50_ms"] == pytest.approx(result["tpot_s"]["p50"] * 1000, abs=1e-3)
    assert row["realized_cr"] > 1  # the tiny model merges: from the responses' dmc_compression
    assert row["slo"] == "ttft:60000 tpot:10000" and isinstance(row["slo_met"], bool)


def test_fixed_clients_rows_replaced_and_table(server, model_dir, tmp_path):
    results, report, out = tmp_path / "serving.json", tmp_path / "benchmarks.md", tmp_path / "run.json"
    report.write_text("# Benchmarks\n\n## Serving\n\nprose kept\n\n## Other\n\nkept too\n")
    argv = ["--url", server.url, "--api-key", KEY, "--clients", "3", "--requests", "6", "--prompt-lens", "4,12",
            "--gen-lens", "3,5", "--vocab-size", "300", "--warmup", "1", "--goodput", "ttft:60000", "tpot:10000",
            "--method", "dmc", "--target-cr", "4", "--kv-cache-gib", "0.01", "--model-name", "tiny",
            "--device-name", "test CPU", "--commit", "c0ffee1", "--results", str(results), "--report", str(report),
            "--out", str(out), "--save-detailed"]
    [result] = sl.main(argv)
    saved = json.loads(out.read_text())  # one run: today's JSON layout, meta beside the result
    assert saved["completed"] == 6 and saved["clients"] == 3 and saved["meta"]["device"] == "test CPU"
    _check_detail(saved)
    [row] = json.loads(results.read_text())["rows"]
    _check_row(row, saved)
    assert row["pages_returned"] is True  # every page back on the free list once the run is over
    assert (row["gpu"], row["model"], row["method"], row["target_cr"], row["kv_cache_gib"], row["prompts"],
            row["clients"], row["request_rate"], row["commit"]) == \
        ("test CPU", "tiny", "dmc", 4.0, 0.01, "random", 3, None, "c0ffee1")
    sl.main(argv[:-7] + ["--results", str(results), "--report", str(report), "--no-progress"])  # the same run again
    rows = json.loads(results.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["date"] >= row["date"]  # replaced, not duplicated
    sl.main(argv[:-7] + ["--clients", "2", "--results", str(results), "--report", str(report), "--no-progress"])
    rows = json.loads(results.read_text())["rows"]
    assert sorted(r["clients"] for r in rows) == [2, 3]  # another load: another row
    text = report.read_text()
    assert text.count("| test CPU | tiny | dmc |") == 2 and "prose kept" in text and text.endswith("kept too\n")
    # the table is the JSON's: an edited row, re-rendered, shows up; nothing else of the file changes
    data = json.loads(results.read_text())
    data["rows"][0]["output_tokens_per_s"] = 987654.0
    results.write_text(json.dumps(data))
    before = text.split(sl.MD_BEGIN)[0], text.split(sl.MD_END)[1]
    sl.main(["--render-only", "--results", str(results), "--report", str(report)])
    text = report.read_text()
    assert "| 987654 |" in text and (text.split(sl.MD_BEGIN)[0], text.split(sl.MD_END)[1]) == before
    # rows recorded elsewhere merge in
    other = tmp_path / "other.json"
    sl.write_rows(other, [{**data["rows"][0], "gpu": "other GPU"}])
    sl.main(["--render-only", "--merge", str(other), "--results", str(results), "--report", str(report)])
    assert len(json.loads(results.read_text())["rows"]) == 3 and "| other GPU | tiny |" in report.read_text()
    # the legacy .md section output still works
    md = tmp_path / "sections.md"
    sl.main(["--url", server.url, "--api-key", KEY, "--clients", "2", "--requests", "2", "--prompt-lens", "4",
             "--gen-lens", "2", "--vocab-size", "300", "--warmup", "0", "--label", "tiny run", "--out", str(md),
             "--no-progress"])
    assert "### Serving load: tiny run" in md.read_text() and "<!-- serve_load-tiny-run:begin -->" in md.read_text()


def test_poisson_sweep_one_server(model_dir, tmp_path, capsys):
    """--model starts one server for the whole sweep; one row per rate, method / target CR / KV GiB derived from
    the server args and the model."""
    results, out, log = tmp_path / "serving.json", tmp_path / "sweep.json", tmp_path / "server.log"
    argv = ["--model", model_dir, "--server-args", SERVER_ARGS, "--server-log", str(log),
            "--request-rate", "2", "5", "--requests", "4", "--prompt-lens", "4,12", "--gen-lens", "3,4",
            "--warmup", "0", "--goodput", "ttft:60000", "tpot:10000", "--target-cr", "4", "--seed", "7",
            "--results", str(results), "--out", str(out), "--save-detailed", "--commit", "c0ffee1"]
    runs = sl.main(argv)
    assert [r["request_rate"] for r in runs] == [2.0, 5.0]
    saved = json.loads(out.read_text())
    assert [r["request_rate"] for r in saved["runs"]] == [2.0, 5.0]
    arrivals = sl.arrival_times(4, 2.0, seed=7)
    for result in saved["runs"]:
        _check_detail(result)
        expected = sl.arrival_times(4, result["request_rate"], seed=7)
        assert [rec["arrival"] for rec in result["detail"]] == pytest.approx(expected)
        assert all(rec["start"] >= rec["arrival"] for rec in result["detail"])  # none sent before its time
    assert arrivals != sl.arrival_times(4, 5.0, seed=7)
    rows = json.loads(results.read_text())["rows"]
    assert [(r["request_rate"], r["clients"]) for r in rows] == [(2.0, None), (5.0, None)]
    for row, result in zip(rows, saved["runs"]):
        _check_row(row, result)
        assert (row["method"], row["target_cr"], row["kv_cache_gib"], row["model"]) == \
            ("dmc", 4.0, 0.01, pathlib.Path(model_dir).name)
        assert row["server_args"] == SERVER_ARGS and row["burstiness"] == 1.0
    assert capsys.readouterr().out.count("starting: ") == 1  # one server for both rates
    table = sl.serving_table(rows)
    assert "| 2, 5 |" in table
