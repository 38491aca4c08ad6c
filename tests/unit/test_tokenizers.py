"""Tokenizers: the byte tokenizer, a Hugging Face tokenizer from a local directory,
`load_tokenizer`, and `TextStream`'s incremental text with stop strings."""

from __future__ import annotations

import json

import pytest

from actors.tokenizers import ByteTokenizer, HfTokenizer, TextStream, Tokenizer, load_tokenizer

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer trained here, with a chat template."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    path = tmp_path_factory.mktemp("tok")
    raw.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
              "eos_token": "</s>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def hf(hf_dir) -> HfTokenizer:
    return HfTokenizer(hf_dir)


@pytest.mark.parametrize("text", ["", "hello", "naïve ☃ 日本", "line\nbreak\ttab"])
def test_byte_tokenizer_round_trips_utf8(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_tokenizer_specials_and_chat_format():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_token_id, tok.name) == (258, ByteTokenizer.EOS, "byte")
    ids = tok.apply_chat_template([{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "hi"}])
    assert ids[0] == ByteTokenizer.BOS
    assert tok.decode(ids) == "system: be brief\nuser: hi\nassistant:"
    assert tok.decode([ByteTokenizer.BOS, 104, 105, ByteTokenizer.EOS]) == "hi"


@pytest.mark.parametrize("messages", [[{"role": "user"}], [{"role": 1, "content": "x"}], ["hi"]])
def test_chat_messages_without_role_or_content_are_refused(messages):
    with pytest.raises(TypeError, match="chat message needs a string"):
        ByteTokenizer().apply_chat_template(messages)


def test_byte_tokenizer_refuses_ids_outside_its_vocabulary():
    with pytest.raises(ValueError, match="outside the byte vocabulary"):
        ByteTokenizer().decode([104, 9999])


def test_hf_tokenizer_round_trips_and_uses_the_directory_chat_template(hf, hf_dir):
    from tokenizers import Tokenizer as RawTokenizer

    assert isinstance(hf, Tokenizer)
    assert hf.vocab_size == RawTokenizer.from_file(str(hf_dir / "tokenizer.json")).get_vocab_size()
    assert hf.eos_token_id == 2
    text = "the lazy fox"
    assert hf.decode(hf.encode(text)) == text
    ids = hf.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ids[0] == 1  # the template's bos_token
    assert hf.decode(ids) == "<|user|>hi\n<|assistant|>"


def test_load_tokenizer_picks_byte_or_a_directory(hf_dir):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    loaded = load_tokenizer(str(hf_dir))
    assert isinstance(loaded, HfTokenizer)
    assert loaded.name == str(hf_dir)


def test_load_tokenizer_names_a_missing_or_empty_directory(tmp_path):
    with pytest.raises(ValueError, match="neither 'byte' nor an existing directory"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=f"no tokenizer in {tmp_path}"):
        load_tokenizer(str(tmp_path))


def test_a_directory_without_chat_template_refuses_chats(tmp_path, hf_dir):
    (tmp_path / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>"}))
    with pytest.raises(ValueError, match="has no chat template"):
        HfTokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])


def stream_text(tok: Tokenizer, ids, stop=(), prior=(), chunk=1) -> tuple[str, bool]:
    stream = TextStream(tok, stop, prior)
    out = "".join(stream.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk))
    return out + ("" if stream.stopped else stream.flush()), stream.stopped


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_text_stream_reassembles_multibyte_characters(chunk):
    tok = ByteTokenizer()
    text = "héllo ☃ wörld"
    assert stream_text(tok, tok.encode(text), chunk=chunk) == (text, False)


def test_text_stream_matches_whole_decode_on_a_merging_tokenizer(hf):
    text = "the quick brown fox jumps"
    assert stream_text(hf, hf.encode(text)) == (text, False)


@pytest.mark.parametrize(
    "text, stop, prior, expected, stopped",
    [
        ("hello world", ("wor",), "", "hello ", True),
        ("hello world", ("xyz",), "", "hello world", False),
        ("hello world", ("o", "ll"), "", "he", True),  # the earliest match wins
        ("abc", ("c",), "", "ab", True),
        # resumed after "hel": the stop string straddles what the client already has
        ("lo world", ("llo",), "hel", "", True),
        ("lo world", ("wor",), "hel", "lo ", True),
    ],
)
def test_text_stream_stops_on_strings_and_never_sends_them(text, stop, prior, expected, stopped):
    tok = ByteTokenizer()
    assert stream_text(tok, tok.encode(text), stop, tok.encode(prior)) == (expected, stopped)


def test_text_stream_holds_back_a_possible_stop_string_start():
    tok = ByteTokenizer()
    stream = TextStream(tok, ("world",))
    assert stream.push(tok.encode("hello wo")) == "hell"  # "o wo" may begin "world"
    assert stream.push(tok.encode("k")) == "o"
    assert stream.flush() == " wok"


def test_empty_stop_strings_are_refused():
    with pytest.raises(ValueError, match="stop strings must not be empty"):
        TextStream(ByteTokenizer(), ("",))
