"""Import Megatron-LM (Megatron-Core) GPT checkpoints of Llama models, NVIDIA's released DMC
checkpoints (``nvidia/Llama-2-{7B,13B}-DMC-{4x,8x}``) among them, into the HF DMC format.

What is read: one ``model_optim_rng.pt`` written by Megatron's ``torch`` (per-rank) checkpoint
format, holding ``model`` (the Megatron-Core ``GPTModel`` state dict), ``args`` (the training run's
``argparse.Namespace``) and ``iteration``. Only an unsharded model is accepted (tensor and pipeline
parallel size 1): Megatron's fused tensors are split per tensor-parallel rank, so shards must be
merged with Megatron's own converter first.

The weight layout (Megatron-Core ``SelfAttention.get_query_key_value_tensors``, the
Transformer-Engine and local layer specs, the SwiGLU MLP) and the mapping to HF Llama names are
documented in ``docs/megatron.md``. DMC is recognised by the ``dmc_*`` arguments that the DMC
branch of Megatron-LM adds to its parser (``megatron/contrib/dmc/arguments.py``); they also give
the DMC settings (window, offset c, temperature, target CR).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import DMCConfig
from ..errors import one_line

CHECKPOINT_FILE = "model_optim_rng.pt"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
MERGE_HINT = ("merge it into one unsharded checkpoint first with Megatron-LM's checkpoint converter "
              "(tools/checkpoint/convert.py with --target-tensor-parallel-size 1 "
              "--target-pipeline-parallel-size 1)")

# The arguments of the DMC branch of Megatron-LM (megatron/contrib/dmc/arguments.py) and the
# DMCConfig fields they become.
DMC_ARGS = {"dmc_window_size": "window", "dmc_init_val": "init_offset", "dmc_temp": "temperature",
            "dmc_cr": "target_cr"}
DMC_DETECTION_HINT = ("if it is a DMC checkpoint whose dmc_* arguments were dropped (Megatron's checkpoint "
                      "converter keeps only the arguments its own parser knows), pass --assume-dmc "
                      "(assume_dmc=True); to import it as a plain Llama, pass --plain (allow_non_dmc=True)")


class MegatronImportError(ValueError):
    """A checkpoint (or output directory) that cannot be imported; the message is one line."""


# ------------------------------------------------------------------------------ finding the file
def _is_distributed_checkpoint(path: Path) -> bool:
    return ((path / ".metadata").exists() or (path / "metadata.json").exists() or (path / "common.pt").exists()
            or any(path.glob("*.distcp")))


def find_checkpoint_file(path: str | os.PathLike) -> Path:
    """The ``model_optim_rng.pt`` of a checkpoint given as that file, a ``mp_rank_00`` directory,
    an iteration directory (``iter_0002000``, ``release``) or a checkpoint root with
    ``latest_checkpointed_iteration.txt`` (NVIDIA's releases keep ``mp_rank_00/`` at the root)."""
    path = Path(path)
    if not path.exists():
        raise MegatronImportError(f"{path} does not exist")
    if path.is_file():
        return path
    if _is_distributed_checkpoint(path):
        raise MegatronImportError(
            f"{path} is a distributed (torch_dist/zarr) checkpoint; save it in the legacy per-rank 'torch' format "
            "first (Megatron-LM: --ckpt-convert-format torch --ckpt-convert-save DIR, tensor and pipeline "
            "parallel size 1)")
    if (path / CHECKPOINT_FILE).is_file():
        return path / CHECKPOINT_FILE
    ranks = sorted(p.name for p in path.glob("mp_rank_*") if p.is_dir())
    if len(ranks) == 1:
        file = path / ranks[0] / CHECKPOINT_FILE
        if not file.is_file():
            raise MegatronImportError(f"{path / ranks[0]} holds no {CHECKPOINT_FILE}")
        return file
    if ranks:
        kind = ("pipeline-parallel" if any(re.fullmatch(r"mp_rank_\d+_\d+", r) for r in ranks)
                else "tensor-parallel")
        raise MegatronImportError(f"{path} holds a {kind} checkpoint ({len(ranks)} shards: {', '.join(ranks)}); "
                                  f"{MERGE_HINT}")
    tracker = path / TRACKER_FILE
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text == "release":
            sub = path / "release"
        elif text.isdigit():
            sub = path / f"iter_{int(text):07d}"
        else:
            raise MegatronImportError(f"{tracker} holds {text!r}, expected an iteration number or 'release'")
        if not sub.is_dir():
            raise MegatronImportError(f"{tracker} points to {sub.name}/, which is not in {path}")
        return find_checkpoint_file(sub)
    iterations = sorted(p.name for p in path.iterdir()
                        if p.is_dir() and (re.fullmatch(r"iter_\d+", p.name) or p.name == "release"))
    if iterations:
        raise MegatronImportError(f"{path} has no {TRACKER_FILE}; pass one of its checkpoints: "
                                  f"{', '.join(iterations)}")
    raise MegatronImportError(f"no Megatron checkpoint in {path} (expected {CHECKPOINT_FILE}, mp_rank_00/ "
                              f"or {TRACKER_FILE})")


# ------------------------------------------------------------------------------------- loading
class _MegatronObject:
    """Stands in for a pickled Megatron-LM object in ``args`` (e.g. ``megatron.core.enums.ModelType``),
    so that a checkpoint loads without Megatron installed and without unpickling arbitrary code."""

    name = "megatron object"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.values = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.name}{self.values!r}>"


def _placeholder(name: str) -> type:
    return type(name.rpartition(".")[2], (_MegatronObject,), {"name": name})


_ALLOWED_GLOBALS = {"argparse.Namespace": argparse.Namespace, "_io.BytesIO": io.BytesIO}


def _torch_load(file: Path, trust_pickle: bool) -> Any:
    if trust_pickle:
        return torch.load(file, map_location="cpu", weights_only=False)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except Exception as e:  # noqa: BLE001 - any failure here means "not a readable torch zip file"
        raise MegatronImportError(f"cannot read {file} as a torch checkpoint ({one_line(e)}); if it is an old "
                                  "(non-zip) torch file you trust, pass --trust-pickle") from None
    safe: list = []
    for name in names:
        if name in _ALLOWED_GLOBALS:
            safe.append(_ALLOWED_GLOBALS[name])
        elif name.startswith("megatron."):
            safe.append((_placeholder(name), name))
        else:
            raise MegatronImportError(f"{file} pickles {name}, which is not on the safe list; if you trust the "
                                      "file, pass --trust-pickle (trust_pickle=True)")
    with torch.serialization.safe_globals(safe):
        try:
            try:
                return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # not memory-mappable (old format): read it
                return torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise MegatronImportError(f"cannot unpickle {file} safely ({one_line(e)}); if you trust the file, pass "
                                      "--trust-pickle (trust_pickle=True)") from None


@dataclass
class MegatronCheckpoint:
    """A loaded Megatron checkpoint: the file, its model state dict, its args and iteration."""

    file: Path
    state: dict[str, Any]
    args: argparse.Namespace
    iteration: int | None


def load_megatron_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> MegatronCheckpoint:
    """Find and load a Megatron checkpoint (see :func:`find_checkpoint_file`) on the CPU.

    The file is unpickled with ``torch.load(weights_only=True)``, allowing only what Megatron
    stores besides tensors (``argparse.Namespace``, ``io.BytesIO`` extra states, Megatron enums,
    which become inert placeholders); ``trust_pickle=True`` lifts that restriction.
    """
    file = find_checkpoint_file(path)
    checkpoint = _torch_load(file, trust_pickle)
    if not isinstance(checkpoint, dict):
        raise MegatronImportError(f"{file} holds a {type(checkpoint).__name__}, not a Megatron checkpoint dict")
    if "model" not in checkpoint:
        chunks = sorted(k for k in checkpoint if re.fullmatch(r"model\d+", str(k)))
        if chunks:
            raise MegatronImportError(f"{file} is an interleaved (virtual) pipeline-parallel checkpoint "
                                      f"({', '.join(chunks)}); {MERGE_HINT}")
        raise MegatronImportError(f"{file} has no 'model' entry (keys: {', '.join(map(str, checkpoint))}); "
                                  "not a Megatron-LM checkpoint")
    args = checkpoint.get("args")
    if args is None:
        raise MegatronImportError(f"{file} has no 'args' entry: the model's shape cannot be validated")
    state = checkpoint["model"]
    if not isinstance(state, dict):
        raise MegatronImportError(f"{file}: 'model' is a {type(state).__name__}, expected a state dict")
    if "language_model" in state or getattr(args, "use_legacy_models", False):
        raise MegatronImportError(f"{file} is a legacy (non-Megatron-Core) GPT checkpoint; convert it to "
                                  "Megatron-Core first (tools/checkpoint/convert.py --saver mcore)")
    iteration = checkpoint.get("iteration")
    return MegatronCheckpoint(file=file, state=state, args=args,
                              iteration=int(iteration) if isinstance(iteration, int) else None)


# --------------------------------------------------------------------------- the architecture
@dataclass(frozen=True)
class MegatronArch:
    """The model shape, read and validated from a checkpoint's ``args``."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_groups: int  # KV heads (num_query_groups under --group-query-attention, else num_heads)
    head_dim: int  # kv_channels
    padded_vocab_size: int | None
    max_position_embeddings: int
    norm_eps: float
    rope_base: float
    tied_embeddings: bool

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_groups


def _arg(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    value = getattr(args, name, default)
    return default if value is None else value


def _require(args: argparse.Namespace, name: str) -> int:
    value = getattr(args, name, None)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise MegatronImportError(f"checkpoint args: {name} = {value!r}, expected a positive integer")
    return value


def arch_from_args(args: argparse.Namespace) -> MegatronArch:
    """Validate that ``args`` describe an unsharded Llama-architecture GPT and read its shape."""
    tp = _arg(args, "tensor_model_parallel_size", 1)
    pp = _arg(args, "pipeline_model_parallel_size", 1)
    vpp = _arg(args, "virtual_pipeline_model_parallel_size", 1)
    if tp != 1:
        raise MegatronImportError(f"the checkpoint is one shard of a tensor-parallel model "
                                  f"(tensor_model_parallel_size={tp}); {MERGE_HINT}")
    if pp != 1 or vpp != 1:
        raise MegatronImportError(f"the checkpoint is one stage of a pipeline-parallel model "
                                  f"(pipeline_model_parallel_size={pp}, virtual={vpp}); {MERGE_HINT}")

    def expect(name: str, wanted: Any, default: Any, why: str) -> None:
        value = _arg(args, name, default)
        if value != wanted:
            raise MegatronImportError(f"checkpoint args: {name} = {value!r}, expected {wanted!r} ({why})")

    position = _arg(args, "position_embedding_type",
                    "rope" if _arg(args, "use_rotary_position_embeddings", False) else "learned_absolute")
    if position != "rope":
        raise MegatronImportError(f"checkpoint args: position_embedding_type = {position!r}, expected 'rope' "
                                  "(Llama uses rotary position embeddings)")
    expect("normalization", "RMSNorm", "LayerNorm", "Llama uses RMSNorm")
    expect("swiglu", True, False, "Llama's MLP is SwiGLU")
    expect("apply_layernorm_1p", False, False, "zero-centred norm weights are not supported")
    expect("rotary_percent", 1.0, 1.0, "Llama rotates every channel of a head")
    expect("rotary_interleaved", False, False, "HF Llama uses rotate-half RoPE")
    expect("use_rope_scaling", False, False, "RoPE scaling is not supported")
    expect("rotary_seq_len_interpolation_factor", None, None, "RoPE interpolation is not supported")
    expect("qk_layernorm", False, False, "Llama has no q/k norms")
    expect("multi_latent_attention", False, False, "Llama uses multi-head / grouped-query attention")
    expect("window_size", None, None, "sliding-window attention is not supported")
    expect("num_experts", 0, 0, "mixture-of-experts models are not supported")
    for name in ("add_bias_linear", "add_qkv_bias"):
        expect(name, False, False, "Llama 2 has no biases; biased checkpoints are not supported")

    heads = _require(args, "num_attention_heads")
    groups = _require(args, "num_query_groups") if _arg(args, "group_query_attention", False) else heads
    if heads % groups:
        raise MegatronImportError(f"checkpoint args: num_attention_heads = {heads} is not a multiple of "
                                  f"num_query_groups = {groups}")
    hidden = _require(args, "hidden_size")
    head_dim = _arg(args, "kv_channels", None) or hidden // heads
    if head_dim % 2:
        raise MegatronImportError(f"checkpoint args: kv_channels = {head_dim} is odd (RoPE and DMC need an even "
                                  "head dim)")
    max_positions = _arg(args, "max_position_embeddings", None) or _require(args, "seq_length")
    padded = _arg(args, "padded_vocab_size", None)
    return MegatronArch(
        num_layers=_require(args, "num_layers"),
        hidden_size=hidden,
        ffn_hidden_size=_require(args, "ffn_hidden_size"),
        num_heads=heads,
        num_groups=groups,
        head_dim=int(head_dim),
        padded_vocab_size=int(padded) if padded is not None else None,
        max_position_embeddings=int(max_positions),
        norm_eps=float(_arg(args, "norm_epsilon", _arg(args, "layernorm_epsilon", 1e-5))),
        rope_base=float(_arg(args, "rotary_base", 10000)),
        tied_embeddings=not _arg(args, "untie_embeddings_and_output_weights", False),
    )


def dmc_config_from_args(args: argparse.Namespace) -> DMCConfig | None:
    """The DMC settings of a checkpoint trained with Megatron-LM's DMC branch, or None if ``args``
    hold none of its ``dmc_*`` arguments (``--dmc-window-size``, ``--dmc-init-val``,
    ``--dmc-temp``, ``--dmc-cr``; defaults 12, 5, 0.1, 4.0, the same as :class:`DMCConfig`'s)."""
    present = {name: getattr(args, name) for name in DMC_ARGS if getattr(args, name, None) is not None}
    if not present:
        return None
    window = present.get("dmc_window_size", 12)
    if not isinstance(window, int) or window < 1:
        raise MegatronImportError(f"checkpoint args: dmc_window_size = {window!r}, expected a positive integer")
    try:
        return DMCConfig(window=window, init_offset=float(present.get("dmc_init_val", 5.0)),
                         temperature=float(present.get("dmc_temp", 0.1)),
                         target_cr=float(present["dmc_cr"]) if "dmc_cr" in present else None)
    except ValueError as e:
        raise MegatronImportError(f"checkpoint args: {e}") from None


# ---------------------------------------------------------------------------------- the weights
def _is_extra_state(key: str) -> bool:
    return key == "_extra_state" or key.endswith("._extra_state")


def megatron_to_hf_state_dict(state: dict[str, Any], arch: MegatronArch,
                              vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """Map a Megatron-Core GPT state dict to HF Llama names (tensors are views where possible).

    ``vocab_size`` trims the (padded) embedding and output rows; None keeps them all.
    Raises :class:`MegatronImportError` on a missing key, a shape that disagrees with ``arch``,
    a bias, or any key other than the known ones and ``*._extra_state`` (TE fp8 metadata)."""
    pending = {k: v for k, v in state.items() if not _is_extra_state(str(k))}
    for key in sorted(pending):
        if key.endswith(".bias") or key.endswith("layer_norm_bias"):
            raise MegatronImportError(f"unexpected bias {key}: biases (or LayerNorm) are not supported, Llama 2 "
                                      "has none")
        match = re.match(r"decoder\.layers\.(\d+)\.", key)
        if match and int(match.group(1)) >= arch.num_layers:
            raise MegatronImportError(f"{key}: layer {match.group(1)} is beyond the checkpoint args' num_layers = "
                                      f"{arch.num_layers}")
    h, d, f = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    g, kv = arch.heads_per_group, arch.num_groups

    def take(name: str, shape: tuple[int, ...], what: str) -> torch.Tensor:
        if name not in pending:
            raise MegatronImportError(f"missing {name} ({what})")
        tensor = pending.pop(name)
        if not torch.is_tensor(tensor):
            raise MegatronImportError(f"{name} is a {type(tensor).__name__}, expected a tensor")
        if tuple(tensor.shape) != shape:
            raise MegatronImportError(f"{name} has shape {tuple(tensor.shape)}, expected {shape} from the "
                                      f"checkpoint args ({what})")
        return tensor

    def take_norm(te_name: str, local_name: str, what: str) -> torch.Tensor:
        if te_name in pending and local_name in pending:
            raise MegatronImportError(f"both {te_name} and {local_name} are present ({what})")
        name = local_name if local_name in pending else te_name
        return take(name, (h,), f"{what}; Transformer Engine: {te_name}, local: {local_name}")

    out: dict[str, torch.Tensor] = {}
    embedding = take("embedding.word_embeddings.weight",
                     (arch.padded_vocab_size or _rows(pending, "embedding.word_embeddings.weight"), h),
                     "padded_vocab_size x hidden_size")
    for i in range(arch.num_layers):
        p, q = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = take(p + "self_attention.linear_qkv.weight", (kv * (g + 2) * d, h),
                   "num_query_groups * (heads_per_group + 2) * kv_channels x hidden_size")
        # Per KV group: its g query heads, then its key head, then its value head.
        qkv = qkv.view(kv, g + 2, d, h)
        out[q + "self_attn.q_proj.weight"] = qkv[:, :g].reshape(kv * g * d, h)
        out[q + "self_attn.k_proj.weight"] = qkv[:, g].reshape(kv * d, h)
        out[q + "self_attn.v_proj.weight"] = qkv[:, g + 1].reshape(kv * d, h)
        out[q + "self_attn.o_proj.weight"] = take(p + "self_attention.linear_proj.weight", (h, arch.num_heads * d),
                                                  "hidden_size x num_attention_heads * kv_channels")
        out[q + "input_layernorm.weight"] = take_norm(p + "self_attention.linear_qkv.layer_norm_weight",
                                                      p + "input_layernorm.weight", "attention RMSNorm")
        out[q + "post_attention_layernorm.weight"] = take_norm(p + "mlp.linear_fc1.layer_norm_weight",
                                                               p + "pre_mlp_layernorm.weight", "MLP RMSNorm")
        fc1 = take(p + "mlp.linear_fc1.weight", (2 * f, h), "2 * ffn_hidden_size x hidden_size: [gate; up]")
        out[q + "mlp.gate_proj.weight"] = fc1[:f]
        out[q + "mlp.up_proj.weight"] = fc1[f:]
        out[q + "mlp.down_proj.weight"] = take(p + "mlp.linear_fc2.weight", (h, f), "hidden_size x ffn_hidden_size")
    out["model.norm.weight"] = take("decoder.final_layernorm.weight", (h,), "final RMSNorm")
    rows = embedding.shape[0]
    if arch.tied_embeddings:
        output = pending.pop("output_layer.weight", None)
        if output is not None and not torch.equal(output, embedding):
            raise MegatronImportError("output_layer.weight differs from the word embeddings, but the checkpoint "
                                      "args say they are shared (untie_embeddings_and_output_weights is false)")
        output = embedding
    else:
        output = take("output_layer.weight", (rows, h), "padded_vocab_size x hidden_size; untied output layer")
    inv_freq = pending.pop("rotary_pos_emb.inv_freq", None)
    if inv_freq is not None:
        expected = 1.0 / arch.rope_base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        if inv_freq.shape != expected.shape or not torch.allclose(inv_freq.float(), expected, rtol=1e-4):
            raise MegatronImportError(f"rotary_pos_emb.inv_freq does not match rotary_base = {arch.rope_base} and "
                                      f"kv_channels = {d}")
    if pending:
        first = sorted(pending)[0]
        more = f" (and {len(pending) - 1} more)" if len(pending) > 1 else ""
        raise MegatronImportError(f"unknown key {first}{more} in the checkpoint's model state dict")
    vocab = rows if vocab_size is None else vocab_size
    if not 0 < vocab <= rows:
        raise MegatronImportError(f"vocabulary size {vocab} does not fit the checkpoint's {rows} embedding rows")
    out["model.embed_tokens.weight"] = embedding[:vocab]
    out["lm_head.weight"] = output[:vocab]
    return out


def _rows(pending: dict[str, Any], name: str) -> int:
    tensor = pending.get(name)
    return int(tensor.shape[0]) if torch.is_tensor(tensor) and tensor.dim() == 2 else -1


# ------------------------------------------------------------------------------- the HF model
def _hf_config(arch: MegatronArch, vocab: int, dmc_config: DMCConfig | None, dtype: torch.dtype, tokenizer):
    from transformers import LlamaConfig

    from ..hf.modeling import DMCLlamaConfig

    values: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=arch.hidden_size, intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_groups, head_dim=arch.head_dim, hidden_act="silu",
        max_position_embeddings=arch.max_position_embeddings, rms_norm_eps=arch.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_base},
        attention_bias=False, mlp_bias=False, tie_word_embeddings=arch.tied_embeddings,
    )
    if tokenizer is not None:
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, name, None) is not None:
                values[name] = getattr(tokenizer, name)
    if dmc_config is None:
        config = LlamaConfig(**values)
        config.architectures = ["LlamaForCausalLM"]
    else:
        config = DMCLlamaConfig(**values, dmc=dmc_config.to_dict())
        config.architectures = ["DMCLlamaForCausalLM"]
    config.dtype = dtype
    return config


def _build_model(config, weights: dict[str, torch.Tensor], dmc: bool) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    from ..hf.modeling import DMCLlamaForCausalLM

    cls = DMCLlamaForCausalLM if dmc else LlamaForCausalLM
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict(weights, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)  # non-persistent buffers
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"internal error: tensors left on the meta device: {left[:5]}")
    return model.eval()


def _load_tokenizer(tokenizer):
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    path = Path(tokenizer)
    if not path.is_dir():
        raise MegatronImportError(f"tokenizer {path} is not a local directory holding a Hugging Face tokenizer")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; all mean "no tokenizer here"
        raise MegatronImportError(f"cannot load a tokenizer from {path}: {one_line(e)}") from None


def _check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MegatronImportError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MegatronImportError(f"output directory {out} is not empty; pass --force (force=True) to replace it")


def _check_not_inside(out: Path, checkpoint: Path) -> None:
    resolved = out.resolve()
    if resolved == checkpoint.resolve() or resolved in checkpoint.resolve().parents:
        raise MegatronImportError(f"output {out} contains the checkpoint; choose another directory")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` into place at ``out`` (replacing it), by renames only."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def import_megatron(
    checkpoint_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer=None,
    allow_non_dmc: bool = False,
    *,
    assume_dmc: bool = False,
    dmc_config: DMCConfig | None = None,
    vocab_size: int | None = None,
    dtype: torch.dtype | str | None = None,
    force: bool = False,
    trust_pickle: bool = False,
) -> torch.nn.Module:
    """Convert a Megatron-Core GPT checkpoint of a Llama model into an HF model in ``out_dir``
    (``save_pretrained`` format) and return that model (CPU, eval mode).

    Args:
        checkpoint_path: ``model_optim_rng.pt``, its ``mp_rank_00`` directory, an iteration
            directory or a checkpoint root with ``latest_checkpointed_iteration.txt``.
        out_dir: created (or, with ``force``, replaced) only once everything is written: the
            model is written to a temporary directory beside it and renamed into place.
        tokenizer: a local HF tokenizer directory (or a tokenizer object), saved into ``out_dir``;
            its length is taken as the true vocabulary size and the padded rows are trimmed.
        allow_non_dmc: accept a checkpoint without DMC settings and write a plain
            ``LlamaForCausalLM``. (A DMC checkpoint is always written as a DMC model.)
        assume_dmc: treat a checkpoint without ``dmc_*`` args as DMC (default DMC settings:
            window 12, c = 5, as in Megatron-LM's DMC branch).
        dmc_config: DMC settings to use instead of those in the checkpoint args.
        vocab_size: keep this many embedding/output rows (overrides the tokenizer's length);
            without it and without a tokenizer the padded vocabulary is kept.
        dtype: dtype of the written weights (default: the checkpoint's, bf16 for NVIDIA's).
        force: replace a non-empty ``out_dir``.
        trust_pickle: unpickle the checkpoint without ``weights_only`` restrictions.
    """
    out = Path(out_dir)
    _check_output_dir(out, force)
    if assume_dmc and allow_non_dmc:
        raise MegatronImportError("assume_dmc (--assume-dmc) and allow_non_dmc (--plain) contradict each other")
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise MegatronImportError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    tok = _load_tokenizer(tokenizer)

    checkpoint = load_megatron_checkpoint(checkpoint_path, trust_pickle=trust_pickle)
    _check_not_inside(out, checkpoint.file)
    args = checkpoint.args
    arch = arch_from_args(args)
    found = dmc_config_from_args(args)
    settings = dmc_config or found or (DMCConfig() if assume_dmc else None)
    if settings is None and not allow_non_dmc:
        raise MegatronImportError(f"{checkpoint.file} is not a DMC checkpoint (its args hold no dmc_* settings); "
                                  f"{DMC_DETECTION_HINT}")
    if found is not None and getattr(args, "dmc_is_stage_one", False):
        warnings.warn("this is a checkpoint of DMC's zero-out stage (dmc_is_stage_one): not retrofitted yet, it "
                      "will barely compress", stacklevel=2)

    rows = _rows(checkpoint.state, "embedding.word_embeddings.weight")
    vocab = vocab_size if vocab_size is not None else (len(tok) if tok is not None else None)
    if vocab is not None and vocab > rows > 0:
        raise MegatronImportError(f"the vocabulary ({vocab} tokens) is larger than the checkpoint's {rows} "
                                  "embedding rows: wrong tokenizer?")
    weights = megatron_to_hf_state_dict(checkpoint.state, arch, vocab_size=vocab)
    target = dtype or weights["model.embed_tokens.weight"].dtype
    if not target.is_floating_point:
        raise MegatronImportError(f"the checkpoint's weights are {target}, expected floating point")
    weights = {k: v.to(target).contiguous() for k, v in weights.items()}
    if arch.tied_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    kept = weights["model.embed_tokens.weight"].shape[0]
    config = _hf_config(arch, kept, settings, target, tok)
    model = _build_model(config, weights, dmc=settings is not None)
    if vocab is None:
        warnings.warn(f"no tokenizer given: keeping all {kept} embedding rows (Megatron pads the vocabulary); pass "
                      "--tokenizer or --vocab-size to trim the padding", stacklevel=2)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, name, getattr(config, name, None))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.importing-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        (tmp / "megatron_import.json").write_text(json.dumps(_provenance(checkpoint, arch, settings, kept), indent=2)
                                                  + "\n")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model


def _provenance(checkpoint: MegatronCheckpoint, arch: MegatronArch, settings: DMCConfig | None,
                vocab: int) -> dict[str, Any]:
    """What was imported, from where: written next to the model as ``megatron_import.json``."""
    args = checkpoint.args
    keep = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "group_query_attention",
            "num_query_groups", "kv_channels", "seq_length", "max_position_embeddings", "norm_epsilon",
            "rotary_base", "padded_vocab_size", "untie_embeddings_and_output_weights", "transformer_impl",
            "tokenizer_type", "bf16", "fp16", "dmc_is_stage_one", "dmc_finetune", *DMC_ARGS)
    return {
        "source": str(checkpoint.file),
        "iteration": checkpoint.iteration,
        "dmc": settings.to_dict() if settings is not None else None,
        "dmc_from_args": dmc_config_from_args(args) is not None,
        "vocab_size": vocab,
        "padded_vocab_size": arch.padded_vocab_size,
        "megatron_args": {k: _jsonable(getattr(args, k)) for k in keep if hasattr(args, k)},
    }


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)
