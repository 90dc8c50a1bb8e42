"""A batched, prefix-sharing llama.cpp backend: many sequences decoded together in one context.

Why: on a small CPU model, prefill dominates (a DSPy prompt is hundreds to thousands of tokens, an
answer ~15), and one sequence at a time leaves the matmuls starved. Here one worker thread owns a
llama.cpp context with `parallel` decoding slots. Each step it decodes a next token for every decoding
sequence, together (one llama_decode per KV class, below), and computes prompt chunks of sequences
still in prefill; new requests join between steps (continuous batching).

Exactness: the KV cache is NOT unified (`kv_unified=False`): every sequence id is its own KV stream
of `cells_per_seq` cells, so a sequence attends over its own cells only (in a unified cache, other
sequences' cells sit between its own and change the order of the attention sums). With flash
attention off (as both engines run), llama.cpp's CPU attention for a ubatch runs over the KV length of
its longest stream padded to 256 cells (`KV_PAD`), and that length changes the last bits of the sums:
a short sequence decoded beside a long one got logits up to ~0.9 away from its solo ones, enough to
flip near-ties. So each step decodes the sequences of one padded length ("KV class") per llama_decode,
over exactly the length the sequential engine uses for the same token, and prompt chunks go in their
own llama_decode (a chunk packed with other sequences' tokens is split into differently shaped
ubatches). llama.cpp puts only consecutive stream ids in one ubatch: a class whose sequences sit at
scattered ids is decoded as several narrow ubatches, and on 2 cores eight one-token ubatches take twice
the time of one ubatch of eight (the 0.5B: 21.5 ms for 1 token, 88 ms for 8). So a new sequence takes a
free slot beside decoding sequences of its class (`_destination`), and before each step `_regroup` swaps
whole streams (through one spare stream) until every class sits at consecutive ids; a swap moves a stream's
cells bit for bit, so what each token attends over is unchanged. Measured: sequences of equal length
decoded together gave bit-for-bit their solo logits; replayed through both engines, the batched
answers equal the sequential ones on 200/200 Banking77 prompts and 89/89 GSM8K chain calls
(`chainopt bench` reports the rate on every run). A draft verified in one multi-token ubatch would
not keep answers equal (a multi-token row differs from a one-token decode: 14/200 Banking77 answers
changed when tried), so there is no speculative decoding.

Prefix sharing: a stream keeps its tokens after its request ends, and a few extra streams hold
cached prompts (an LRU of "prefixes"). A new request starts from the stream that shares the longest
token-exact prefix with it: in place when that is a free slot, else by copying the whole source
stream (`llama_memory_seq_cp(src, dst, -1, -1)`: llama.cpp copies only full streams across streams)
and trimming it beyond the match (`llama_memory_seq_rm(dst, n, -1)`); only the rest is computed.
A request whose prompt shares more with a prompt still being computed waits for it instead of
computing the same tokens twice.

Memory is fixed at start: (parallel + max_prefixes + 1 spare) streams x cells_per_seq cells, and llama.cpp gives
every stream the same number of cells, so a stream sized to the longest call the engine accepts (n_ctx)
would make every slot pay for it. `cells_per_seq` is therefore the engine's `stream_cells` (what the
usual call needs; default 1024), and a call longer than that goes to the backend `long` makes on first
need (the engine's: the sequential one on an n_ctx context), one at a time: it gives the reference
answer by construction, so answers stay equal to the sequential engine's, and a run whose calls all
fit never allocates it. The number of slots is cut to keep the KV cache within `kv_budget` bytes
(`kv_cache_mb` in the config).

Tokens are chosen by `optimize.llm.sampling`, as in the SequentialBackend: at temperature 0 the
grammar-then-greedy token without a whole-vocabulary grammar scan; above it, a seeded draw from the
grammar-masked distribution through the same code in both backends.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from dspy import lm15

from optimize.errors import ModelError
from optimize.llm.confidence import ChoiceTracker, vocabulary
from optimize.llm.raw import Item, RawContext
from optimize.llm.sampling import GrammarCheck, TokenSampler
from optimize.llm.types import Backend, Completion, Generation, settle_choice

WAIT_FOR_SHARED = 64  # wait for a prompt in flight when it will share this many more tokens than the cache
EMPTY = np.zeros(0, dtype=np.int32)
KV_PAD = 256  # llama.cpp pads the KV length a ubatch attends over to a multiple of this (llama_kv_cache::get_n_kv)


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def kv_bytes_per_cell(model) -> int:
    """Bytes one token's K and V take across all layers in f16 (llama.cpp's default cache type)."""
    import llama_cpp as lc

    head_dim = lc.llama_model_n_embd(model) // lc.llama_model_n_head(model)
    return lc.llama_model_n_layer(model) * lc.llama_model_n_head_kv(model) * head_dim * 2 * 2


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


@dataclass(eq=False)
class _Slot:
    seq: int
    request: _Request
    reused: int
    sampler: TokenSampler
    n_past: int  # tokens of this sequence already in the KV cache
    order: int  # admission order: prompts are computed first come, first served
    output: list[int] = field(default_factory=list)
    logits_row: int = -1  # row of this step's batch whose logits this slot samples from
    tracker: ChoiceTracker | None = None  # the choice field's deciding steps (optimize.llm.confidence)

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


class BatchedBackend:
    """Continuous batching with prefix sharing over one llama.cpp context; thread-safe `generate`."""

    def __init__(self, llama, parallel: int = 16, cells_per_seq: int | None = None, n_batch: int = 512,
                 max_prefixes: int = 2, n_threads: int | None = None, flash_attn: bool = False,
                 kv_budget: int | None = None, long: Callable[[], Backend] | None = None):
        import llama_cpp as lc

        self.lc, self.llama = lc, llama
        self._make_long, self._long, self._long_lock = long, None, threading.Lock()
        self.cells_per_seq = cells_per_seq or llama.n_ctx()
        self.bytes_per_cell = kv_bytes_per_cell(llama._model.model)
        if kv_budget is not None:
            per_stream = self.cells_per_seq * self.bytes_per_cell
            fit = kv_budget // per_stream - max_prefixes - 1
            if fit < 1:
                raise ModelError(f"a KV cache of {kv_budget / 1e6:.0f} MB holds no decoding slot: one slot, "
                                 f"{max_prefixes} prefix streams and a spare of {self.cells_per_seq} cells need "
                                 f"{(2 + max_prefixes) * per_stream / 1e6:.0f} MB; raise kv_cache_mb or lower n_ctx")
            parallel = min(parallel, fit)
        self.parallel, self.max_prefixes = parallel, max_prefixes
        self.n_batch = n_batch
        n_streams = parallel + max_prefixes + 1
        self.spare = n_streams - 1  # the stream a swap passes through (`_regroup`)
        self.context = RawContext(llama, n_ctx=n_streams * self.cells_per_seq, n_batch=n_batch, n_seq_max=n_streams,
                                  unified=False, n_threads=n_threads, flash_attn=flash_attn)
        cells = lc.llama_n_ctx_seq(self.context.ctx)
        if cells < self.cells_per_seq:
            self.context.close()
            raise ModelError(f"llama.cpp gave {cells} KV cells per sequence, not {self.cells_per_seq}")
        self.kv_bytes = n_streams * self.cells_per_seq * self.bytes_per_cell
        self.vocab = llama._model.vocab
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.check = GrammarCheck(self.vocab)  # the samplers' grammar scratch: worker thread only

        self._pending: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._slots: dict[int, _Slot] = {}
        # Free slots and the tokens their streams still hold, least recently freed first.
        self._free_slots: OrderedDict[int, np.ndarray] = OrderedDict((seq, EMPTY) for seq in range(parallel))
        self._prefixes: OrderedDict[int, _Prefix] = OrderedDict()  # LRU first
        self._free_prefix_seqs = list(range(parallel, self.spare))
        self._admitted = 0
        self.copies = 0  # full-stream copies made (diagnostics)
        self.swaps = 0  # streams swapped to regroup a class at consecutive ids (diagnostics)
        self.long_calls = 0  # calls longer than a stream, served by `long` (diagnostics)
        self.decoded: Counter[int] = Counter()  # tokens decoded per KV class (the bench's exact-layout floor)
        self._worker = threading.Thread(target=self._run, name="chainopt-batched-llama", daemon=True)
        self._worker.start()

    # -- public ------------------------------------------------------------------------------------
    def generate(self, job: Generation) -> Completion:
        if not job.tokens:
            raise ModelError("empty prompt")
        if len(job.tokens) + job.max_tokens > self.cells_per_seq:
            if self._make_long is not None:
                return self._long_backend().generate(job)
            raise lm15.ContextLengthError(
                f"prompt of {len(job.tokens)} tokens + max_tokens {job.max_tokens} exceeds the batched "
                f"engine's {self.cells_per_seq} KV cells per sequence")
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
        self.context.close()
        with self._long_lock:
            if self._long is not None:
                self._long.close()

    def _long_backend(self) -> Backend:
        with self._long_lock:
            if self._closed:
                raise ModelError("the batched engine is closed")
            if self._long is None:
                self._long = self._make_long()
            self.long_calls += 1
            return self._long

    @property
    def cached_prefixes(self) -> list[int]:
        """Token counts of the prefixes held in the prefix streams, oldest first (for tests and diagnostics)."""
        with self._cond:
            return [len(p.tokens) for p in self._prefixes.values()]

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
            try:
                self._start(request, source, reuse)
            except Exception as exc:  # noqa: BLE001 - one bad request (e.g. its grammar) fails only itself
                request.error = exc
                request.done.set()
        self._pending.extendleft(reversed(waiting))

    def _best_source(self, tokens: np.ndarray) -> tuple[int | None, int]:
        """The stream (a free slot, a running sequence or a cached prefix) sharing the most leading tokens
        with `tokens`; a free slot wins ties, since it is used in place, without a copy."""
        best, best_len = None, 0
        held = [*self._free_slots.items(), *((s.seq, s.kv_tokens()) for s in self._slots.values()),
                *((p.seq, p.tokens) for p in self._prefixes.values())]
        for seq, kept in held:
            n = _lcp(kept, tokens)
            if n > best_len:
                best, best_len = seq, n
        # The last prompt token is always computed: its logits give the first output token.
        return best, min(best_len, len(tokens) - 1)

    def _start(self, request: _Request, source: int | None, reuse: int) -> None:
        sampler = TokenSampler(request.job, self.check)
        seq = self._destination(request.tokens, reuse)
        if reuse > 0 and _lcp(self._free_slots[seq], request.tokens) >= reuse:
            source = seq  # in place: keep what the stream holds up to the match
            del self._free_slots[seq]
            self.context.drop(seq, reuse)
        else:
            del self._free_slots[seq]
            self.context.drop(seq)
            if source is not None and reuse > 0:
                self._copy(source, seq, reuse)
            else:
                reuse = 0
        if source in self._prefixes:
            self._prefixes.move_to_end(source)
        self._admitted += 1
        choice = request.job.choice
        tracker = ChoiceTracker(vocabulary(self.llama), *choice) if choice is not None else None
        self._slots[seq] = _Slot(seq=seq, request=request, reused=reuse, sampler=sampler,
                                 n_past=reuse, order=self._admitted, tracker=tracker)

    def _destination(self, tokens: np.ndarray, reuse: int) -> int:
        """The free slot for a new sequence: beside decoding sequences of the KV class it will decode in, since
        llama.cpp puts only consecutive stream ids in one ubatch and we decode each class on its own; among
        equals, one that already holds the `reuse` shared tokens (no copy), then the lowest id."""
        kv_class = self._kv_class(len(tokens) + 1)

        def rank(seq: int) -> tuple[int, bool, int]:
            beside = sum(1 for other in (seq - 1, seq + 1) if (slot := self._slots.get(other)) is not None
                         and not slot.in_prefill and self._kv_class(slot.n_past + 1) == kv_class)
            return beside, _lcp(self._free_slots[seq], tokens) >= reuse, -seq

        return max(self._free_slots, key=rank)

    def _copy(self, src: int, dst: int, n: int) -> None:
        self.context.copy(src, dst, n)
        self.copies += 1

    def _keep_prefix(self, slot: _Slot) -> None:
        """Remember a freshly computed prompt in a prefix stream unless one already holds most of it."""
        tokens = slot.prompt
        for prefix in self._prefixes.values():
            if _lcp(prefix.tokens, tokens) + WAIT_FOR_SHARED >= len(tokens):
                self._prefixes.move_to_end(prefix.seq)
                return
        if not self._free_prefix_seqs:
            if not self._prefixes:
                return
            self._free_prefix_seqs.append(self._prefixes.popitem(last=False)[0])
        seq = self._free_prefix_seqs.pop()
        self._copy(slot.seq, seq, len(tokens))  # a whole-stream copy replaces what the stream held
        self._prefixes[seq] = _Prefix(seq=seq, tokens=tokens)

    def _kv_class(self, n_cells: int) -> int:
        """The KV length llama.cpp attends over for a ubatch whose longest stream uses `n_cells` cells."""
        return min(self.cells_per_seq, max(KV_PAD, -(-n_cells // KV_PAD) * KV_PAD))

    def _by_class(self) -> dict[int, list[_Slot]]:
        """The decoding sequences by the KV class their next token is computed in."""
        by_class: dict[int, list[_Slot]] = {}
        for slot in self._slots.values():
            if not slot.in_prefill:
                by_class.setdefault(self._kv_class(slot.n_past + 1), []).append(slot)
        return by_class

    def _regroup(self, by_class: dict[int, list[_Slot]]) -> None:
        """Swap streams until each KV class's decoding sequences sit at consecutive ids, so each class is one
        ubatch. Classes are placed largest first, each in the window of ids that already holds most of its
        sequences and no class placed before it; the sequences outside move in, swapping with whatever held
        those ids (another sequence, a free slot and its cached tokens). A class with no such window left
        stays split. A swap changes a slot's id, never its class, so `by_class` stays right."""
        if all(max(s.seq for s in slots) - min(s.seq for s in slots) == len(slots) - 1 for slots in by_class.values()):
            return
        placed: set[int] = set()
        # Largest first, ties by class: the same classes get the same order at every step, so two classes that
        # cannot both be whole do not take the ids back from each other step after step.
        for _, slots in sorted(by_class.items(), key=lambda item: (-len(item[1]), item[0])):
            n, members = len(slots), {s.seq for s in slots}  # read afresh: a swap renumbers the slots it moves
            windows = [range(a, a + n) for a in range(self.parallel - n + 1) if placed.isdisjoint(range(a, a + n))]
            if not windows:
                continue

            def fit(w: range) -> tuple[int, bool]:
                """Most of the class already there; then a window against an end or a placed class, which
                leaves the ids around it in one piece for the classes still to place."""
                return len(members.intersection(w)), w.start == 0 or w.stop == self.parallel or (
                    w.start - 1 in placed or w.stop in placed)

            window = max(windows, key=fit)  # the first of the best
            for outside, hole in zip(sorted(members.difference(window)), [i for i in window if i not in members]):
                self._swap(outside, hole)
            placed.update(window)

    def _swap(self, a: int, b: int) -> None:
        """Exchange what streams `a` and `b` hold, and who holds them (a running sequence or a free slot)."""
        self.context.swap(a, b, self.spare)
        self.swaps += 1
        with self._cond:
            slots = {seq: self._slots.pop(seq) for seq in (a, b) if seq in self._slots}
            for seq, slot in slots.items():
                slot.seq = b if seq == a else a
                self._slots[slot.seq] = slot
            if a in self._free_slots or b in self._free_slots:
                renamed = {a: b, b: a}
                self._free_slots = OrderedDict((renamed.get(seq, seq), kept) for seq, kept in self._free_slots.items())

    def _step(self) -> None:
        """One round: a llama_decode per KV-length class of decoding sequences (a token each), then one per
        prompt chunk. A token is thus computed over the same padded KV length as in the sequential engine,
        which keeps the answers equal (see the module docstring)."""
        decoding = self._by_class()
        self._regroup(decoding)
        rounds = [[(slot, 1) for slot in slots] for slots in decoding.values()]
        for kv_class, slots in decoding.items():
            self.decoded[kv_class] += len(slots)
        room = self.n_batch
        for slot in sorted((s for s in self._slots.values() if s.in_prefill), key=lambda s: s.order):
            if room <= 0:
                break
            take = min(room, len(slot.prompt) - slot.n_past)
            rounds.append([(slot, take)])
            room -= take
        for work in rounds:
            self._decode(work)

    def _decode(self, work: list[tuple[_Slot, int]]) -> None:
        """Compute `work` in one llama_decode, then sample every sequence that has logits. Tokens go in by
        sequence id: llama.cpp splits a batch over several streams into ubatches of consecutive ids."""
        items: list[Item] = []
        for slot, take in sorted(work, key=lambda w: w[0].seq):
            if not slot.in_prefill:
                slot.logits_row = len(items)
                items.append((slot.output[-1], slot.n_past, slot.seq, True))
                continue
            for pos in range(slot.n_past, slot.n_past + take):
                last = pos == len(slot.prompt) - 1
                if last:
                    slot.logits_row = len(items)
                items.append((int(slot.prompt[pos]), pos, slot.seq, last))
        try:
            self.context.decode(items)
        except ModelError as error:
            for slot, _ in work:
                self._finish(slot, error=error)
            return
        for slot, taken in work:
            slot.n_past += taken
            if slot.in_prefill:
                continue
            try:
                if not slot.output and self.max_prefixes:
                    with self._cond:
                        self._keep_prefix(slot)
                self._sample(slot)
            except Exception as exc:  # noqa: BLE001 - a failure in one sequence fails only its call
                self._finish(slot, error=exc)

    def _sample(self, slot: _Slot) -> None:
        logits = np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.context.ctx, slot.logits_row),
                                       shape=(self.n_vocab,))
        if slot.tracker is not None:
            slot.tracker.step(self.llama.detokenize(slot.output).decode("utf-8", errors="ignore"), logits,
                              len(slot.output))
        token = slot.sampler.next(logits)
        if self.lc.llama_vocab_is_eog(self.vocab, token):
            self._finish(slot, reason="stop")
            return
        slot.output.append(token)
        job = slot.request.job
        if job.choice is not None and job.temperature == 0:
            rest = settle_choice(self.llama.detokenize(slot.output).decode("utf-8", errors="ignore"), *job.choice)
            if rest is not None:
                self._finish(slot, reason="stop", rest=rest)
                return
        if len(slot.output) >= job.max_tokens:
            self._finish(slot, reason="length")

    def _free(self, slot: _Slot, keep: bool) -> None:
        """Give the slot back; its stream keeps its tokens for later requests unless `keep` is False."""
        slot.sampler.free()
        del self._slots[slot.seq]
        if keep:
            self._free_slots[slot.seq] = slot.kv_tokens()
        else:
            self.context.drop(slot.seq)
            self._free_slots[slot.seq] = EMPTY

    def _finish(self, slot: _Slot, reason: str = "stop", error: BaseException | None = None, rest: str = "") -> None:
        """Hand the answer over; `rest` is text the grammar forces after the decoded tokens (a settled choice)."""
        request = slot.request
        with self._cond:
            self._free(slot, keep=error is None)
        if error is None:
            job = request.job
            text = self.llama.detokenize(slot.output, prev_tokens=list(job.tokens)).decode("utf-8", errors="ignore") + rest
            confidence = slot.tracker.result(slot.output, text) if slot.tracker is not None else None
            request.result = Completion(text=text, n_prompt=len(job.tokens), n_reused=slot.reused,
                                        n_output=len(slot.output), finish_reason=reason,  # type: ignore[arg-type]
                                        confidence=confidence)
        request.error = error
        request.done.set()
