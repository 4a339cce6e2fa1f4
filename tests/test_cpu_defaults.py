"""A new user's defaults on a CPU machine: the engine's page pool sized to the requests at hand,
the packages the documented install must bring, and an ``import dmc`` that loads nothing heavy."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest

import dmc.engine
from dmc.cli.main import main
from dmc.tiny import write_tiny_model_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXTS = ["def f(x):\n    return x * 2 + 1\n" * 40, "class A:\n    value = 3\n    name = 'a'\n" * 40]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_tiny_model_dir(tmp_path_factory.mktemp("m"), TEXTS, vocab_size=300, max_positions=4096))


@pytest.fixture
def engines(monkeypatch):
    """The engines the command builds (the real ones, recorded)."""
    built = []
    real = dmc.engine.LLM

    def record(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]
    monkeypatch.setattr(dmc.engine, "LLM", record)
    return built


def test_generate_on_cpu_sizes_the_pool_to_its_prompts(model_dir, engines, capsys):
    prompts = ["def f", "class A:\n    value = 3"]
    args = ["generate", model_dir, "--device", "cpu", "--max-tokens", "6", "--ignore-eos", "--json"]
    assert main([*args, *(x for p in prompts for x in ("--prompt", p))]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [len(r["token_ids"]) for r in rows] == [6, 6]
    (llm,) = engines
    longest = max(len(llm.tokenizer(p)["input_ids"]) for p in prompts)
    assert llm.scheduler.max_num_seqs == 2 and llm.max_model_len == longest + 6  # not 256 x 4096
    layout = llm.cache.layout
    assert layout.max_model_len == longest + 6
    assert layout.num_pages == 2 * layout.rows * layout.pages_per_head + 1  # what two such sequences use


def test_generate_on_cpu_keeps_the_sizes_given(model_dir, engines, capsys):
    assert main(["generate", model_dir, "--device", "cpu", "--prompt", "def f", "--max-tokens", "4",
                 "--max-num-seqs", "3"]) == 0
    (llm,) = engines
    assert llm.scheduler.max_num_seqs == 3 and llm.max_model_len == 4096  # one size given: the rest the engine's
    engines.clear()
    assert main(["generate", model_dir, "--device", "cpu", "--prompt", "def f", "--max-tokens", "4",
                 "--max-model-len", "100"]) == 0
    (llm,) = engines
    assert llm.scheduler.max_num_seqs == 256 and llm.max_model_len == 100


def test_the_documented_install_brings_gguf_and_the_lm_eval_api_client():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("gguf") for r in extras["gguf"]) and any(r.startswith("gguf") for r in extras["dev"])
    for extra in ("eval", "dev"):
        (lm_eval,) = [r for r in extras[extra] if r.startswith("lm-eval")]
        assert "api" in lm_eval.split("[")[1].split("]")[0].split(",")
    # installed here as `make venv` installs them: the GGUF reader and what `--model local-completions` imports
    import gguf  # noqa: F401
    api = [r.split(";")[0].split(">")[0].split("=")[0].strip() for r in importlib.metadata.requires("lm_eval")
           if 'extra == "api"' in r]
    assert "tenacity" in api
    for name in api:
        importlib.metadata.version(name)
    from lm_eval.api.registry import get_model
    assert get_model("local-completions").__name__ == "LocalCompletionsAPI"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})


def test_import_dmc_loads_neither_torch_nor_transformers():
    done = _python("import sys, dmc; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules)); "
                   "import dmc.cli.main; dmc.cli.main.build_parser(); print('torch' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "False"]  # nor does building the CLI's parser (dmc --help)


@pytest.mark.parametrize("before", ["", "import transformers", "from transformers import LlamaForCausalLM",
                                    "import transformers.models.auto.configuration_auto"])
def test_import_dmc_still_registers_the_dmc_types(before, tmp_path):
    """Whatever of transformers was imported before ``import dmc``, the Auto classes load DMC directories."""
    from conftest import dmc_model
    dmc_model("qwen3").save_pretrained(tmp_path / "m")
    model = str(tmp_path / "m")
    done = _python(f"{before}\nimport dmc\nfrom transformers import AutoConfig, AutoModelForCausalLM\n"
                   f"print(type(AutoConfig.from_pretrained({model!r})).__name__, "
                   f"type(AutoModelForCausalLM.from_pretrained({model!r})).__name__, dmc.is_dmc('dmc_x'))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["DMCQwen3Config", "DMCQwen3ForCausalLM", "True"]
