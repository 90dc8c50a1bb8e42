"""A batched, prefix-sharing llama.cpp backend: many sequences decoded together in one context.

Why: on a small CPU model, prefill dominates (a DSPy prompt is ~2,000 tokens, an answer ~15), and
one sequence at a time leaves the matmuls starved. Here one worker thread owns a llama.cpp context
with a unified KV cache and `parallel` sequence slots. Each step it packs into one `llama_batch`
a next token for every decoding sequence plus prompt chunks of sequences still in prefill; new
requests join between steps (continuous batching).

Prefix sharing: a computed prompt stays in the KV cache under a reserved sequence id (an LRU of
"prefixes"). A new request copies the longest token-exact match (`llama_memory_seq_cp`, which in
a unified cache only tags the same cells, no data moves) and computes only the rest. A request
whose prompt shares more with a prompt still being computed waits for it instead of computing the
same tokens twice. KV cells are reference-counted along these copies so the LRU can evict before
the cache is full.

Sampling mirrors `llama_cpp.Llama` (the SequentialBackend reference): at temperature 0, the
greedy token under the grammar; it is found by checking the unconstrained argmax against the
grammar first and scanning the whole 49k vocabulary only when that token is rejected, which gives
the same token as grammar-then-greedy, since the argmax of the allowed tokens is the global argmax
whenever the latter is allowed.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from optimize.engine import Completion, Generation
from optimize.errors import ModelError

WAIT_FOR_SHARED = 64  # wait for a prompt in flight when it will share this many more tokens than the cache


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


@dataclass(eq=False)
class _Cells:
    """KV cells a holder (a slot or a cached prefix) brought in, alive while anything copied from them lives."""

    own: int
    base: "_Cells | None" = None
    refs: int = 1


@dataclass(eq=False)
class _Request:
    job: Generation
    tokens: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    result: Completion | None = None
    error: BaseException | None = None


@dataclass(eq=False)
class _Prefix:
    seq: int
    tokens: np.ndarray
    cells: _Cells


@dataclass(eq=False)
class _Slot:
    seq: int
    request: _Request
    reused: int
    cells: _Cells
    sampler: "_Sampler"
    n_past: int  # tokens of this sequence already in the KV cache
    order: int  # admission order: prompts are computed first come, first served
    output: list[int] = field(default_factory=list)
    logits_row: int = -1  # row of this step's batch whose logits this slot samples from

    @property
    def prompt(self) -> np.ndarray:
        return self.request.tokens

    @property
    def in_prefill(self) -> bool:
        return self.n_past < len(self.prompt)

    def kv_tokens(self) -> np.ndarray:
        """The tokens whose KV this sequence holds: what another request may copy."""
        if self.in_prefill:
            return self.prompt[: self.n_past]
        return np.concatenate([self.prompt, np.asarray(self.output[: self.n_past - len(self.prompt)], np.int32)])


class _Sampler:
    """One sequence's sampler, built like llama_cpp.Llama._init_sampler so answers match the reference."""

    def __init__(self, backend: "BatchedBackend", job: Generation):
        import llama_cpp as lc

        self.lc, self.backend, self.job = lc, backend, job
        self.grammar = None
        if job.grammar:
            self.grammar = lc.llama_sampler_init_grammar(backend.vocab, job.grammar.encode("utf-8"), b"root")
            if not self.grammar:
                raise ModelError("llama.cpp rejected the response grammar")
        self.chain = None
        if job.temperature > 0:
            chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
            if self.grammar:
                lc.llama_sampler_chain_add(chain, self.grammar)  # the chain owns it from here
                self.grammar = None
            for part in (lc.llama_sampler_init_top_k(job.top_k), lc.llama_sampler_init_typical(1.0, 1),
                         lc.llama_sampler_init_top_p(job.top_p, 1), lc.llama_sampler_init_min_p(0.0, 1),
                         lc.llama_sampler_init_temp(job.temperature), lc.llama_sampler_init_dist(job.seed)):
                lc.llama_sampler_chain_add(chain, part)
            self.chain = chain

    def sample(self, row: int) -> int:
        lc, backend = self.lc, self.backend
        if self.chain is not None:
            return lc.llama_sampler_sample(self.chain, backend.ctx, row)
        logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(backend.ctx, row), shape=(backend.n_vocab,))
        token = int(np.argmax(logits))
        if self.grammar is not None:
            if not backend.grammar_allows(self.grammar, token, logits):
                token = backend.grammar_argmax(self.grammar, logits)
            lc.llama_sampler_accept(self.grammar, token)
        return token

    def free(self) -> None:
        for sampler in (self.chain, self.grammar):
            if sampler:
                self.lc.llama_sampler_free(sampler)
        self.chain = self.grammar = None


class BatchedBackend:
    """Continuous batching with prefix sharing over one llama.cpp context; thread-safe `generate`."""

    def __init__(self, llama, parallel: int = 16, n_cells: int | None = None, n_batch: int = 512,
                 max_prefixes: int = 32, n_threads: int | None = None, flash_attn: bool = False):
        import llama_cpp as lc

        self.lc, self.llama = lc, llama
        self.parallel, self.max_prefixes = parallel, max_prefixes
        self.n_cells = n_cells or max(16384, llama.n_ctx())
        self.n_batch = n_batch
        params = lc.llama_context_default_params()
        params.n_ctx = self.n_cells
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = parallel + max_prefixes
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = n_threads or getattr(llama, "n_threads", None) or os.cpu_count()
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        self.ctx = lc.llama_init_from_model(llama._model.model, params)
        if not self.ctx:
            raise ModelError(f"llama.cpp could not create a context of {self.n_cells} KV cells "
                             f"for {parallel} + {max_prefixes} sequences; lower parallel or n_cells")
        self.mem = lc.llama_get_memory(self.ctx)
        self.vocab = llama._model.vocab
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.batch = lc.llama_batch_init(n_batch, 0, 1)
        # Candidates for a full grammar scan, and a one-token array for the fast check; worker-thread only.
        self._all = (lc.llama_token_data * self.n_vocab)()
        self._all_view = np.ctypeslib.as_array(self._all)
        self._all_view["id"] = np.arange(self.n_vocab, dtype=np.int32)
        self._one = (lc.llama_token_data * 1)()

        self._pending: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._slots: dict[int, _Slot] = {}
        self._free_slots = list(range(parallel))
        self._prefixes: OrderedDict[int, _Prefix] = OrderedDict()  # LRU first
        self._free_prefix_seqs = list(range(parallel, parallel + max_prefixes))
        self._cells_used = 0
        self._admitted = 0
        self._worker = threading.Thread(target=self._run, name="chainopt-batched-llama", daemon=True)
        self._worker.start()

    # -- public ------------------------------------------------------------------------------------
    def generate(self, job: Generation) -> Completion:
        if not job.tokens:
            raise ModelError("empty prompt")
        if len(job.tokens) + job.max_tokens > self.n_cells:
            raise ModelError(f"prompt of {len(job.tokens)} tokens + max_tokens {job.max_tokens} exceeds the "
                             f"batched engine's {self.n_cells} KV cells; raise n_cells")
        request = _Request(job=job, tokens=np.asarray(job.tokens, dtype=np.int32))
        with self._cond:
            if self._closed:
                raise ModelError("the batched engine is closed")
            self._pending.append(request)
            self._cond.notify()
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify()
        self._worker.join()
        lc = self.lc
        lc.llama_batch_free(self.batch)
        lc.llama_free(self.ctx)
        self.ctx = None

    @property
    def cached_prefixes(self) -> list[int]:
        """Token counts of the prefixes held in the cache, oldest first (for tests and diagnostics)."""
        with self._cond:
            return [len(p.tokens) for p in self._prefixes.values()]

    # -- grammar helpers (worker thread) -------------------------------------------------------------
    def grammar_allows(self, grammar, token: int, logits: np.ndarray) -> bool:
        one = self._one
        one[0].id, one[0].logit, one[0].p = token, float(logits[token]), 0.0
        arr = self.lc.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
        self.lc.llama_sampler_apply(grammar, ctypes.byref(arr))
        return one[0].logit != -np.inf

    def grammar_argmax(self, grammar, logits: np.ndarray) -> int:
        view = self._all_view
        view["id"] = np.arange(self.n_vocab, dtype=np.int32)
        view["logit"] = logits
        arr = self.lc.llama_token_data_array(data=self._all, size=self.n_vocab, selected=-1, sorted=False)
        self.lc.llama_sampler_apply(grammar, ctypes.byref(arr))
        masked = view["logit"][: arr.size]
        best = int(np.argmax(masked))
        if masked[best] == -np.inf:
            raise ModelError("the response grammar allows no next token")
        return int(view["id"][best])

    # -- worker --------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._pending and not self._slots:
                    self._cond.wait()
                if self._closed:
                    break
                self._admit()
            if self._slots:
                self._step()
        error = ModelError("the batched engine was closed")
        for slot in list(self._slots.values()):
            self._finish(slot, error=error)
        with self._cond:
            pending, self._pending = list(self._pending), deque()
        for request in pending:
            request.error = error
            request.done.set()
        for prefix in list(self._prefixes.values()):
            self._drop_prefix(prefix)

    def _admit(self) -> None:
        """Move waiting requests into free slots (called with the lock held)."""
        waiting: deque[_Request] = deque()
        while self._pending and self._free_slots:
            request = self._pending.popleft()
            source, reuse = self._best_source(request.tokens)
            in_flight = max((_lcp(s.prompt, request.tokens) for s in self._slots.values() if s.in_prefill), default=0)
            if in_flight >= reuse + WAIT_FOR_SHARED:
                waiting.append(request)
                continue
            need = len(request.tokens) - reuse + request.job.max_tokens
            if not self._make_room(need, keep=source) and self._slots:
                waiting.append(request)  # wait for running sequences to free their cells
                continue
            try:
                self._start(request, source, reuse)
            except Exception as exc:  # noqa: BLE001 - one bad request (e.g. its grammar) fails only itself
                request.error = exc
                request.done.set()
        self._pending.extendleft(reversed(waiting))

    def _best_source(self, tokens: np.ndarray) -> tuple[_Prefix | _Slot | None, int]:
        """The cached prefix or running sequence that shares the most leading tokens with `tokens`."""
        best, best_len = None, 0
        for holder in [*self._prefixes.values(), *self._slots.values()]:
            held = holder.tokens if isinstance(holder, _Prefix) else holder.kv_tokens()
            n = _lcp(held, tokens)
            if n > best_len:
                best, best_len = holder, n
        # The last prompt token is always computed: its logits give the first output token.
        return best, min(best_len, len(tokens) - 1)

    def _start(self, request: _Request, source: _Prefix | _Slot | None, reuse: int) -> None:
        sampler = _Sampler(self, request.job)
        seq = self._free_slots.pop()
        lc = self.lc
        lc.llama_memory_seq_rm(self.mem, seq, -1, -1)
        base = None
        if source is not None and reuse > 0:
            lc.llama_memory_seq_cp(self.mem, source.seq, seq, 0, reuse)
            base = source.cells
            base.refs += 1
            if isinstance(source, _Prefix):
                self._prefixes.move_to_end(source.seq)
        else:
            reuse = 0
        cells = _Cells(own=len(request.tokens) - reuse + request.job.max_tokens, base=base)
        self._cells_used += cells.own
        self._admitted += 1
        self._slots[seq] = _Slot(seq=seq, request=request, reused=reuse, cells=cells, sampler=sampler,
                                 n_past=reuse, order=self._admitted)

    def _make_room(self, need: int, keep: object = None) -> bool:
        """Evict least recently used prefixes until `need` more cells fit; False if they cannot."""
        for prefix in list(self._prefixes.values()):
            if self._cells_used + need <= self.n_cells:
                break
            if prefix is not keep:
                self._drop_prefix(prefix)
        return self._cells_used + need <= self.n_cells

    def _release(self, cells: _Cells) -> None:
        node: _Cells | None = cells
        while node is not None:
            node.refs -= 1
            if node.refs > 0:
                return
            self._cells_used -= node.own
            node = node.base

    def _drop_prefix(self, prefix: _Prefix) -> None:
        self.lc.llama_memory_seq_rm(self.mem, prefix.seq, -1, -1)
        del self._prefixes[prefix.seq]
        self._free_prefix_seqs.append(prefix.seq)
        self._release(prefix.cells)

    def _keep_prefix(self, slot: _Slot) -> None:
        """Remember a freshly computed prompt so later requests can start from it."""
        tokens = slot.prompt
        for prefix in self._prefixes.values():
            if len(prefix.tokens) == len(tokens) and _lcp(prefix.tokens, tokens) == len(tokens):
                self._prefixes.move_to_end(prefix.seq)
                return
        if not self._free_prefix_seqs:
            if not self._prefixes:
                return
            self._drop_prefix(next(iter(self._prefixes.values())))
        seq = self._free_prefix_seqs.pop()
        self.lc.llama_memory_seq_cp(self.mem, slot.seq, seq, 0, len(tokens))
        slot.cells.refs += 1
        self._prefixes[seq] = _Prefix(seq=seq, tokens=tokens, cells=_Cells(own=0, base=slot.cells))

    def _step(self) -> None:
        """One llama_decode over every active sequence: a token each for decoders, prompt chunks for the rest."""
        n = 0
        work: list[tuple[_Slot, int]] = []  # (slot, tokens it put in this batch)
        for slot in self._slots.values():
            if not slot.in_prefill:
                self._put(n, slot.output[-1], slot.n_past, slot.seq, True)
                slot.logits_row, n = n, n + 1
                work.append((slot, 1))
        for slot in sorted((s for s in self._slots.values() if s.in_prefill), key=lambda s: s.order):
            take = min(self.n_batch - n, len(slot.prompt) - slot.n_past)
            if take <= 0:
                break
            for pos in range(slot.n_past, slot.n_past + take):
                last = pos == len(slot.prompt) - 1
                self._put(n, int(slot.prompt[pos]), pos, slot.seq, last)
                if last:
                    slot.logits_row = n
                n += 1
            work.append((slot, take))
        self.batch.n_tokens = n
        status = self.lc.llama_decode(self.ctx, self.batch)
        if status != 0:
            self._decode_failed(status, [slot for slot, _ in work])
            return
        for slot, taken in work:
            slot.n_past += taken
            if slot.in_prefill:
                continue
            try:
                if not slot.output:
                    with self._cond:
                        self._keep_prefix(slot)
                self._sample(slot)
            except Exception as exc:  # noqa: BLE001 - a failure in one sequence fails only its call
                self._finish(slot, error=exc)

    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch = self.batch
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, logits

    def _sample(self, slot: _Slot) -> None:
        token = slot.sampler.sample(slot.logits_row)
        if self.lc.llama_vocab_is_eog(self.vocab, token):
            self._finish(slot, reason="stop")
            return
        slot.output.append(token)
        if len(slot.output) >= slot.request.job.max_tokens:
            self._finish(slot, reason="length")

    def _decode_failed(self, status: int, slots: list[_Slot]) -> None:
        """No KV room (status 1): evict prefixes, else send the newest sequence back to the queue."""
        with self._cond:
            if status == 1 and self._prefixes:
                self._drop_prefix(next(iter(self._prefixes.values())))
                return
            if status == 1 and len(self._slots) > 1:
                newest = max(self._slots.values(), key=lambda s: s.order)
                self._free(newest)
                self._pending.appendleft(newest.request)
                return
        error = ModelError(f"llama_decode failed with status {status}" +
                           (" (no room in the KV cache; raise n_cells)" if status == 1 else ""))
        for slot in slots:
            self._finish(slot, error=error)

    def _free(self, slot: _Slot) -> None:
        self.lc.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
        slot.sampler.free()
        del self._slots[slot.seq]
        self._free_slots.append(slot.seq)
        # What stays alive for prefixes copied from this sequence is its prompt, not its reserve or output.
        self._cells_used -= slot.cells.own - (len(slot.prompt) - slot.reused)
        slot.cells.own = len(slot.prompt) - slot.reused
        self._release(slot.cells)

    def _finish(self, slot: _Slot, reason: str = "stop", error: BaseException | None = None) -> None:
        request = slot.request
        with self._cond:
            self._free(slot)
        if error is None:
            job = request.job
            text = self.llama.detokenize(slot.output, prev_tokens=list(job.tokens)).decode("utf-8", errors="ignore")
            request.result = Completion(text=text, n_prompt=len(job.tokens), n_reused=slot.reused,
                                        n_output=len(slot.output), finish_reason=reason)  # type: ignore[arg-type]
        request.error = error
        request.done.set()
