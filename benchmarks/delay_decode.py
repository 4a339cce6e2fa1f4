"""Decode throughput of delayed merging (``merge_delay`` w) vs w = 0 on one GPU, same engine, same CR.

Model: Llama-2-7B shape with RANDOM bf16 weights (benchmarks/throughput.py's ``build_model``), decisions
driven by ``forced_period`` (every head at exactly CR r, counting only the tokens that went through DMC).
For each w: the engine with the Triton kernels of :mod:`dmc.kernels.triton_delayed` and CUDA graphs
(``fast``), and, with ``--twin``, the previous path (PyTorch twins, eager) at a small batch for scale.
Prompt C/2 + generate C/2, the largest batch that fits; output tok/s over the last decode steps.

Rows go to ``docs/results/delay_decode.json``; ``docs/benchmarks.md`` gets its "delay_decode" section.

    python benchmarks/delay_decode.py --context 4096 --cr 4 --delays 0 32 [--twin]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import dmc  # noqa: E402
from _report import write_results, write_section  # noqa: E402
from dmc.engine.bench import measure_throughput  # noqa: E402
from dmc.engine.cache import CacheLayout  # noqa: E402
from dmc.kernels import reference  # noqa: E402
from dmc.config import DMCConfig  # noqa: E402
from dmc.hf.convert import dmc_config_from  # noqa: E402
from dmc.hf.modeling import FAMILIES  # noqa: E402
from throughput import SHAPE, free_model, llama_config, max_seqs_for  # noqa: E402


def build_model(delay: int) -> torch.nn.Module:
    """throughput.py's random Llama-2-7B-shaped DMC model (bf16, on the GPU), with merge_delay w."""
    torch.manual_seed(0)
    config = dmc_config_from(llama_config(), DMCConfig(window=12, merge_delay=delay), FAMILIES[0])
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = FAMILIES[0].dmc_causal_lm_class(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def run(model, context: int, cr: int, delay: int, mode: str, max_seqs: int | None) -> dict:
    layers, heads, d = SHAPE["num_hidden_layers"], SHAPE["num_key_value_heads"], 128
    fixed = CacheLayout(layers, heads, d, 0, 1, context, 12, False, merge_delay=delay).sequence_bytes(torch.bfloat16)
    seqs = max_seqs or max_seqs_for(context, cr, fixed, 2 * 16 * d * 2, layers * heads)
    llm = dmc.LLM(model, max_model_len=context, max_num_seqs=seqs, admission_margin=0.0, progress=False,
                  forced_period=cr, cuda_graphs=mode == "fast")
    assert llm.cache.layout.delay_width == delay
    if mode == "twin":  # the PyTorch decode step of delayed merging (what ran before the Triton kernels)
        llm.runner.kernels.delayed_decode_update = reference.delayed_decode_update_ref
        llm.runner.kernels.delayed_decode_attention = reference.delayed_decode_attention_ref
    half = context // 2
    result = measure_throughput(llm, half, half, measure_steps=min(512, half // 2), progress=False)
    row = {"part": "delay_decode", "config": f"w{delay}-{mode}", "context": context, "cr": cr, "merge_delay": delay,
           "mode": mode, "graphs": bool(llm.runner.graphs), "max_num_seqs": seqs, **result.to_dict()}
    print(json.dumps(row), flush=True)
    del llm
    free_model()
    return row


def report(rows: list[dict], gpu: str) -> str:
    lines = [f"## Delayed merging: decode throughput ({gpu})", "",
             "`benchmarks/delay_decode.py`: Llama-2-7B shape, random bf16 weights, forced CR; prompt C/2 + "
             "generate C/2 at the largest batch that fits (`twin`: the PyTorch step, eager, given batch).", "",
             "| context | CR | w | path | CUDA graphs | batch | tok/s | step ms | vs w=0 |", "|---|---|---|---|---|---|---|---|---|"]
    base = {(r["context"], r["cr"]): r for r in rows if r["merge_delay"] == 0}
    for r in rows:
        ref = base.get((r["context"], r["cr"]))
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref else "-"
        lines.append(f"| {r['context']} | {r['cr']} | {r['merge_delay']} | {r['mode']} | {r['graphs']} | {r['batch']} "
                     f"| {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--cr", type=int, default=4)
    parser.add_argument("--delays", nargs="+", type=int, default=[0, 32])
    parser.add_argument("--twin", action="store_true", help="also time the PyTorch twins (eager) for w > 0")
    parser.add_argument("--twin-batch", type=int, default=32, help="batch of the twin rows (they are slow)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/delay_decode.py needs a CUDA GPU")
    rows = []
    for delay in args.delays:
        model = build_model(delay)
        rows.append(run(model, args.context, args.cr, delay, "fast", None))
        if args.twin and delay:
            rows.append(run(model, args.context, args.cr, delay, "twin", args.twin_batch))
            rows.append(run(model, args.context, args.cr, delay, "fast", args.twin_batch))
        del model
        free_model()
    gpu = torch.cuda.get_device_name()
    write_results(args.out, "delay_decode", rows, command=" ".join(sys.argv))
    write_section(pathlib.Path(args.out) / "benchmarks.md", "delay_decode", report(rows, gpu))


if __name__ == "__main__":
    main()
