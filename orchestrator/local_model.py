"""The project's own tiny Llama, built on this machine from nothing but the Python stdlib.

No hub, no network: the training text is the docstrings of the running interpreter's
standard library, the tokenizer is a byte-level BPE trained on them with `tokenizers`,
and the model is a 2-layer Llama (grouped-query attention on purpose, so the KV-cache
paths that matter in production are exercised) trained with torch on the CPU for a fixed
number of steps. The same seed, step count and machine give byte-identical weights.

The output directory is a regular Hugging Face model directory (`config.json`,
`model.safetensors`, `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`)
that vLLM and `transformers` load offline, plus `flotilla-model.json`, the manifest that
lets a second build with the same recipe return at once.
"""

from __future__ import annotations

import argparse
import ast
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / ".flotilla" / "models" / "tiny-llama"
DEFAULT_MODEL_NAME = "tiny-llama"
MANIFEST_NAME = "flotilla-model.json"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors",
               "tokenizer.json", "tokenizer_config.json")

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = (BOS, EOS, PAD, *(f"<|{role}|>" for role in ROLES))

# Zephyr-style turns: a role marker, the content, then EOS, so that generation stops at
# the end of the assistant's turn without a separate stop token.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('chat role must be system, user or assistant, not ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Test suites and third-party code are not the stdlib's prose.
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
_DEF_NODES = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_QUESTIONS = {"module": "What is the {name} module for?", "class": "What is {name}?",
              "function": "What does {name} do?"}


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the bytes of a build; the manifest stores it verbatim."""

    seed: int = 0
    steps: int = 240  # optimizer steps; ~90-120 s in all on a 2-core CPU
    vocab_size: int = 4096  # tokens, special tokens included
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2  # GQA: 2 query heads share each KV head
    max_positions: int = 1024  # tokens
    seq_len: int = 256  # tokens per training window
    batch_size: int = 16  # windows per step
    peak_lr: float = 3e-3
    warmup_fraction: float = 0.1
    weight_decay: float = 0.1
    max_corpus_bytes: int = 4_000_000  # UTF-8 bytes of docstrings gathered
    version: int = 1  # bump when the build changes in a way the fields above miss

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")


@dataclass(frozen=True)
class Docstring:
    """One docstring of the stdlib, cleaned (dedented, stripped)."""

    kind: str  # "module" | "class" | "function"
    name: str  # dotted qualified name, e.g. "json.decoder.JSONDecoder.decode"
    text: str


# ---------------------------------------------------------------- corpus


def stdlib_dir() -> Path:
    """The directory of the running interpreter's standard library (not the venv's)."""
    return Path(sysconfig.get_paths()["stdlib"])


def gather_docstrings(root: Path | None = None, max_bytes: int = 4_000_000) -> list[Docstring]:
    """Module, class and function docstrings under `root` (default: the stdlib).

    Files are visited in sorted path order, so the result is a function of the tree.
    Files that do not parse are skipped; duplicates are kept once; collection stops once
    the docstrings' UTF-8 size reaches `max_bytes`.
    """
    root = stdlib_dir() if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"docstring source directory does not exist: {root}")
    seen: set[str] = set()
    found: list[Docstring] = []
    size = 0
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _SKIPPED_DIRS.intersection(relative.parts[:-1]):
            continue
        for doc in _file_docstrings(path, _module_name(relative)):
            if doc.text in seen or len(doc.text.split()) < 3:
                continue
            seen.add(doc.text)
            found.append(doc)
            size += len(doc.text.encode())
            if size >= max_bytes:
                return found
    return found


def _module_name(relative: Path) -> str:
    parts = relative.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or relative.stem


def _file_docstrings(path: Path, module: str) -> list[Docstring]:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, RecursionError):
        return []  # py2-era fixtures and deliberately broken files live in the stdlib too
    docs = [Docstring("module", module, text)] if (text := ast.get_docstring(tree)) else []
    docs.extend(_nested_docstrings(tree, module))
    return docs


def _nested_docstrings(node: ast.AST, qualname: str) -> Iterator[Docstring]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.expr):
            continue  # expressions hold no docstrings; lambdas have none
        name = f"{qualname}.{child.name}" if isinstance(child, _DEF_NODES) else qualname
        if isinstance(child, _DEF_NODES) and (text := ast.get_docstring(child)):
            kind = "class" if isinstance(child, ast.ClassDef) else "function"
            yield Docstring(kind, name, text)
        yield from _nested_docstrings(child, name)


def chat_pair(doc: Docstring) -> tuple[str, str] | None:
    """A (question, answer) turn about a public name, or None when the doc makes a poor one.

    The answer is the docstring's first paragraph on one line, 30 to 600 characters.
    """
    if any(part.startswith("_") for part in doc.name.split(".")):
        return None
    answer = " ".join(doc.text.split("\n\n", 1)[0].split())
    if not 30 <= len(answer) <= 600:
        return None
    return _QUESTIONS[doc.kind].format(name=doc.name), answer


def training_documents(docs: list[Docstring], tokenizer) -> list[str]:
    """Each docstring as `<|bos|>text<|eos|>`, plus a chat turn about it where one fits.

    Chat turns are rendered by the tokenizer's own chat template, so the model learns
    exactly the format it is served with.
    """
    out: list[str] = []
    for doc in docs:
        out.append(f"{BOS}{doc.text}{EOS}")
        if pair := chat_pair(doc):
            turn = [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
            out.append(tokenizer.apply_chat_template(turn, tokenize=False))
    return out


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int = 4096, max_length: int = 1024):
    """A byte-level BPE over `texts` wrapped as a `transformers` fast tokenizer.

    Encoding adds `<|bos|>` in front; decoding the ids of any string gives the string back.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed 256 bytes + special tokens, got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bpe.token_to_id(BOS))])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=list(SPECIAL_TOKENS[3:]), chat_template=CHAT_TEMPLATE,
        model_max_length=max_length, clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------- model and training


def _llama_config(recipe: Recipe, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size, num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads, num_key_value_heads=recipe.num_kv_heads,
        max_position_embeddings=recipe.max_positions, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def _lr_scale(step: int, recipe: Recipe) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    warmup = max(1, round(recipe.steps * recipe.warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, recipe.steps - warmup)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


def _train(model, tokens, recipe: Recipe, progress: Callable[[str], None]) -> float:
    """Run `recipe.steps` AdamW steps on random windows of `tokens`; returns the mean
    training loss (nats/token) over the last reporting interval."""
    import torch
    import torch.nn.functional as F

    windows = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.peak_lr, betas=(0.9, 0.95),
                            weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_scale(step, recipe))
    every = max(1, recipe.steps // 20)
    offsets = torch.arange(recipe.seq_len + 1)
    losses: list[float] = []
    started = time.perf_counter()
    model.train()
    for step in range(1, recipe.steps + 1):
        starts = torch.randint(0, len(tokens) - recipe.seq_len - 1, (recipe.batch_size, 1),
                               generator=windows)
        batch = tokens[starts + offsets]
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        losses.append(loss.item())
        if step % every == 0 or step == recipe.steps:
            elapsed = time.perf_counter() - started
            rate = step * recipe.batch_size * recipe.seq_len / elapsed
            eta = elapsed / step * (recipe.steps - step)
            mean = sum(losses[-every:]) / len(losses[-every:])
            progress(f"step {step}/{recipe.steps} loss {mean:.3f} {rate:,.0f} tok/s eta {eta:.0f}s")
    return mean


@contextmanager
def _deterministic_torch(seed: int):
    """Seed every RNG and pin torch to deterministic kernels and a fixed thread count,
    restoring torch's global settings afterwards."""
    import numpy as np
    import torch

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    # The reduction order of CPU kernels follows the thread count, so pin it.
    torch.set_num_threads(min(os.cpu_count() or 1, 8))
    try:
        yield torch.get_num_threads()
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- build


def read_manifest(model_dir: str | Path) -> dict | None:
    """The manifest of a finished build in `model_dir`; None when absent or unreadable."""
    try:
        return json.loads((Path(model_dir) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_current(model_dir: str | Path, recipe: Recipe) -> bool:
    """Whether `model_dir` holds a complete build of exactly `recipe`."""
    manifest = read_manifest(model_dir)
    complete = all((Path(model_dir) / name).is_file() for name in MODEL_FILES)
    return complete and manifest is not None and manifest.get("recipe") == asdict(recipe)


def build_local_model(
    out_dir: str | Path = DEFAULT_MODEL_DIR,
    *,
    seed: int = 0,
    steps: int | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = print,
) -> Path:
    """Build the tiny Llama into `out_dir` and return its absolute path.

    Returns at once when `out_dir` already holds a build of the same recipe (seed, steps,
    architecture, hyperparameters) unless `force`. The build happens in a sibling
    temporary directory that replaces `out_dir` only when complete, under a file lock, so
    concurrent callers never see half a model and never train twice. Refuses to replace a
    non-empty directory that is not a Flotilla model build. Progress lines (stage, step,
    loss, tokens/s, ETA) go to `progress`; None silences them.
    """
    out = Path(out_dir).resolve()
    recipe = Recipe(seed=seed) if steps is None else Recipe(seed=seed, steps=steps)
    say = progress or (lambda line: None)
    with _build_lock(out):
        if not force and is_current(out, recipe):
            say(f"model up to date at {out} (seed {recipe.seed}, {recipe.steps} steps)")
            return out
        _check_replaceable(out)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
        try:
            _build_into(staging, recipe, say)
            _swap_in(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    say(f"model saved to {out}")
    return out


def _check_replaceable(out: Path) -> None:
    if not out.exists() or (out / MANIFEST_NAME).is_file():
        return
    if not out.is_dir() or any(out.iterdir()):
        raise FileExistsError(f"refusing to replace {out}: it is not a Flotilla model build")


@contextmanager
def _build_lock(out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _swap_in(staging: Path, out: Path) -> None:
    # mkdtemp and the safetensors writer make owner-only files; serving may run as
    # another user, so publish the model world-readable.
    for path in (staging, *staging.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _build_into(target: Path, recipe: Recipe, say: Callable[[str], None]) -> None:
    from transformers import GenerationConfig, LlamaForCausalLM

    started = time.perf_counter()
    tokenizer, tokens, corpus = _tokenized_corpus(recipe, say)
    with _deterministic_torch(recipe.seed) as threads:
        model = LlamaForCausalLM(_llama_config(recipe, tokenizer))
        params = sum(p.numel() for p in model.parameters())
        say(f"model: {params:,} parameters; training {recipe.steps} steps on {threads} threads")
        final_loss = _train(model, tokens, recipe, say)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    with open(target / "model.safetensors", "rb") as weights:
        weights_sha256 = hashlib.file_digest(weights, "sha256").hexdigest()
    manifest = {
        "name": DEFAULT_MODEL_NAME,
        "recipe": asdict(recipe),
        "final_loss": round(final_loss, 4),
        "parameters": params,
        "train_threads": threads,
        "corpus": corpus,
        "weights_sha256": weights_sha256,
        "build_seconds": round(time.perf_counter() - started, 1),
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    (target / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    say(f"built in {manifest['build_seconds']}s, final loss {manifest['final_loss']}")


def _tokenized_corpus(recipe: Recipe, say: Callable[[str], None]):
    """The trained tokenizer, the training documents as one 1-D tensor of token ids, and
    the corpus's description for the manifest."""
    import torch

    docs = gather_docstrings(max_bytes=recipe.max_corpus_bytes)
    tokenizer = train_tokenizer([doc.text for doc in docs], recipe.vocab_size, recipe.max_positions)
    texts = training_documents(docs, tokenizer)
    encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    tokens = torch.tensor([i for enc in encoded for i in enc.ids], dtype=torch.long)
    joined = "\n".join(texts).encode()
    say(f"corpus: {len(docs)} docstrings, {len(texts)} documents, {len(joined):,} bytes, "
        f"{len(tokens):,} tokens; vocab {len(tokenizer)}")
    corpus = {"sha256": hashlib.sha256(joined).hexdigest(), "bytes": len(joined),
              "documents": len(texts), "tokens": len(tokens), "source": str(stdlib_dir())}
    return tokenizer, tokens, corpus


def _versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def main(argv: list[str] | None = None) -> int:
    """`python -m orchestrator.local_model [--out DIR] [--seed N] [--steps N] [--force]`."""
    parser = argparse.ArgumentParser(prog="flotilla build-model",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR, help="model directory")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps (default {Recipe.steps})")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    try:
        path = build_local_model(args.out, seed=args.seed, steps=args.steps, force=args.force)
    except (ValueError, FileExistsError) as exc:
        parser.error(str(exc))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
