"""The project's tiny Llama: deterministic builds, the manifest short-circuit, real vLLM.

The vLLM tests share one engine (loading costs ~15-25 s) over the default build in
`.flotilla/models/tiny-llama`, which is built once (~2 min on 2 cores) and then reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from orchestrator.local_model import (
    DEFAULT_MODEL_DIR,
    MANIFEST_NAME,
    Recipe,
    build_local_model,
    is_current,
    main,
)

TINY_STEPS = 3
# Words a model trained on the stdlib's docstrings cannot help producing.
COMMON_WORDS = frozenset({
    "a", "an", "the", "of", "to", "is", "in", "on", "and", "or", "for", "if", "be", "by", "as",
    "with", "that", "this", "it", "not", "from", "are", "return", "returns", "given", "new",
    "file", "list", "value", "object", "name", "string", "data", "set", "get", "default",
    "current", "function", "method", "class", "module", "type", "number",
})


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    return build_local_model(out, steps=TINY_STEPS, progress=None)


def test_same_seed_builds_identical_weights_and_tokenizer(tiny_build: Path, tmp_path: Path):
    again = build_local_model(tmp_path / "model", steps=TINY_STEPS, progress=None)
    other_seed = build_local_model(tmp_path / "seed1", seed=1, steps=TINY_STEPS, progress=None)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha256(again / name) == _sha256(tiny_build / name), name
    assert _sha256(other_seed / "model.safetensors") != _sha256(tiny_build / "model.safetensors")
    manifest = json.loads((again / MANIFEST_NAME).read_text())
    assert manifest["weights_sha256"] == _sha256(tiny_build / "model.safetensors")


def test_same_recipe_returns_without_training(tiny_build: Path):
    weights = tiny_build / "model.safetensors"
    before = weights.stat().st_mtime_ns
    lines: list[str] = []
    assert build_local_model(tiny_build, steps=TINY_STEPS, progress=lines.append) == tiny_build
    assert weights.stat().st_mtime_ns == before
    assert any("up to date" in line for line in lines)
    assert not any(line.startswith("step ") for line in lines)
    assert is_current(tiny_build, Recipe(steps=TINY_STEPS))
    assert not is_current(tiny_build, Recipe(steps=TINY_STEPS + 1))
    assert not is_current(tiny_build, Recipe(seed=1, steps=TINY_STEPS))


def test_manifest_records_the_build(tiny_build: Path):
    manifest = json.loads((tiny_build / MANIFEST_NAME).read_text())
    assert manifest["recipe"]["steps"] == TINY_STEPS and manifest["recipe"]["seed"] == 0
    assert manifest["parameters"] > 1_000_000
    assert manifest["final_loss"] > 0
    assert len(manifest["corpus"]["sha256"]) == 64 and manifest["corpus"]["tokens"] > 100_000
    assert {"python", "torch", "transformers", "tokenizers"} <= set(manifest["versions"])


def test_transformers_loads_the_build_offline(tiny_build: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_build)
    config = AutoConfig.from_pretrained(tiny_build)
    assert config.vocab_size == len(tokenizer) == 4096
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    text = "def f(x):\n    return x  # naïve"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text


def test_cli_reuses_a_current_build(tiny_build: Path, capsys):
    assert main(["--out", str(tiny_build), "--steps", str(TINY_STEPS)]) == 0
    assert capsys.readouterr().out.strip().endswith(str(tiny_build))


def test_cli_refuses_bad_steps(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--steps", "0"])
    assert exit_info.value.code == 2
    assert "steps must be a positive integer" in capsys.readouterr().err


# ---------------------------------------------------------------- real vLLM on the CPU


@pytest.fixture(scope="session")
def default_model() -> Path:
    return build_local_model(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def llm(default_model: Path):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        engine = LLM(model=str(default_model), dtype="bfloat16", max_model_len=1024,
                     enforce_eager=True, seed=0)
        yield engine
        engine.llm_engine.engine_core.shutdown()


def _words(text: str) -> list[str]:
    return [w.strip(".,;:()'\"`").lower() for w in text.split() if w.strip(".,;:()'\"`")]


def _looks_like_english(texts: list[str]) -> bool:
    words = [w for text in texts for w in _words(text)]
    alphabetic = sum(w.isalpha() for w in words)
    common = COMMON_WORDS & set(words)
    return len(words) >= 10 and alphabetic >= 0.7 * len(words) and len(common) >= 4


@pytest.mark.vllm
def test_greedy_completions_are_words(llm):
    from vllm import SamplingParams

    prompts = ["Return the", "The function", "Create a new", "If the file"]
    greedy = SamplingParams(temperature=0, max_tokens=32)
    outputs = llm.generate(prompts, greedy, use_tqdm=False)
    texts = [o.outputs[0].text for o in outputs]
    assert all(text.strip() for text in texts), texts
    assert _looks_like_english(texts), texts
    assert [o.outputs[0].text for o in llm.generate(prompts, greedy, use_tqdm=False)] == texts


@pytest.mark.vllm
def test_chat_answers_in_words_and_ends_its_turn(llm):
    from vllm import SamplingParams

    messages = [[{"role": "user", "content": f"What does {name} do?"}]
                for name in ("os.path.join", "json.dumps", "shutil.copy")]
    outputs = llm.chat(messages, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)
    texts = [o.outputs[0].text for o in outputs]
    assert _looks_like_english(texts), texts
    assert all(o.outputs[0].finish_reason == "stop" for o in outputs), texts


@pytest.mark.vllm
def test_vllm_tokenizer_matches_the_built_one(llm, default_model: Path):
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(default_model)
    theirs = llm.get_tokenizer()
    text = "Return the path of the file.\n"
    assert theirs.encode(text) == ours.encode(text)
    assert theirs.decode(ours.encode(text), skip_special_tokens=True) == text
