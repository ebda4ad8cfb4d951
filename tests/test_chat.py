"""Multi-turn chat with a KV cache kept between turns, and prompt caches on disk.

The cached chat must give exactly the tokens of processing the whole history from scratch each
turn, while running only the new tokens through the model; a saved cache must continue exactly
as the live one; files from another model, truncated or corrupt files are refused in one line;
a failed save leaves no partial file."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

try:
    from .tiny import random_weights, tiny_config, write_hf_checkpoint
except ImportError:
    from tiny import random_weights, tiny_config, write_hf_checkpoint

from mlx_llama import MlxLlamaError, convert, load
from mlx_llama.chat import ChatSession
from mlx_llama.generate import generate_step
from mlx_llama.prompt_cache import (
    PromptCacheError,
    PromptCacheMismatch,
    load_prompt_cache,
    model_fingerprint,
    process_prompt_with_cache_file,
)

ROOT = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SYSTEM = (
    "You are a tiny Llama. The quick brown fox jumps over the lazy dog. Rotary position embeddings rotate "
    "pairs of dimensions by an angle. Grouped-query attention shares each key and value head among several "
    "query heads. What is the capital of France? The capital of France is Paris."
)
USER = ["Hello world!", "How are you today?", "Tell me about the fox."]


def make_model(root: Path, seed: int = 11, **overrides) -> Path:
    config = tiny_config(**overrides)
    hf = write_hf_checkpoint(root / "hf", config, random_weights(config, seed=seed))
    out = convert(str(hf), str(root / "mlx"), progress=False)
    tc = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": CHATML}))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def tiny(model_dir):
    return load(str(model_dir))


class Counting:
    """The model, counting the tokens run through it."""

    def __init__(self, model):
        self.model = model
        self.fed = 0

    def __call__(self, tokens, cache=None):
        self.fed += tokens.shape[1]
        return self.model(tokens, cache)

    def __getattr__(self, name):
        return getattr(self.model, name)


def greedy_from_scratch(model, ids, max_tokens, eos):
    out = []
    for t, _ in generate_step(mx.array(ids, dtype=mx.uint32), model, max_tokens=max_tokens):
        out.append(t)
        if t in eos:
            break
    return out


def encode_from_scratch(tokenizer, messages):
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def turn(session, text, max_tokens=8):
    records = list(session.send(text, max_tokens=max_tokens))
    return [r.token for r in records], records[-1]


@pytest.mark.parametrize("stop", [False, True], ids=["max_tokens", "eos"])
def test_cached_chat_equals_reprocessing_and_prefills_only_new_tokens(tiny, stop):
    model, tokenizer = tiny
    if stop:
        # Make a token the model emits early an EOS: replies then end inside the cache with an id the
        # re-rendered conversation replaces by the template's end marker, so the cache must be trimmed.
        tokenizer = copy.copy(tokenizer)
        opening = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER[0]}]
        first = encode_from_scratch(tokenizer, opening)
        tokenizer.eos_token_ids = {greedy_from_scratch(model, first, 8, set())[3]}
    counting = Counting(model)
    session = ChatSession(counting, tokenizer, system_prompt=SYSTEM)
    messages = [{"role": "system", "content": SYSTEM}]
    prev_len, finishes = 0, []
    for k, text in enumerate(USER):
        messages.append({"role": "user", "content": text})
        ids = encode_from_scratch(tokenizer, messages)
        expect = greedy_from_scratch(model, ids, 8, tokenizer.eos_token_ids)

        counting.fed, held = 0, len(session.cached_tokens)
        tokens, last = turn(session, text)
        assert tokens == expect, f"turn {k + 1}"
        if finishes[-1:] == ["stop"]:
            assert last.reused_tokens < held  # the EOS id in the cache was trimmed away
        reply = tokenizer.decode([t for t in tokens if t not in tokenizer.eos_token_ids])
        messages.append({"role": "assistant", "content": reply})
        assert session.messages == messages

        # Stats are honest: the model saw exactly the processed prompt tokens plus each generated
        # token that was fed back (all but the last when max_tokens cut the reply).
        assert last.prompt_tokens + last.reused_tokens == len(ids)
        assert counting.fed == last.prompt_tokens + len(tokens) - (len(tokens) == 8)
        finishes.append(last.finish_reason)
        if k == 0:
            assert last.reused_tokens == 0
        else:
            # Everything up to the previous reply is reused; only the reply's tail and the new user
            # message are processed: a small part of the history.
            assert last.reused_tokens >= prev_len - 1
            assert last.prompt_tokens < len(ids) // 3, (last.prompt_tokens, len(ids))
        prev_len = len(ids)
        # The session knows exactly what the cache holds: generate_step has fed back every token it
        # yielded except the last one of a reply cut by max_tokens.
        held = session.cached_tokens
        assert held == (ids + tokens)[: len(ids) + len(tokens) - (len(tokens) == 8)]
        assert all(c.offset == len(held) for c in session._cache)
    assert ("stop" in finishes) == stop


def test_reset_forgets_the_conversation_and_reuses_the_system_prompt(tiny):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer, system_prompt=SYSTEM)
    turn(session, USER[0])
    session.reset()
    assert session.messages == [{"role": "system", "content": SYSTEM}]
    tokens, last = turn(session, USER[1])
    ids = encode_from_scratch(tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER[1]}])
    assert tokens == greedy_from_scratch(model, ids, 8, tokenizer.eos_token_ids)
    assert last.reused_tokens > len(tokenizer.encode(SYSTEM))


def test_a_reply_cut_short_stays_as_far_as_it_got(tiny):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer, system_prompt=SYSTEM)
    replies = session.send(USER[0], max_tokens=8)
    first = [next(replies).token for _ in range(3)]
    with pytest.raises(RuntimeError, match="still being generated"):
        session.send(USER[1])
    replies.close()
    assert session.messages[-1]["role"] == "assistant"
    assert tokenizer.decode(first).startswith(session.messages[-1]["content"])  # less any unfinished character
    assert all(c.offset == len(session.cached_tokens) for c in session._cache)
    tokens, _ = turn(session, USER[1])
    ids = encode_from_scratch(tokenizer, session.messages[:-1])
    assert tokens == greedy_from_scratch(model, ids, 8, tokenizer.eos_token_ids)


def test_bad_messages_are_user_errors(tiny):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer)
    with pytest.raises(MlxLlamaError, match="empty"):
        session.send("   ")
    with pytest.raises(MlxLlamaError, match="max_tokens"):
        session.send("hi", max_tokens=0)
    assert session.messages == []


def test_saved_session_continues_exactly(tiny, tmp_path):
    model, tokenizer = tiny
    a = ChatSession(model, tokenizer, system_prompt=SYSTEM)
    turn(a, USER[0])
    path = a.save(tmp_path / "chat.cache")
    saved_ids = a.cached_tokens
    live, live_last = turn(a, USER[1])

    counting = Counting(model)
    b = ChatSession(counting, tokenizer)  # no system prompt: the file brings the conversation
    b.load(path)
    assert b.messages == a.messages[:3] and b.cached_tokens == saved_ids
    restored, last = turn(b, USER[1])
    assert restored == live
    assert last.reused_tokens == live_last.reused_tokens and last.prompt_tokens == live_last.prompt_tokens
    assert counting.fed < len(saved_ids) // 2

    # The file holds the filled part of each layer, trimmed to the known ids.
    cache, ids = load_prompt_cache(path, model)
    assert ids == saved_ids
    assert all(c.offset == len(ids) and c.state[0].shape[2] == len(ids) for c in cache)


@pytest.fixture(scope="module")
def other_models(tmp_path_factory):
    """A model with another config, and one with the same config and other weights."""
    root = tmp_path_factory.mktemp("other")
    (root / "a").mkdir(), (root / "b").mkdir()
    return load(str(make_model(root / "a", num_hidden_layers=3)))[0], load(str(make_model(root / "b", seed=12)))[0]


def test_cache_from_another_model_is_refused(tiny, other_models, tmp_path):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer)
    turn(session, USER[0], max_tokens=2)
    path = session.save(tmp_path / "c.cache")
    deeper, reweighted = other_models
    for other, why in ((deeper, "num_hidden_layers 2 in the file, 3 here"), (reweighted, "its weights differ")):
        with pytest.raises(PromptCacheMismatch) as e:
            load_prompt_cache(path, other)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and "different model" in msg and why in msg
    assert model_fingerprint(model) == model_fingerprint(model)


def corruptions(good: bytes, model_file: Path):
    yield "truncated", good[: len(good) // 2], "truncated"
    yield "one byte short", good[:-1], "truncated"
    yield "empty", b"", "not a prompt cache"
    yield "garbage", b"\x07" * 100, "not a prompt cache"
    yield "a model's weights", model_file.read_bytes(), "not a prompt cache"
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["mlx_llama.prompt_cache"])
    for key, value, words in (("format", 99, "format 99"), ("tokens", [10**6], "outside the vocabulary")):
        bad = dict(header, __metadata__={"mlx_llama.prompt_cache": json.dumps({**meta, key: value})})
        h = json.dumps(bad).encode()
        h += b" " * (-len(h) % 8)
        yield key, len(h).to_bytes(8, "little") + h + good[8 + n :], words


def test_corrupt_or_missing_files_are_refused_in_one_line(tiny, model_dir, tmp_path):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer)
    turn(session, USER[0], max_tokens=3)
    good = session.save(tmp_path / "good.cache").read_bytes()
    with pytest.raises(PromptCacheError, match="no such file"):
        load_prompt_cache(tmp_path / "missing.cache", model)
    for name, data, words in corruptions(good, model_dir / "model.safetensors"):
        path = tmp_path / f"{name}.cache"
        path.write_bytes(data)
        with pytest.raises(PromptCacheError) as e:
            session.load(path)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and words in msg, (name, msg)


def test_save_is_atomic(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer)
    turn(session, USER[0], max_tokens=3)
    path = session.save(tmp_path / "c.cache")
    before = path.read_bytes()
    turn(session, USER[1], max_tokens=3)

    def fail_halfway(f, arrays, metadata=None):
        f.write(b"partial data")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", fail_halfway)
    with pytest.raises(PromptCacheError, match="No space left"):
        session.save(path)
    with pytest.raises(PromptCacheError, match="No space left"):
        session.save(tmp_path / "new.cache")
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["c.cache"]
    with pytest.raises(PromptCacheError, match="no directory"):
        session.save(tmp_path / "nowhere" / "c.cache")


def test_prompt_cache_file_reuses_a_system_prompt_across_runs(tiny, other_models, tmp_path):
    model, tokenizer = tiny
    path = tmp_path / "system.cache"
    def run(user, m=model):
        counting = Counting(m)
        ids = tokenizer.encode_chat(user, system_prompt=SYSTEM)
        cache, rest, reused = process_prompt_with_cache_file(counting, tokenizer, ids, path)
        assert reused + counting.fed + len(rest) == len(ids)
        tokens = [t for t, _ in generate_step(mx.array(rest, dtype=mx.uint32), m, max_tokens=6, cache=cache)]
        assert tokens == [t for t, _ in generate_step(mx.array(ids, dtype=mx.uint32), m, max_tokens=6)]
        return ids, reused

    ids1, reused = run(USER[0])
    assert reused == 0 and path.exists()
    ids2, reused = run(USER[1])
    assert reused >= len(tokenizer.encode(SYSTEM)) and reused < len(ids2) - 1
    stamp = path.stat().st_mtime_ns
    _, reused = run(USER[1])
    assert reused == len(ids2) - 1 and path.stat().st_mtime_ns == stamp  # nothing new: not rewritten
    assert load_prompt_cache(path, model)[1] == ids2[:-1]
    # A file made by another model is replaced, with a warning.
    with pytest.warns(UserWarning, match="different model.*replacing it"):
        _, reused = run(USER[1], m=other_models[1])
    assert reused == 0 and load_prompt_cache(path, other_models[1])[1] == ids2[:-1]


# ---------------------------------------------------------------------------------------------
# command line

STATS = re.compile(r"^\[prompt: (\d+) tokens processed, (\d+) reused; first token .* tokens/s\]$", re.M)


def chat(*args, stdin):
    return subprocess.run(
        [sys.executable, "-m", "mlx_llama.chat", *args],
        capture_output=True, text=True, cwd=ROOT, input=stdin, timeout=120,
    )


def test_cli_chats_from_a_pipe_and_saves_and_loads(model_dir, tmp_path):
    saved = tmp_path / "session.cache"
    stdin = f"hello there\nhow are you\n/save {saved}\n/quit\nignored\n"
    proc = chat("--model", str(model_dir), "--max-tokens", "5", stdin=stdin)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    stats = STATS.findall(proc.stdout)
    assert len(stats) == 2, proc.stdout
    assert int(stats[1][1]) > 0  # the second turn reused the first
    assert f"[saved {saved}: 4 messages" in proc.stdout and saved.exists()

    proc = chat("--model", str(model_dir), "--max-tokens", "5", stdin=f"/load {saved}\nand then?\n")  # EOF ends it
    assert proc.returncode == 0, proc.stderr
    assert f"[loaded {saved}: 4 messages" in proc.stdout
    (processed, reused), = STATS.findall(proc.stdout)
    assert int(reused) > int(processed)


def test_cli_prompt_cache_file_and_errors(model_dir, tmp_path):
    cache = tmp_path / "sys.cache"
    args = ("--model", str(model_dir), "--max-tokens", "3", "--system-prompt", SYSTEM)
    args += ("--prompt-cache-file", str(cache))
    proc = chat(*args, stdin="hello\n")
    assert proc.returncode == 0 and cache.exists(), proc.stderr
    (_, reused), = STATS.findall(proc.stdout)
    assert reused == "0"
    # A second run starts from the saved cache: the system prompt is not processed again. A failed
    # command is one error line, the chat goes on, and the exit status says something failed.
    proc = chat(*args, stdin=f"/load {tmp_path / 'missing.cache'}\n/bogus\nsomething else\n")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: {tmp_path / 'missing.cache'}: no such file",
        "error: unknown command /bogus (commands: /reset, /save FILE, /load FILE, /quit)",
    ]
    (_, reused), = STATS.findall(proc.stdout)
    assert int(reused) > 40

    cache.write_bytes(b"not a cache")
    proc = chat(*args, stdin="hello\n")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [f"error: {cache}: not a prompt cache (not a safetensors file, or truncated)"]
    assert cache.read_bytes() == b"not a cache"  # not ours to overwrite
