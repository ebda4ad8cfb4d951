"""Meta's original layout (params.json + consolidated.NN.pth): names, model-parallel shards and the
q/k row permutation, checked against Hugging Face weights and an independent interleaved-RoPE forward.

The Meta checkpoints are made here from tiny random HF weights: q/k rows moved to the interleaved
layout with an explicit index loop (the inverse of what the library does), split across model-parallel
ranks the way Meta's ColumnParallel/RowParallel layers split them, and written with the test-side
torch.save writer of test_torch_pickle.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import sentencepiece as spm

try:  # tests/ may or may not be a package
    from . import reference as R
    from .test_torch_pickle import contiguous, write_torch_file, write_torch_zip
    from .tiny import _CORPUS, bf16_round, random_weights, tiny_config
except ImportError:
    import reference as R
    from test_torch_pickle import contiguous, write_torch_file, write_torch_zip
    from tiny import _CORPUS, bf16_round, random_weights, tiny_config

from mlx_llama.config import ModelArgs
from mlx_llama.errors import MlxLlamaError
from mlx_llama.meta import ffn_hidden_size, is_meta_checkpoint, meta_config, meta_to_hf

CONFIG = tiny_config()  # hidden 64, intermediate 96, 2 layers, 4 heads, 2 KV heads, vocab 320
# int(8 * 64 / 3) = 170; * 0.5 -> 85; rounded up to a multiple of 32 -> 96 = CONFIG's intermediate_size
PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": -1, "multiple_of": 32,
          "ffn_dim_multiplier": 0.5, "norm_eps": 1e-5, "rope_theta": 10000.0}

# HF name -> (Meta name, model-parallel split axis; None = replicated), written out independently of the library
GLOBAL = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", "embedding"),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("output.weight", 0),
}
LAYER = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}


def to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half rows -> Meta interleaved rows: per head, Meta row 2j is HF row j and Meta row
    2j+1 is HF row j + head_dim/2."""
    head_dim = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for j in range(head_dim // 2):
            out[h * head_dim + 2 * j] = w[h * head_dim + j]
            out[h * head_dim + 2 * j + 1] = w[h * head_dim + j + head_dim // 2]
    return out


def meta_names(hf_weights: dict, config: dict) -> dict:
    """HF weights -> Meta names, q/k rows interleaved. Returns Meta name -> (array, split axis)."""
    out = {}
    for hf, w in hf_weights.items():
        if hf in GLOBAL:
            name, axis = GLOBAL[hf]
        else:
            _, _, i, rest = hf.split(".", 3)
            name, axis = LAYER[rest]
            name = f"layers.{i}.{name}"
            if rest == "self_attn.q_proj.weight":
                w = to_interleaved(w, config["num_attention_heads"])
            elif rest == "self_attn.k_proj.weight":
                w = to_interleaved(w, config["num_key_value_heads"])
        out[name] = (w, axis)
    return out


def write_meta_checkpoint(d: Path, hf_weights: dict, config: dict = CONFIG, params: dict = PARAMS, shards: int = 2,
                          embedding_axis: int = 1, dtype: str = "float32", extra: dict | None = None) -> Path:
    """params.json and consolidated.00.pth ... : every rank holds its slice of each split tensor and a copy of
    each replicated one. embedding_axis 1 splits the hidden axis (Llama 1/2), 0 the vocabulary (Llama 3)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "params.json").write_text(json.dumps(params))
    meta = meta_names(hf_weights, config)
    for rank in range(shards):
        tensors = {}
        for name, (w, axis) in meta.items():
            axis = embedding_axis if axis == "embedding" else axis
            part = w if axis is None else np.split(w, shards, axis=axis)[rank]
            tensors[name] = contiguous(part, dtype)
        for name, w in (extra or {}).items():
            tensors[name] = contiguous(w, "float32")
        write_torch_file(d / f"consolidated.{rank:02d}.pth", tensors, root=f"consolidated.{rank:02d}")
    return d


def meta_forward(meta: dict, params: dict, tokens, inv_freq) -> np.ndarray:
    """Logits of Meta's model as Meta's code computes them, on Meta-named weights: interleaved RoPE
    (pairs 2j, 2j+1) applied to q/k rows exactly as stored. float64, no cache."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in meta.items()}
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    n_heads = params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    head_dim = params["dim"] // n_heads
    eps = params["norm_eps"]
    positions, mask = np.arange(T), R.causal_mask(T, 0)
    h = w["tok_embeddings.weight"][tokens]
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = R.rms_norm(h, w[p + "attention_norm.weight"], eps)
        q = (x @ w[p + "attention.wq.weight"].T).reshape(B, T, n_heads, head_dim).transpose(0, 2, 1, 3)
        k = (x @ w[p + "attention.wk.weight"].T).reshape(B, T, n_kv, head_dim).transpose(0, 2, 1, 3)
        v = (x @ w[p + "attention.wv.weight"].T).reshape(B, T, n_kv, head_dim).transpose(0, 2, 1, 3)
        q = R.rope(q, positions, traditional=True, freqs=inv_freq)
        k = R.rope(k, positions, traditional=True, freqs=inv_freq)
        a = R.attention(q, k, v, mask).transpose(0, 2, 1, 3).reshape(B, T, n_heads * head_dim)
        h = h + a @ w[p + "attention.wo.weight"].T
        x = R.rms_norm(h, w[p + "ffn_norm.weight"], eps)
        gate, up = x @ w[p + "feed_forward.w1.weight"].T, x @ w[p + "feed_forward.w3.weight"].T
        h = h + (R.silu(gate) * up) @ w[p + "feed_forward.w2.weight"].T
    return R.rms_norm(h, w["norm.weight"], eps) @ w["output.weight"].T


def to_numpy(weights: dict) -> dict:
    return {k: np.array(v.astype(mx.float32)) for k, v in weights.items()}


@pytest.fixture(scope="module")
def hf_weights():
    return random_weights(CONFIG, seed=7)


TOKENS = np.array([[1, 17, 250, 3, 99, 42, 7, 300, 11, 5, 64, 2]])


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shards, embedding_axis, dtype", [
    (1, 1, "float32"), (2, 1, "float32"), (2, 0, "float32"), (2, 1, "bfloat16"),
])
def test_meta_to_hf_gives_the_hf_weights(tmp_path, hf_weights, shards, embedding_axis, dtype):
    d = write_meta_checkpoint(tmp_path / "meta", hf_weights, shards=shards, embedding_axis=embedding_axis, dtype=dtype)
    assert is_meta_checkpoint(d)
    config, weights = meta_to_hf(d)
    assert set(weights) == set(hf_weights)
    for name, want in hf_weights.items():
        got = weights[name]
        assert got.dtype == (mx.bfloat16 if dtype == "bfloat16" else mx.float32), name
        want = bf16_round(want) if dtype == "bfloat16" else want
        np.testing.assert_array_equal(np.array(got.astype(mx.float32)), want, err_msg=name)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "rms_norm_eps", "rope_theta", "tie_word_embeddings"):
        assert config[key] == CONFIG[key], key
    assert config["head_dim"] == 16 and config["rope_scaling"] is None and config["torch_dtype"] == dtype
    ModelArgs.from_dict(config)  # a valid config for the model


@pytest.mark.parametrize("scaled", [False, True])
def test_logits_equal_an_interleaved_rope_forward(tmp_path, hf_weights, scaled):
    """HF forward (rotate-half RoPE) on the converted weights == Meta's forward (interleaved RoPE) on the
    Meta-layout weights: the q/k permutation is exactly the change of RoPE pairing."""
    params = PARAMS | ({"use_scaled_rope": True, "rope_theta": 500000.0} if scaled else {})
    d = write_meta_checkpoint(tmp_path / "meta", hf_weights, params=params, shards=2)
    config, weights = meta_to_hf(d)
    if scaled:
        assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        inv_freq = R.llama3_inv_freq(16, 500000.0, 8.0, 1.0, 4.0, 8192)
        assert not np.allclose(inv_freq, R.default_inv_freq(16, 500000.0))  # the scaling changes something
    else:
        inv_freq = R.default_inv_freq(16, 10000.0)
    meta = {name: w for name, (w, _) in meta_names(hf_weights, CONFIG).items()}

    hf_logits = R.llama_forward(to_numpy(weights), config, TOKENS)
    meta_logits = meta_forward(meta, params, TOKENS, inv_freq)
    np.testing.assert_allclose(hf_logits, meta_logits, rtol=1e-9, atol=1e-9)

    # Control: without the permutation (Meta q/k rows under HF names), the logits are different.
    unpermuted = dict(to_numpy(weights))
    for i in range(CONFIG["num_hidden_layers"]):
        unpermuted[f"model.layers.{i}.self_attn.q_proj.weight"] = meta[f"layers.{i}.attention.wq.weight"]
        unpermuted[f"model.layers.{i}.self_attn.k_proj.weight"] = meta[f"layers.{i}.attention.wk.weight"]
    assert R.rel_l2(R.llama_forward(unpermuted, config, TOKENS), meta_logits) > 1e-3


def tiny_sentencepiece() -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4), model_writer=model, model_type="bpe", vocab_size=120,
        hard_vocab_limit=False, byte_fallback=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return model.getvalue()


def test_config_details(tmp_path, hf_weights):
    params = PARAMS | {"max_seq_len": 512, "rope_theta": 20000.0, "norm_eps": 1e-6}
    d = write_meta_checkpoint(tmp_path / "meta", hf_weights, params=params, shards=2,
                              extra={"rope.freqs": np.ones(8, np.float32)})  # Llama 1's buffer: not a weight
    (d / "tokenizer.model").write_bytes(tiny_sentencepiece())
    config = meta_config(d)
    assert config["vocab_size"] == 320  # from the embedding, as params.json says -1
    assert config["rope_theta"] == 20000.0 and config["rms_norm_eps"] == 1e-6
    assert config["max_position_embeddings"] == 512
    assert config["bos_token_id"] == 1 and config["eos_token_id"] == 2  # from the SentencePiece model
    assert config["tie_word_embeddings"] is False
    assert "rope.freqs" not in meta_to_hf(d)[1]
    assert ffn_hidden_size(4096, 256) == 11008  # Llama 2 7B
    assert ffn_hidden_size(4096, 1024, 1.3) == 14336  # Llama 3 8B
    assert ffn_hidden_size(8192, 4096, 1.3) == 28672  # Llama 2/3 70B


def test_not_meta(tmp_path, hf_weights):
    d = write_meta_checkpoint(tmp_path / "meta", hf_weights, shards=1)
    (d / "config.json").write_text("{}")
    assert not is_meta_checkpoint(d)  # a Hugging Face config.json wins
    assert not is_meta_checkpoint(tmp_path / "nothing")


def _edit(d: Path, rank: int, change):
    """Rewrite consolidated.<rank>.pth with change(tensors) applied (tensors as float32 numpy)."""
    from mlx_llama.torch_pickle import load_torch_file

    path = d / f"consolidated.{rank:02d}.pth"
    tensors = {k: np.array(v.astype(mx.float32)) for k, v in load_torch_file(path).items()}
    change(tensors)
    write_torch_file(path, tensors)


def _broken_cases():
    def ffn(d):
        (d / "params.json").write_text(json.dumps(PARAMS | {"multiple_of": 256}))
        return "an FFN size of 256, but layers.0.feed_forward.w1.weight has 96 rows"

    def vocab(d):
        (d / "params.json").write_text(json.dumps(PARAMS | {"vocab_size": 32000}))
        return "vocab_size = 32000, but tok_embeddings.weight has 320 rows"

    def gap(d):
        (d / "consolidated.01.pth").rename(d / "consolidated.02.pth")
        return "consolidated.01.pth is missing"

    def norm_differs(d):
        _edit(d, 1, lambda t: t["layers.1.ffn_norm.weight"].__setitem__(0, 5.0))
        return "consolidated.01.pth: layers.1.ffn_norm.weight differs"

    def unknown(d):
        _edit(d, 0, lambda t: t.__setitem__("layers.0.attention.wz.weight", np.ones(3, np.float32)))
        return "unknown tensors: layers.0.attention.wz.weight"

    def missing(d):
        for r in (0, 1):
            _edit(d, r, lambda t: t.pop("layers.1.feed_forward.w3.weight"))
        return "missing tensor 'layers.1.feed_forward.w3.weight'"

    def disagree(d):
        _edit(d, 1, lambda t: t.pop("layers.1.feed_forward.w3.weight"))
        return "'layers.1.feed_forward.w3.weight' is missing (the shards disagree)"

    def params_json(d):
        (d / "params.json").write_text("{dim: 64")
        return "params.json: cannot read JSON"

    def params_type(d):
        (d / "params.json").write_text(json.dumps(PARAMS | {"n_heads": "4"}))
        return "params.json: n_heads = '4' must be a positive integer"

    def no_shards(d):
        for r in (0, 1):
            (d / f"consolidated.{r:02d}.pth").unlink()
        return "no consolidated.NN.pth"

    def hostile(d):
        import pickle

        class Evil:
            def __reduce__(self):
                return (print, ("pwned",))

        write_torch_zip(d / "consolidated.01.pth", pickle.dumps({"x": Evil()}, protocol=2), {})
        return "refused to load the global"

    return [ffn, vocab, gap, norm_differs, unknown, missing, disagree, params_json, params_type, no_shards, hostile]


@pytest.mark.parametrize("case", _broken_cases(), ids=lambda c: c.__name__)
def test_broken_checkpoints_one_line(tmp_path, hf_weights, case):
    d = write_meta_checkpoint(tmp_path / "meta", hf_weights, shards=2)
    words = case(d)
    with pytest.raises(MlxLlamaError) as e:
        meta_to_hf(d)
    msg = str(e.value)
    assert "\n" not in msg and words in msg, msg


def _convert_hooked() -> bool:
    import importlib

    # (the package's __init__ rebinds the name mlx_llama.convert to the function)
    return "is_meta_checkpoint" in vars(importlib.import_module("mlx_llama.convert"))


@pytest.mark.skipif(not _convert_hooked(), reason="convert.py does not read Meta checkpoints yet")
def test_convert_meta_directory(tmp_path, hf_weights):
    from mlx_llama import convert, load

    d = write_meta_checkpoint(tmp_path / "meta", hf_weights, shards=2, dtype="bfloat16")
    (d / "tokenizer.model").write_bytes(tiny_sentencepiece())
    out = convert(str(d), str(tmp_path / "out"), progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 96 and config["bos_token_id"] == 1
    saved = mx.load(str(out / "model.safetensors"))
    for name, want in hf_weights.items():
        np.testing.assert_array_equal(np.array(saved[name].astype(mx.float32)), bf16_round(want), err_msg=name)
    model, tokenizer = load(str(out))
    assert (out / "tokenizer.model").exists() and tokenizer.encode("Hello world")
