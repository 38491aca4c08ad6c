"""The local model's training text and tokenizer, on small literal inputs (no training)."""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path

import jinja2
import pytest

from orchestrator import local_model
from orchestrator.local_model import (
    BOS,
    EOS,
    Docstring,
    Recipe,
    build_local_model,
    chat_pair,
    gather_docstrings,
    train_tokenizer,
    training_documents,
)


def _write(root: Path, relative: str, source: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))


@pytest.fixture
def source_tree(tmp_path: Path) -> Path:
    _write(tmp_path, "pkg/__init__.py", '"""The pkg package holds helpers."""\n')
    _write(tmp_path, "pkg/shapes.py", '''
        """Shapes and their areas in square metres."""
        import sys

        class Circle:
            """A circle of a given radius."""

            def area(self):
                """Return the area of the circle."""

        if sys.platform:
            def fallback():
                """Compute the fallback value slowly."""

        def _private():
            """Return the area of the circle."""
    ''')
    _write(tmp_path, "broken.py", '"""Never read because the file fails to parse."""\ndef (:\n')
    _write(tmp_path, "pkg/tests/test_shapes.py", '"""Test suites are not prose to learn."""\n')
    _write(tmp_path, "tiny.py", '"""Too short."""\n')
    return tmp_path


def test_gather_docstrings_names_every_definition_and_skips_noise(source_tree: Path):
    docs = gather_docstrings(source_tree)
    assert [(d.kind, d.name) for d in docs] == [
        ("module", "pkg"),
        ("module", "pkg.shapes"),
        ("class", "pkg.shapes.Circle"),
        ("function", "pkg.shapes.Circle.area"),
        ("function", "pkg.shapes.fallback"),
    ]  # broken file, test suite, two-word doc and the duplicate in _private are gone
    assert docs[3].text == "Return the area of the circle."


def test_gather_docstrings_stops_at_the_byte_cap(source_tree: Path):
    docs = gather_docstrings(source_tree, max_bytes=40)
    assert [d.name for d in docs] == ["pkg", "pkg.shapes"]


def test_gather_docstrings_reads_the_real_stdlib():
    docs = gather_docstrings(max_bytes=200_000)
    assert sum(len(d.text.encode()) for d in docs) >= 200_000
    assert docs == gather_docstrings(max_bytes=200_000)
    assert {d.kind for d in docs} == {"module", "class", "function"}


def test_gather_docstrings_refuses_a_missing_directory(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gather_docstrings(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (Docstring("function", "json.dumps", "Serialize obj to a JSON formatted str.\n\nMore."),
         ("What does json.dumps do?", "Serialize obj to a JSON formatted str.")),
        (Docstring("class", "queue.Queue", "Create a queue object\nwith a given maximum size."),
         ("What is queue.Queue?", "Create a queue object with a given maximum size.")),
        (Docstring("module", "csv", "CSV parsing and writing for spreadsheets."),
         ("What is the csv module for?", "CSV parsing and writing for spreadsheets.")),
        (Docstring("function", "json._private", "Serialize obj to a JSON formatted str."), None),
        (Docstring("function", "json.dumps", "Too short to teach."), None),
        (Docstring("function", "json.dumps", "word " * 200), None),
    ],
)
def test_chat_pair(doc: Docstring, expected):
    assert chat_pair(doc) == expected


@pytest.fixture(scope="module")
def small_tokenizer():
    texts = [d.text for d in gather_docstrings(max_bytes=100_000)]
    return train_tokenizer(texts, vocab_size=600)


def test_tokenizer_round_trips_any_text(small_tokenizer):
    text = "Return the päth 🚀\n\tof  `x[0]`\r\n<not|a|token>"
    ids = small_tokenizer(text, add_special_tokens=False).input_ids
    assert small_tokenizer.decode(ids) == text


def test_tokenizer_has_single_id_special_tokens_and_prepends_bos(small_tokenizer):
    for token in local_model.SPECIAL_TOKENS:
        assert len(small_tokenizer(token, add_special_tokens=False).input_ids) == 1
    ids = small_tokenizer("Return the").input_ids
    assert ids[0] == small_tokenizer.bos_token_id
    assert small_tokenizer.decode(ids, skip_special_tokens=True) == "Return the"
    assert (small_tokenizer.bos_token, small_tokenizer.eos_token, small_tokenizer.pad_token) == (
        "<|bos|>", "<|eos|>", "<|pad|>")


def test_chat_template_renders_zephyr_style_turns(small_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is csv?"},
    ]
    rendered = small_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|bos|><|system|>\nBe brief.<|eos|><|user|>\nWhat is csv?<|eos|><|assistant|>\n"
    )


def test_chat_template_refuses_unknown_roles(small_tokenizer):
    with pytest.raises(jinja2.exceptions.TemplateError, match="chat role must be"):
        small_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_training_documents_wrap_docs_and_add_chat_turns(small_tokenizer):
    docs = [
        Docstring("function", "json.dumps", "Serialize obj to a JSON formatted str."),
        Docstring("function", "json._private", "Helper that nobody should call directly."),
    ]
    assert training_documents(docs, small_tokenizer) == [
        f"{BOS}Serialize obj to a JSON formatted str.{EOS}",
        (f"{BOS}<|user|>\nWhat does json.dumps do?{EOS}"
         f"<|assistant|>\nSerialize obj to a JSON formatted str.{EOS}"),
        f"{BOS}Helper that nobody should call directly.{EOS}",
    ]


def test_train_tokenizer_refuses_a_vocab_without_room_for_merges():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["some text"], vocab_size=100)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"seed": -1}, "seed"), ({"steps": 0}, "steps"), ({"steps": 2.5}, "steps")],
)
def test_recipe_refuses_bad_seed_and_steps(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Recipe(**kwargs)


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    recipe = Recipe(steps=100)
    scales = [local_model._lr_scale(step, recipe) for step in range(100)]
    assert scales[0] == pytest.approx(0.1)
    assert max(scales) == pytest.approx(1.0)
    assert scales.index(max(scales)) in (9, 10)
    assert scales[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(b <= a for a, b in itertools.pairwise(scales[10:]))


def test_build_refuses_to_replace_a_foreign_directory(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a Flotilla model build"):
        build_local_model(tmp_path, steps=1, progress=None)
    assert (tmp_path / "notes.txt").read_text() == "mine"
