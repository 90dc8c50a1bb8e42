"""The engine loads models on llama.cpp kernels whose result for one sequence does not depend on how many
sequences decode with it: the ground the batched engine's equal answers stand on. The 0.5B model's Q4_K and Q6_K
matrices take llama.cpp's batch-dependent paths unless the engine keeps them off; the 135M's Q8_0 rewrite goes
through llamafile's GEMM, which must stay batch-invariant for it."""

import importlib.util

import numpy as np
import pytest

from optimize.config import ModelConfig
from optimize.llm.engine import load_llama
from optimize.llm.models import QWEN, describe
from optimize.llm.raw import RawContext

pytestmark = pytest.mark.model
QWEN_SPEC = pytest.param("qwen2.5-coder-0.5b", marks=pytest.mark.skipif(
    importlib.util.find_spec(QWEN.packages[0]) is None, reason="the chainopt[qwen] extra is not installed"))

WIDE = 8  # the tiled K-quant matmul starts at 8 rows, the repacked Q4_K GEMM at 4


@pytest.mark.parametrize("spec", [QWEN_SPEC, "smollm2-135m-q8_0"])
def test_a_sequence_gets_the_same_logits_beside_others_as_alone(spec):
    """8 prompts of one KV class decoded in one llama_decode against each decoded alone (a copy of its stream),
    for 3 steps. Fails on the 0.5B if load_llama leaves llama.cpp's tiled K-quant matmul or its repacked weights
    on (measured 16 wide: 6 of 64 logit rows equal, up to 0.57 apart), on either if llama.cpp's kernel for its matrices
    comes to depend on the batch, or if the batch layout mixes the sequences."""
    import llama_cpp.llama_cpp as lib

    stock_params = lib.llama_model_default_params
    llama = load_llama(describe(spec), ModelConfig(spec=spec), n_ctx=256)
    assert lib.llama_model_default_params is stock_params  # the patch is for the engine's load only
    n_vocab = llama.n_vocab()
    prompts = [llama.tokenize(f"<|im_start|>user\nWhat is {7 * i + 3} plus {11 * i}? Think it through."
                              f"<|im_end|>\n<|im_start|>assistant\n".encode(), add_bos=False, special=True)
               for i in range(WIDE)]
    with RawContext(llama, n_ctx=2 * WIDE * 256, n_batch=256, n_seq_max=2 * WIDE, unified=False) as ctx:
        def logits(row: int) -> np.ndarray:
            return np.ctypeslib.as_array(ctx.lc.llama_get_logits_ith(ctx.ctx, row), shape=(n_vocab,)).copy()

        following = []
        for seq, prompt in enumerate(prompts):
            ctx.decode([(t, i, seq, i == len(prompt) - 1) for i, t in enumerate(prompt)])
            following.append(int(np.argmax(logits(-1))))
            ctx.copy(seq, seq + WIDE, len(prompt))
        for step in range(3):
            alone = []
            for seq, prompt in enumerate(prompts):
                ctx.decode([(following[seq], len(prompt) + step, seq + WIDE, True)])
                alone.append(logits(0))
            ctx.decode([(following[seq], len(prompt) + step, seq, True) for seq, prompt in enumerate(prompts)])
            for row, solo in enumerate(alone):
                assert np.array_equal(logits(row), solo), f"step {step}, sequence {row}"
            following = [int(np.argmax(solo)) for solo in alone]
    llama.close()
