"""Decode step of the engine's H2O/TOVA eviction baselines vs plain and DMC decoding (GPU).

Llama-2-7B shape, random bf16 weights (benchmarks/throughput.py's model), prompt 1024 + 512
generated tokens, batch up to 64 in a 24 GiB page pool, eviction budget 384 = DMC's slots at CR 4;
DMC compresses at exactly CR 4 (forced decisions). One JSON line per configuration:

    python benchmarks/eviction_step.py > eviction_step.txt   # (the H100 numbers: docs/benchmarks.md)
"""

from __future__ import annotations

import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import dmc  # noqa: E402
from dmc.baselines import EvictionPolicy  # noqa: E402
from dmc.engine.bench import measure_throughput  # noqa: E402
from throughput import build_model, free_model  # noqa: E402

PROMPT, GEN, BATCH = 1024, 512, 64


def main() -> None:
    budget = (PROMPT + GEN) // 4
    model = build_model(dmc_model=True)
    configs = [("vanilla", dict(vanilla=True)), ("dmc-cr4", dict(forced_period=4)),
               ("tova", dict(vanilla=True, eviction=EvictionPolicy("tova", budget))),
               ("h2o", dict(vanilla=True, eviction=EvictionPolicy("h2o", budget)))]
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)
    for name, kw in configs:
        llm = dmc.LLM(model, max_model_len=PROMPT + GEN, max_num_seqs=BATCH, admission_margin=0.0, progress=False,
                      kv_cache_memory=24 * 2**30, **kw)
        r = measure_throughput(llm, PROMPT, GEN, max_requests=BATCH, measure_steps=256, progress=False)
        print(json.dumps({"config": name, "budget": budget if "eviction" in kw else None, "batch": r.batch,
                          "step_ms": round(r.step_ms, 2), "tok_s": round(r.tokens_per_s), "cr": round(r.realized_cr, 2),
                          "prefill_tok_s": round(r.prefill_tokens_per_s), "graphs": sorted(llm.runner.graphs)}),
              flush=True)
        del llm
        free_model()


if __name__ == "__main__":
    main()
