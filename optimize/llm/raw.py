"""A bare llama.cpp context on a loaded model's weights, with its KV memory and one reusable batch.

The batched backend decodes with it, and the bench measures raw llama.cpp rates with it: one setup
(threads, flash attention, batch layout) for both, so the bench's rates are those of the engine's own
layout and not of a look-alike.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Self

from optimize.errors import ModelError

Item = tuple[int, int, int, bool]  # token, position, sequence id, whether its logits are wanted


class RawContext:
    """A llama.cpp context of `n_ctx` KV cells for `n_seq_max` sequences, in one unified KV cache or one
    stream per sequence (each then holds n_ctx / n_seq_max cells), decoding up to `n_batch` tokens at once."""

    def __init__(self, llama, *, n_ctx: int, n_batch: int, n_seq_max: int, unified: bool,
                 n_threads: int | None = None, flash_attn: bool = False):
        import llama_cpp as lc

        self.lc = lc
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.kv_unified = unified
        params.n_threads = params.n_threads_batch = (n_threads or getattr(llama, "n_threads", None)
                                                     or os.cpu_count() or 1)
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        self.ctx = lc.llama_init_from_model(llama._model.model, params)
        if not self.ctx:
            raise ModelError(f"llama.cpp could not create a context of {n_ctx} KV cells for {n_seq_max} "
                             "sequences; lower their number or their length")
        self.memory = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(n_batch, 0, 1)

    def decode(self, items: Sequence[Item]) -> None:
        """Compute `items` in one llama_decode, in this order (llama.cpp splits a batch over several KV
        streams into ubatches of consecutive sequence ids); row i of the logits is the i-th item's."""
        batch = self.batch
        for i, (token, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        batch.n_tokens = len(items)
        status = self.lc.llama_decode(self.ctx, batch)
        if status != 0:
            raise ModelError(f"llama_decode failed with status {status}")

    def copy(self, src: int, dst: int, n: int) -> None:
        """Make sequence `dst` hold the first `n` tokens of `src`: llama.cpp copies only whole streams across
        streams (applied at the next decode, in order), so copy all and trim."""
        self.lc.llama_memory_seq_cp(self.memory, src, dst, -1, -1)
        self.drop(dst, n)

    def swap(self, a: int, b: int, via: int) -> None:
        """Exchange the whole streams of sequences `a` and `b`, through the stream of `via` (left holding a's
        old tokens). The copies are applied at the next decode, in the order made, so the data follows."""
        for src, dst in ((a, via), (b, a), (via, b)):
            self.lc.llama_memory_seq_cp(self.memory, src, dst, -1, -1)

    def drop(self, seq: int, start: int = 0) -> None:
        """Forget sequence `seq`'s tokens from position `start` on (all of them by default)."""
        self.lc.llama_memory_seq_rm(self.memory, seq, start, -1)

    def close(self) -> None:
        if self.ctx:
            self.lc.llama_batch_free(self.batch)
            self.lc.llama_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
