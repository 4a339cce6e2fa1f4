"""How many operations the host dispatches for one engine prefill forward, per decoder layer and by function.

A small model's prefill is bound by the host: each dispatched operation costs it microseconds whatever its size,
while SmolLM2-135M's GPU work per layer for a few thousand tokens takes less (the serving profile in
``docs/results/serving_profile.md``: DMC's prefill steps were the whole gap to the original). This counts them on a
CPU, where nothing else varies: the aten operations of one batched prefill forward of packed first chunks (the
serving path: several new prompts in one forward), through the engine (``dmc.LLM``), on a model of SmolLM2-135M's
shape with random weights (hidden 576, 9 heads, 3 KV heads, head dim 64, window 12). What a GPU runs as one
kernel is counted once: the Triton pooling of packed first chunks, FlexAttention and its block mask (the script
takes the FlexAttention path on the CPU, as a GPU does), the residual add + RMSNorm and the gated activation
(compiled by Inductor on a GPU) and the commit of the chunks' slots and window state
(:mod:`dmc.kernels.triton_commit`); the host layout of the packed chunks counts its copies to the device only. Views (``view``, ``slice``, ``unsqueeze``, ...) are counted
apart: they launch nothing on the GPU but still cost the host a dispatch.

Per layer = (count with 3 layers − count with 2) ; the rest of the forward (embedding, logits, sampling, the
packing of the chunks) is "per forward". Modes: the original (a plain model, every token appending), DMC
(merge_delay 0) and DMC with delayed merging (merge_delay 32, the default recipe's).

    python benchmarks/prefill_ops.py [--prompts 4 --prompt-len 256] [--label before] [--out docs/results]

Adds its run (by ``--label``) to ``OUT/prefill_ops.json`` and writes ``OUT/prefill_ops.md`` from every run there.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import pathlib
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

VIEWS = {"view", "_unsafe_view", "slice", "select", "unsqueeze", "squeeze", "expand", "transpose", "t", "permute",
         "narrow", "alias", "detach", "as_strided", "reshape", "split", "split_with_sizes", "chunk", "unbind",
         "lift_fresh", "_reshape_alias", "view_as", "expand_as", "unflatten", "flatten"}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched, by the innermost function of this project on the stack (``file:function``),
    kernels and views apart; :meth:`one_kernel` counts a GPU kernel's CPU stand-in once."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: collections.Counter = collections.Counter()
        self.views: collections.Counter = collections.Counter()
        self.suspended = 0  # inside a stand-in: a stand-in it calls is not counted again

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frame = sys._getframe(1)
        while frame is not None and "/dmc/" not in frame.f_code.co_filename:
            frame = frame.f_back
        site = (f"{frame.f_code.co_filename.split('/dmc/')[-1]}:{frame.f_code.co_name}" if frame is not None
                else "(outside dmc)")
        name = func.__name__.split(".")[0]
        (self.views if name in VIEWS else self.kernels)[site] += 1
        return func(*args, **(kwargs or {}))

    def one_kernel(self, site: str, fn):
        """``fn`` wrapped to count as one kernel at ``site`` (what a GPU runs as one launch)."""
        def wrapper(*args, **kwargs):
            if self.suspended:
                return fn(*args, **kwargs)
            from torch.utils._python_dispatch import _disable_current_modes

            self.kernels[site] += 1
            self.suspended += 1
            try:
                # its ops uncounted (and FlexAttention's operator does not go through a dispatch mode)
                with _disable_current_modes():
                    return fn(*args, **kwargs)
            finally:
                self.suspended -= 1
        return wrapper

    def host_work(self, fn):
        """``fn`` wrapped to count none of its ops: host work on host tensors (on a GPU it launches nothing but
        the copies it makes, which wrappers of :meth:`one_kernel` inside it still count)."""
        def wrapper(*args, **kwargs):
            from torch.utils._python_dispatch import _disable_current_modes

            with _disable_current_modes():
                return fn(*args, **kwargs)
        return wrapper


def smollm2_shaped(layers: int, merge_delay: int):
    """A random DMC model of SmolLM2-135M's shape (the engine runs a plain model as its DMC class in vanilla
    mode: what ``vanilla=True`` does)."""
    import transformers

    from dmc.config import DMCConfig
    from dmc.hf.convert import dmc_config_from
    from dmc.hf.modeling import FAMILIES

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                      num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                                      max_position_embeddings=8192, tie_word_embeddings=True)
    config = dmc_config_from(config, DMCConfig(window=12, merge_delay=merge_delay, target_cr=4.0), FAMILIES[0])
    return FAMILIES[0].dmc_causal_lm_class(config).eval()


@contextlib.contextmanager
def gpu_paths(counter: OpCounter):
    """Take the GPU's prefill paths on the CPU: FlexAttention (one kernel, its block mask one more) and the Triton
    pooling of packed first chunks (one kernel; its PyTorch twin runs uncounted)."""
    from dmc.hf import attention

    saved = {name: getattr(attention, name) for name in
             ("_auto_attention", "flex_attend", "flex_attend_delayed", "causal_block_mask", "delayed_block_mask")}
    pool = attention.DMCAttention._pool_first_chunks
    attention._auto_attention = lambda q: "flex" if q.shape[-1] >= attention.FLEX_MIN_HEAD_DIM else "dense"
    for name in ("flex_attend", "flex_attend_delayed", "causal_block_mask", "delayed_block_mask"):
        setattr(attention, name, counter.one_kernel(f"hf/attention.py:{name} (one kernel)", saved[name]))
    attention.DMCAttention._pool_first_chunks = counter.one_kernel("triton_kernels.py:chunk_states (one kernel)", pool)
    from dmc.engine import cache
    try:
        from dmc.kernels import triton_commit
    except ImportError:  # code from before the kernel (a "before" run)
        triton_commit = None
    kernel = None if triton_commit is None else triton_commit.commit_first_chunks

    def commit_twin(cache_, layer, packed, alpha, k_bar, v_bar, importance, k, v):  # the kernel's tensor-op twin
        cache._commit_packed_ops(cache_, layer, packed, alpha[None], k_bar[None], v_bar[None], importance[None],
                                 k[None], v[None], None, cache_.layout.page_size, k_bar.shape[-1])

    if triton_commit is not None:
        triton_commit.commit_first_chunks = counter.one_kernel("triton_commit.py:commit_first_chunks (one kernel)",
                                                               commit_twin)
    # The layout of packed first chunks is host work; what reaches the GPU are its copies, one launch each.
    from dmc.engine import runner
    host = {name: getattr(runner, name) for name in ("pack_first_chunks", "to_device", "host_to_device")
            if hasattr(runner, name)}
    for name in ("to_device", "host_to_device"):
        if name in host:
            setattr(runner, name, counter.one_kernel("engine/runner.py: a host-to-device copy (one kernel)", host[name]))
    runner.pack_first_chunks = counter.host_work(host["pack_first_chunks"])
    try:
        yield
    finally:
        for name, fn in host.items():
            setattr(runner, name, fn)
        for name, fn in saved.items():
            setattr(attention, name, fn)
        attention.DMCAttention._pool_first_chunks = pool
        if triton_commit is not None:
            triton_commit.commit_first_chunks = kernel


def count_forward(layers: int, merge_delay: int | None, prompts: int, prompt_len: int) -> OpCounter:
    """The ops of one prefill forward of ``prompts`` new prompts (after a warm-up forward of as many)."""
    import dmc

    llm = dmc.LLM(smollm2_shaped(layers, merge_delay or 0), vanilla=merge_delay is None, device="cpu", max_model_len=2 * prompt_len,
                  max_num_seqs=4 * prompts, prefill_chunk=prompts * prompt_len, admission_margin=0.0, progress=False,
                  cuda_graphs=False, prefill_attention="flex")
    gen = torch.Generator().manual_seed(0)
    params = dmc.SamplingParams(max_tokens=2, ignore_eos=True, temperature=0.0)
    for _ in range(2 * prompts):
        llm.add_request(torch.randint(3, 49152, (prompt_len,), generator=gen).tolist(), params)
    llm.cache.triton = True  # the prefill's Triton commit, as on a GPU (its CPU stand-in counted as one kernel)
    counter = OpCounter()
    ops = llm.runner.ops  # compiled on a GPU: Inductor makes one kernel of each
    ops._add_rms_norm = counter.one_kernel("engine/layers.py:add_rms_norm (compiled: one kernel)", ops._add_rms_norm)
    ops._silu_gate = counter.one_kernel("engine/layers.py:gated_activation (compiled: one kernel)", ops._silu_gate)
    with gpu_paths(counter):
        llm._prefill_step()  # warm-up
        counter.kernels.clear()
        counter.views.clear()
        forward = llm.runner.prefill_batch
        llm.runner.prefill_batch = lambda *a, **k: _counted(counter, forward, *a, **k)
        llm._prefill_step()
    return counter


def _counted(counter, fn, *args, **kwargs):
    with counter:
        return fn(*args, **kwargs)


def per_layer(two: collections.Counter, three: collections.Counter) -> tuple[dict, dict]:
    """``(per layer, per forward)`` by site from the counts of a 2- and a 3-layer model."""
    layer = {k: three[k] - two[k] for k in three if three[k] - two[k]}
    fixed = {k: two[k] - 2 * layer.get(k, 0) for k in two if two[k] - 2 * layer.get(k, 0)}
    return layer, fixed


MODES = (("original", None), ("dmc", 0), ("dmc, merge_delay 32", 32))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4, help="new prompts in the forward")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--label", default="", help="names this run (e.g. before/after a change)")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args()
    rows = []
    for mode, delay in MODES:
        counts = {n: count_forward(n, delay, args.prompts, args.prompt_len) for n in (2, 3)}
        kernels, kernels_fixed = per_layer(counts[2].kernels, counts[3].kernels)
        views, views_fixed = per_layer(counts[2].views, counts[3].views)
        rows.append({"mode": mode, "merge_delay": delay, "kernels_per_layer": sum(kernels.values()),
                     "views_per_layer": sum(views.values()), "kernels_per_forward": sum(kernels_fixed.values()),
                     "views_per_forward": sum(views_fixed.values()),
                     "kernels_by_site": dict(sorted(kernels.items(), key=lambda kv: -kv[1])),
                     "views_by_site": dict(sorted(views.items(), key=lambda kv: -kv[1]))})
        print(json.dumps({k: v for k, v in rows[-1].items() if "site" not in k}), flush=True)
    import subprocess
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"command": "python " + " ".join(sys.argv), "label": args.label, "commit": commit or "unknown",
            "torch": torch.__version__, "prompts": args.prompts, "prompt_len": args.prompt_len,
            "model": "SmolLM2-135M's shape, random weights"}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "prefill_ops.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else {}
    runs[args.label or "latest"] = {"meta": meta, "rows": rows}  # a run with the same label replaces its own
    path.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    lines = render(runs)
    (out / "prefill_ops.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def render(runs: dict) -> list[str]:
    """The report of every run in ``prefill_ops.json`` (one per label): kernels and views per layer and per
    forward, then the last run's kernels per layer by function."""
    last_label, last = list(runs.items())[-1]
    meta = last["meta"]
    lines = ["# Host operations of one prefill forward", "",
             f"Written by `benchmarks/prefill_ops.py` (on a CPU, torch {meta['torch']}: counts, not times), one run per "
             f"`--label`. One engine prefill forward of {meta['prompts']} new prompts of {meta['prompt_len']} tokens "
             "packed together, on SmolLM2-135M's shape (random weights); FlexAttention, its block mask, the Triton "
             "pooling, the Triton commit, the compiled add + RMSNorm and activation and each host-to-device copy "
             "counted as one kernel each, as a GPU runs them (the host's own layout of the packed chunks is not "
             "counted). *Kernels*: aten operations that launch work; *views*: those that only make a view "
             "(no launch on a GPU, still a dispatch on the host).", "",
             "| run (commit) | mode | kernels per layer | views per layer | kernels per forward (besides the layers) "
             "| views per forward |", "|---|---|---|---|---|---|"]
    for label, run in runs.items():
        for r in run["rows"]:
            lines.append(f"| {label} ({run['meta']['commit']}) | {r['mode']} | {r['kernels_per_layer']} | "
                         f"{r['views_per_layer']} | {r['kernels_per_forward']} | {r['views_per_forward']} |")
    for r in last["rows"]:
        lines += ["", f"Kernels per layer by function, {r['mode']} ({last_label}):", ""]
        lines += [f"- {n} `{site}`" for site, n in r["kernels_by_site"].items()]
    return lines



if __name__ == "__main__":
    sys.exit(main())
