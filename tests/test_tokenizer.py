"""Tokenizer tests on tokenizers trained here, in seconds, from a small mixed-script corpus.

Three kinds, the ones Llama checkpoints ship:
- byte-level BPE tokenizer.json (Llama 3 style), trained with `tokenizers`;
- SentencePiece tokenizer.model with byte fallback (Llama 1/2, Mistral), trained with `sentencepiece`;
- the same SentencePiece vocabulary as a tokenizer.json with a ByteFallback/Strip decoder, the way Hugging
  Face converts Llama 2 (its decoder turns a whole run of byte tokens into U+FFFD if any byte is out of place).
"""

import io
import json
import random

import pytest
import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

from mlx_llama.tokenizer import TokenizerError, load_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's a dog's life, isn't it?",
    "Héllo wörld, ça va? Ünïcödé façade naïve crème brûlée. Größe, señor, Ærøskøbing.",
    "日本語のテキストです。中文文本测试。한국어 문장입니다.",
    "Emoji: 😀 🎉 👍🏽 👩‍👩‍👧 ❤️ 🇫🇷 and more 🚀.",
    "  indented\tcode = 1\n\nnew paragraph\r\n",
    "def f(x):\n    return x * 2  # double\n",
    "Numbers 1234567890, symbols !@#$%^&*()[]{}<>/\\|~`'\"",
] * 30

# Pieces random test texts are made of: seen in training, rare (byte fallback), and awkward whitespace.
PIECES = ["the", " the", "dog", " fox", "Héllo", " wörld", "ça", " naïve", "日本語", "中文", "测试", "한국어",
          "😀", "👍🏽", "👩‍👩‍👧", "❤️", "🇫🇷", "𝄞", "ǅ", "हिन्दी", "مرحبا", "Ω≈ç√", " ", "  ", "   ", "\t", "\n",
          "\n\n", " \n", "x", "42", ",", " ,", ".", " .", " 's", "'", "<", ">", "#"]

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA2 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>"
          "{% else %}[INST] {{ m['content'] }} [/INST]{% endif %}{% endfor %}")


def random_texts(seed, n):
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def write_json(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    # Like Llama 3, the post-processor adds BOS: that makes adding it the default.
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    tok.save(str(d / "tokenizer.json"))
    write_json(d / "tokenizer_config.json", {
        "bos_token": "<|endoftext|>", "eos_token": {"content": "<|im_end|>", "lstrip": False},
        "chat_template": "{{ bos_token }}" + CHATML, "clean_up_tokenization_spaces": True})
    write_json(d / "generation_config.json", {"eos_token_id": [0, 7]})
    return d


def train_sentencepiece():
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, model_type="bpe", vocab_size=450,
        byte_fallback=True, character_coverage=0.995,  # leaves rare characters to byte fallback
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, split_digits=True, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return model.getvalue()


@pytest.fixture(scope="module")
def spm_model():
    return train_sentencepiece()


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory, spm_model):
    d = tmp_path_factory.mktemp("spm")
    (d / "tokenizer.model").write_bytes(spm_model)
    write_json(d / "tokenizer_config.json", {
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": LLAMA2}]})
    return d


@pytest.fixture(scope="module")
def fallback_dir(tmp_path_factory, spm_model):
    """The SentencePiece vocabulary as a Llama 2 style tokenizer.json (Unigram here, for want of merges)."""
    d = tmp_path_factory.mktemp("fallback")
    sp = spm.SentencePieceProcessor(model_proto=spm_model)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = HFTokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(d / "tokenizer.json"))
    write_json(d / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>"})
    return d


@pytest.fixture(scope="module", params=["bpe", "spm", "fallback"])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def tok(request, kind):
    return load_tokenizer(request.getfixturevalue(f"{kind}_dir"))


def cut_inside_long_byte_run(kind, decoded):
    """The one place a stream may differ from decode: a byte-fallback tokenizer.json shows U+FFFD for a whole
    run of byte tokens while its last character is unfinished, and the stream shows a run longer than 32
    tokens before it ends; so a sequence cut off inside such a run differs."""
    return kind == "fallback" and len(decoded) - len(decoded.rstrip("\ufffd")) > 32


def stream(tokenizer, ids):
    d = tokenizer.detokenizer()
    parts = [d.add_token(i) for i in ids]
    parts.append(d.finalize())
    assert d.text == "".join(parts)
    return parts


# --- round trips and streaming --------------------------------------------------------------------------------

ODD_TEXTS = ["Héllo wörld", "日本語のテキスト", "👩‍👩‍👧 family, 👍🏽, 🇫🇷", "𝄞 ǅ हिन्दी", " leading space",
             "   three leading", "repeated    spaces", "line\nbreak\n\n\ntabs\t\tend\t", "trailing  ", "\n", " ",
             "Hello , world . It 's", "x<y>z", "हिन्दी" * 5]


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    assert "".join(stream(tok, ids)) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_byte_fallback_is_exercised(spm_dir):
    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    assert any(sp.is_byte(i) for i in sp.encode("𝄞 हिन्दी"))


def test_streaming_matches_decode_random_texts(tok, kind):
    for text in random_texts(seed=1, n=60):
        ids = tok.encode(text, add_bos=False)
        assert tok.decode(ids) == text
        d = tok.detokenizer()
        for k, i in enumerate(ids, 1):
            d.add_token(i)
            # What was shown is final: always the start of the decoded prefix, never more than it.
            decoded = tok.decode(ids[:k])
            assert decoded.startswith(d.text) or cut_inside_long_byte_run(kind, decoded)
        d.finalize()
        assert d.text == text


def test_streaming_every_prefix_finalized(tok, kind):
    for text in ["a𝄞ǅ𝄞 x", "हिन्दी" * 4 + " ok"] + random_texts(seed=2, n=6):
        ids = tok.encode(text)  # with BOS: the special token's text is streamed too
        for k in range(len(ids) + 1):
            decoded = tok.decode(ids[:k])
            assert "".join(stream(tok, ids[:k])) == decoded or cut_inside_long_byte_run(kind, decoded)


def test_streaming_holds_back_partial_characters(spm_dir, fallback_dir):
    # 𝄞 is four byte-fallback tokens. SentencePiece shows it once complete; a byte-fallback tokenizer.json
    # waits for the end of the byte run, since one bad byte would turn the whole run into U+FFFD.
    for directory, shown, held in [(spm_dir, ["", "", "", "𝄞"], ""), (fallback_dir, ["", "", "", ""], "𝄞")]:
        tokenizer = load_tokenizer(directory)
        d = tokenizer.detokenizer()
        assert [d.add_token(i) for i in tokenizer.encode("a𝄞", add_bos=False)][-4:] == shown
        assert d.finalize() == held and d.text == "a𝄞"


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_streaming_random_ids(request, kind):
    """Arbitrary ids, stray bytes included: the stream still equals decode (U+FFFD where decode has it)."""
    tokenizer = load_tokenizer(request.getfixturevalue(f"{kind}_dir"))
    rng = random.Random(3)
    for _ in range(40):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 60))]
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids)


def test_streaming_stray_bytes(spm_dir):
    """A model emitting long runs of bytes that make no character: the window stays bounded, the stream exact."""
    tokenizer = load_tokenizer(spm_dir)
    byte_id = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model")).piece_to_id
    rng = random.Random(5)
    for _ in range(30):
        data = b""
        for _ in range(rng.randint(1, 5)):
            data += bytes(rng.randrange(0x80, 0xC0) for _ in range(rng.randint(0, 60)))  # continuation bytes only
            data += rng.choice(["中", "😀", "é", "a", ""]).encode() + "😀".encode()[: rng.choice([0, 1, 2, 3])]
        ids = [byte_id(f"<0x{b:02X}>") for b in data]
        d = tokenizer.detokenizer()
        parts = [d.add_token(i) for i in ids]
        assert len(d._window) <= 36
        assert "".join(parts) + d.finalize() == tokenizer.decode(ids)


def test_streaming_window_stays_small(tok):
    text = " ".join(random_texts(seed=4, n=30))
    d = tok.detokenizer()
    for i in tok.encode(text, add_bos=False):
        d.add_token(i)
        assert len(d._window) <= 36
    d.finalize()
    assert d.text == text


# --- special tokens and BOS -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_special_token_text_is_one_id(request, kind):
    tokenizer = load_tokenizer(request.getfixturevalue(f"{kind}_dir"))
    ids = tokenizer.encode("Hi<|im_end|>there", add_bos=False)
    end_id = [i for i in ids if tokenizer.decode([i]) == "<|im_end|>"]
    assert len(end_id) == 1 and ids.count(end_id[0]) == 1
    assert tokenizer.decode(ids) == "Hi<|im_end|>there"


def test_bos_added_once(tok):
    assert tok.add_bos_token  # bpe and fallback: their post-processor adds it; spm: Llama's default
    bos = tok.bos_token_id
    assert tok.encode("hello")[0] == bos and tok.encode("hello").count(bos) == 1
    assert bos not in tok.encode("hello", add_bos=False)
    assert tok.encode(tok.bos_token + "hello", add_bos=True).count(bos) == 1
    assert tok.encode(tok.bos_token + "hello") == tok.encode("hello")


@pytest.mark.parametrize("kind", ["bpe", "spm"])  # both templates write the BOS text
def test_encode_chat_template_writing_bos_gives_one_bos(request, kind):
    tok = load_tokenizer(request.getfixturevalue(f"{kind}_dir"))
    ids = tok.encode_chat("Hi there", system_prompt="Be brief.")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids) == tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}])


def test_add_bos_token_config_wins(tmp_path, spm_model):
    (tmp_path / "tokenizer.model").write_bytes(spm_model)
    write_json(tmp_path / "tokenizer_config.json", {"add_bos_token": False})
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.bos_token == "<s>" and tokenizer.bos_token_id == 1  # from the model itself
    assert tokenizer.encode("hello")[0] != 1
    assert tokenizer.eos_token_ids == {2}


def test_spm_bos_text_in_prompt(spm_dir):
    tokenizer = load_tokenizer(spm_dir)
    ids = tokenizer.encode("<s>[INST] hi [/INST]")
    assert ids[0] == 1 and ids.count(1) == 1
    assert tokenizer.decode(ids) == "<s>[INST] hi [/INST]"


# --- stop set, vocabulary, chat templates ---------------------------------------------------------------------


def test_eos_set_is_union(bpe_dir):
    tokenizer = load_tokenizer(bpe_dir, eos_token_ids=[9, 0])
    im_end = tokenizer.encode("<|im_end|>", add_bos=False)
    assert len(im_end) == 1
    assert tokenizer.eos_token_ids == {im_end[0], 0, 7, 9}
    assert load_tokenizer(bpe_dir, eos_token_ids=11).eos_token_ids == {im_end[0], 0, 7, 11}


def test_vocab_size_and_preference(tmp_path, bpe_dir, spm_dir, spm_model):
    assert load_tokenizer(bpe_dir).vocab_size == 500
    assert load_tokenizer(spm_dir).vocab_size == 450
    (tmp_path / "tokenizer.model").write_bytes(spm_model)
    (tmp_path / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    assert load_tokenizer(tmp_path).vocab_size == 500  # tokenizer.json wins when both are there


def test_chatml_template_exact(bpe_dir):
    tokenizer = load_tokenizer(bpe_dir)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}]
    assert tokenizer.apply_chat_template(messages) == (
        "<|endoftext|><|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert tokenizer.apply_chat_template(messages[1:], add_generation_prompt=False) == (
        "<|endoftext|><|im_start|>user\nHi!<|im_end|>\n")


def test_default_of_named_templates(spm_dir):
    tokenizer = load_tokenizer(spm_dir)
    assert tokenizer.chat_template == LLAMA2
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>[INST] hi [/INST]"


def test_template_file_overrides_and_trims_blocks(tmp_path, bpe_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((bpe_dir / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}\n  {% if m['role'] == 'user' %}\nU: {{ m['content'] | tojson }}\n  {% endif %}\n"
        "{% endfor %}\n{% if add_generation_prompt %}A:{% endif %}", encoding="utf-8")
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "<é>"}]) == 'U: "<é>"\nA:'


def test_template_raise_exception(tmp_path, bpe_dir):
    (tmp_path / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TokenizerError, match="chat_template.jinja: chat template: roles must alternate"):
        load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_no_template(tmp_path, bpe_dir):
    (tmp_path / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.chat_template is None and tokenizer.bos_token is None and tokenizer.eos_token_ids == set()
    with pytest.raises(TokenizerError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}])
    assert tokenizer.encode_chat("Hi", system_prompt="Sys") == tokenizer.encode("Sys\n\nHi")


def test_encode_chat_without_template(bpe_dir):
    tokenizer = load_tokenizer(bpe_dir)
    assert tokenizer.encode_chat("Hi", use_template=False) == tokenizer.encode("Hi")
    assert tokenizer.encode_chat("Hi", "Sys", use_template=False) == tokenizer.encode("Sys\n\nHi")


# --- errors ---------------------------------------------------------------------------------------------------


def test_missing_tokenizer(tmp_path):
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    assert str(e.value) == f"{tmp_path}: no tokenizer found (tokenizer.json or tokenizer.model)"


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"])
def test_corrupt_file_is_named(tmp_path, spm_model, name):
    (tmp_path / "tokenizer.model").write_bytes(spm_model)
    (tmp_path / name).write_bytes(b"\x00{not valid")
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)

