"""Fold experiments/real_model/gpu_serve.sh's run (its KEEP dir, unpacked) into the docs:

- the two serve_load sections of ``KEEP/serve_real.md`` (vanilla and the DMC retrofit, same KV memory) into
  docs/benchmarks.md, and a comparison section computed from the two runs' JSON (in their load logs);
- the server logs to docs/throughput_runs/serve_smollm2_{vanilla,dmc}_h200.log;
- the short retrofit's study report, metrics and training log to docs/results/real_serve/.

    python experiments/real_model/collect_serve.py KEEP_DIR [--docs docs]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / "benchmarks"))
from _report import write_section  # noqa: E402


def load_result(log: pathlib.Path) -> dict:
    """The JSON serve_load.py prints first (meta and result), out of its log."""
    text = log.read_text()
    start = text.index("{\n")
    return json.JSONDecoder().raw_decode(text[start:])[0]


def comparison(vanilla: dict, dmc: dict, study: dict) -> str:
    run = next(r for r in study["rows"] if r.get("method") == "dmc")
    prompts = dmc.get("prompts", "random token ids")  # runs before --prompt-text existed used random ids
    ratio = lambda key: dmc[key] / vanilla[key]  # noqa: E731
    return "\n".join([
        f"#### Vanilla vs DMC under this load ({dmc['meta']['device']}, computed from the two runs above)", "",
        "| | vanilla | DMC | DMC / vanilla |", "|---|---|---|---|",
        f"| output tok/s | {vanilla['output_tokens_per_s']:.0f} | {dmc['output_tokens_per_s']:.0f} | "
        f"{ratio('output_tokens_per_s'):.2f} |",
        f"| TTFT p50 s | {vanilla['ttft_s']['p50']:.2f} | {dmc['ttft_s']['p50']:.2f} | "
        f"{dmc['ttft_s']['p50'] / vanilla['ttft_s']['p50']:.2f} |",
        f"| ITL p50 ms | {vanilla['itl_s']['p50'] * 1e3:.1f} | {dmc['itl_s']['p50'] * 1e3:.1f} | "
        f"{dmc['itl_s']['p50'] / vanilla['itl_s']['p50']:.2f} |",
        f"| peak running | {vanilla['peak_running_server']:.0f} | {dmc['peak_running_server']:.0f} | "
        f"{dmc['peak_running_server'] / vanilla['peak_running_server']:.2f} |",
        f"| realized CR (server) | {vanilla['realized_cr']:.2f} | {dmc['realized_cr']:.2f} | |", "",
        f"The DMC model here is a short retrofit ({run['tokens'] / 1e6:.2f}M tokens): on its held-out "
        f"text (Python source) it keeps realized CR {run['realized_cr']:.2f} at perplexity {run['perplexity']:.2f} "
        f"({run['eval_windows']} windows of 1024 tokens; `docs/results/real_serve/`). The load's "
        f"prompts are {prompts}" + (", which it compresses far less: the server's realized CR is the row above. "
                                    "`benchmarks/serve_load.py --prompt-text PATH...` loads it with text instead."
                                    if prompts == "random token ids" else "."),
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("keep", help="gpu_serve.sh's KEEP dir (serve_real.md, logs/, study/d4short/)")
    parser.add_argument("--docs", default="docs")
    args = parser.parse_args()
    keep, docs = pathlib.Path(args.keep), pathlib.Path(args.docs)
    text = (keep / "serve_real.md").read_text()
    for name, body in re.findall(r"<!-- (serve_load-[^:]+):begin -->\n(.*?)\n<!-- \1:end -->", text, re.S):
        write_section(docs / "benchmarks.md", name, body)
    logs = keep / "logs"
    vanilla, dmc = load_result(logs / "serve-load-vanilla.log"), load_result(logs / "serve-load-dmc.log")
    study_dir = keep / "study" / "d4short"
    study = json.loads((study_dir / "results.json").read_text())
    write_section(docs / "benchmarks.md", "serve-real-comparison", comparison(vanilla, dmc, study))
    runs = docs / "throughput_runs"
    shutil.copy(logs / "serve-vanilla.log", runs / "serve_smollm2_vanilla_h200.log")
    shutil.copy(logs / "serve-dmc.log", runs / "serve_smollm2_dmc4short_h200.log")
    out = docs / "results" / "real_serve"
    out.mkdir(parents=True, exist_ok=True)
    for path in (study_dir / "results.md", study_dir / "results.json", logs / "d4short.log",
                 study_dir / "runs" / "dmc-4x" / "model" / "run" / "metrics.jsonl"):
        shutil.copy(path, out / path.name)
    print(comparison(vanilla, dmc, study))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
