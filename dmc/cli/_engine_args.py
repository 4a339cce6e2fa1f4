"""Engine options shared by ``dmc generate``, ``dmc bench`` and ``dmc serve``, and checks shared with ``dmc eval``."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..engine.config import EngineConfig


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The model directory and one flag per EngineConfig setting that has help metadata (``--max-num-seqs`` of
    ``max_num_seqs``: its type, default and help), in the fields' order; the two settings spelt otherwise on
    the command line are added in their place: ``--kv-cache-memory-gib`` (GiB, the setting is bytes) and
    ``--no-cuda-graphs`` (cuda_graphs on unless given). A command changes a default with ``set_defaults``."""
    from ..engine.config import EngineConfig

    parser.add_argument("model", help="local Hugging Face model directory (DMC or plain Llama/Mistral/Qwen2/Qwen3)")
    for setting in dataclasses.fields(EngineConfig):
        if setting.name == "kv_cache_memory":
            parser.add_argument("--kv-cache-memory-gib", type=float, default=None,
                                help="page pool size in GiB, overriding --gpu-memory-utilization (default on CPU: "
                                     "what --max-num-seqs sequences can use, at most 40%% of the available memory "
                                     "and 4 GiB)")
        elif setting.name == "cuda_graphs":
            parser.add_argument("--no-cuda-graphs", action="store_true", help="decode without CUDA graphs (CUDA only)")
        elif "help" in setting.metadata:
            _add_setting(parser, setting)


def _add_setting(parser: argparse.ArgumentParser, setting: dataclasses.Field) -> None:
    """The flag of one EngineConfig field: a bool off by default is a switch, any other takes a value of the
    field's type (its annotation, read as text: the config module imports no torch for ``str | torch.dtype``)."""
    options = dict(setting.metadata)
    flag = "--" + setting.name.replace("_", "-")
    kinds = [k.strip() for k in str(setting.type).split("|")]
    kind = {"int": int, "float": float, "bool": bool}.get(next(k for k in kinds if k != "None"), str)
    if kind is bool:
        if setting.default is not False:
            raise TypeError(f"EngineConfig.{setting.name}: a flag switches a setting on; one on by default needs a "
                            "--no- flag of its own")
        parser.add_argument(flag, action="store_true", **options)
    else:
        parser.add_argument(flag, type=kind, default=setting.default, **options)


def add_forced_cr_argument(parser: argparse.ArgumentParser) -> None:
    """``--forced-cr`` of ``dmc bench`` and ``dmc serve`` (benchmarks on random weights)."""
    parser.add_argument("--forced-cr", type=int, default=0,
                        help="benchmarks only: force every head to compress at this integer CR (random weights); "
                             "0 = off")


def check_forced_cr(forced_cr: int) -> None:
    if forced_cr < 0:
        raise ValueError(f"--forced-cr must be 0 (off) or an integer CR >= 1, got {forced_cr}")


def check_model_dir(model: str) -> None:
    """ValueError unless ``model`` is a directory holding a config.json."""
    if not (pathlib.Path(model) / "config.json").is_file():
        raise ValueError(f"{model} is not a Hugging Face model directory (no config.json)")


def check_device(device: str | None) -> None:
    """ValueError for a device torch does not know, or CUDA where there is none (before any loading)."""
    from ..engine.llm import resolve_device
    resolve_device(device)


def engine_config(args: argparse.Namespace, **settings) -> EngineConfig:
    """The EngineConfig of the engine flags (and of ``settings``, the command's own flags of engine settings:
    ``forced_period`` of --forced-cr, ``seed`` of dmc serve's --seed); ValueError naming the flag for a value
    that cannot work, before anything is loaded."""
    from ..engine.config import EngineConfig

    check_model_dir(args.model)
    check_device(args.device)
    if args.kv_cache_memory_gib is not None and not args.kv_cache_memory_gib > 0:
        raise ValueError(f"--kv-cache-memory-gib must be > 0, got {args.kv_cache_memory_gib}")
    if "forced_period" in settings:
        check_forced_cr(settings["forced_period"])
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if "help" in f.metadata}
    kv = None if args.kv_cache_memory_gib is None else max(1, int(args.kv_cache_memory_gib * 2**30))
    config = EngineConfig(**values, kv_cache_memory=kv, cuda_graphs=not args.no_cuda_graphs, **settings)
    config.validate(flags=True)
    return config


def load_errors() -> tuple[type[BaseException], ...]:
    """What loading a model directory raises for a bad directory (not a bug): caught by the commands
    and printed as one line (see :func:`describe_load_error`)."""
    errors: tuple[type[BaseException], ...] = (ValueError, OSError, MemoryError)
    try:
        from safetensors import SafetensorError
        errors += (SafetensorError,)
    except ImportError:
        pass
    return errors


def describe_load_error(model: str, exc: BaseException) -> str:
    """One line for a failed model load: the error, and for unreadable weights what to do."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    kind = getattr(exc, "kind", None) or type(exc).__name__  # an engine process's error names its type
    if kind == "SafetensorError" or "safetensors" in message.lower():
        return (f"cannot read the weights in {model} ({message}): the file is truncated or corrupt; copy or save "
                "the model again")
    return f"cannot load the model in {model}: {message}"
