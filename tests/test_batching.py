"""The batched backend on the real embedded model: same answers as the sequential reference, exact
prefix reuse, one worker serving many threads, a grammar per sequence, bounded KV memory."""

import json
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import dspy
import numpy as np
import pytest
from dspy import lm15

from optimize import cost
from optimize.llm.adapter import CacheFriendlyAdapter
from optimize.llm.batched import BatchedBackend
from optimize.config import ModelConfig
from optimize.llm.engine import LlamaEngine, load_llama, schema_grammar
from optimize.llm.sequential import SequentialBackend
from optimize.llm.types import Generation, final_choice
from optimize.errors import ModelError

pytestmark = pytest.mark.model

SYSTEM = "You are a careful assistant. Answer briefly and exactly as asked, with no extra words."
NUMBER = schema_grammar(json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}))
COLOUR_SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"]}
COLOUR = schema_grammar(json.dumps(COLOUR_SCHEMA))


@pytest.fixture(scope="module")
def llama(smollm_info):
    return load_llama(smollm_info, ModelConfig(n_ctx=2048))


@pytest.fixture(scope="module")
def sequential(llama):
    return SequentialBackend(llama)  # not closed: it would close the shared Llama


@pytest.fixture(scope="module")
def batched(llama):
    backend = BatchedBackend(llama, parallel=16)
    yield backend
    backend.close()


def chat(llama, user: str, system: str = SYSTEM) -> tuple[int, ...]:
    text = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    return tuple(llama.tokenize(text.encode(), add_bos=False, special=True))


def jobs(llama, n: int) -> list[Generation]:
    """Distinct prompts sharing a system prompt; every other one under a JSON grammar."""
    return [Generation(tokens=chat(llama, f"Repeat the number {1000 + 37 * i}."), max_tokens=10,
                       grammar=NUMBER if i % 2 else None) for i in range(n)]


def test_fixed_prompts_get_exactly_the_sequential_answers(llama, sequential, batched):
    # Distinct prompts: llama.cpp's logits for a prompt recomputed from its last token right after the same
    # prompt was answered differ (~0.5) from a fresh computation, in the sequential reference as well.
    questions = ("What is 17 + 25?", "Name the capital of France.", "Reply in JSON: what colour is grass?",
                 "Count from one to five.", "How many legs does a spider have?", "Spell the word cat backwards.",
                 )
    work = [Generation(tokens=chat(llama, q), max_tokens=12, grammar=(None, NUMBER, COLOUR)[i % 3])
            for i, q in enumerate(questions)]
    expected = [sequential.generate(job) for job in work]
    with ThreadPoolExecutor(len(work)) as pool:
        got = list(pool.map(batched.generate, work))
    assert [(g.text, g.n_output, g.finish_reason) for g in got] == \
        [(e.text, e.n_output, e.finish_reason) for e in expected]


def test_32_threads_get_the_sequential_answers_to_their_own_prompts(llama, sequential, batched):
    # More threads than slots: requests queue and join between steps; each must get its own answer, the
    # sequential one (one KV stream per sequence: nothing else is in its attention; these short prompts
    # attend over the same padded KV length alone or together, so logits are bit-for-bit equal).
    work = jobs(llama, 32)
    expected = [sequential.generate(job) for job in work]
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(batched.generate, work))
    assert [(g.text, g.n_output) for g in got] == [(e.text, e.n_output) for e in expected]
    assert all(g.n_prompt == len(job.tokens) for g, job in zip(got, work))
    assert batched.copies > 0 and max(g.n_reused for g in got) > 0  # prefixes were shared


def test_prompts_of_different_kv_lengths_decoded_together_get_the_sequential_answers(llama, sequential, batched):
    # Short prompts (llama.cpp attends over 256 padded cells) and long ones (512) decoding at the same time:
    # in one ubatch the short ones would attend over 512 cells, which moves their logits (3 of these 24
    # free-text answers differed so); the backend decodes each KV-length class in its own llama_decode.
    long_system = SYSTEM + " " + " ".join(f"Rule {i}: keep every answer short, plain and kind." for i in range(1, 25))
    work = []
    for topic in ("the sea", "a city at night", "winter", "a train", "bread", "a library", "the moon", "a garden",
                  "rain", "a market", "mountains", "a river"):
        for system in (SYSTEM, long_system):
            work.append(Generation(tokens=chat(llama, f"Write one sentence about {topic}.", system), max_tokens=24))
    assert {batched._kv_class(len(job.tokens) + 24) for job in work} == {256, 512}
    expected = [sequential.generate(job) for job in work]
    before = batched.decoded.copy()
    with ThreadPoolExecutor(len(work)) as pool:
        got = list(pool.map(batched.generate, work))
    assert [(g.text, g.n_output) for g in got] == [(e.text, e.n_output) for e in expected]
    # Every output token but one stopped by max_tokens was fed back through llama_decode, in its KV class.
    decoded = batched.decoded - before
    assert set(decoded) == {256, 512}
    assert sum(decoded.values()) == sum(g.n_output - (g.finish_reason == "length") for g in got)


def test_a_new_sequence_goes_beside_decoding_sequences_of_its_kv_class(llama):
    # Each KV class is decoded in its own llama_decode and llama.cpp puts only consecutive stream ids in one
    # ubatch, so a sequence placed beside others of its class joins their ubatch instead of making its own.
    from types import SimpleNamespace

    backend = BatchedBackend(llama, parallel=6, cells_per_seq=1024, max_prefixes=0)
    try:
        with backend._cond:  # the worker is idle: no request was sent
            backend._slots = {1: SimpleNamespace(in_prefill=False, n_past=300),  # decodes over 512 cells
                              4: SimpleNamespace(in_prefill=False, n_past=100)}  # over 256
            backend._free_slots = {seq: np.zeros(0, np.int32) for seq in (0, 2, 3, 5)}
            short, long = np.arange(120, dtype=np.int32), np.arange(400, dtype=np.int32)
            assert backend._destination(short, 0) == 3  # beside 4; 5 too, the lower id wins
            assert backend._destination(long, 0) == 0  # beside 1; 2 too
            backend._free_slots[5] = short[:80]  # holds the 80 shared tokens: no copy needed there
            assert backend._destination(short, 80) == 5
            backend._slots = {}
    finally:
        backend.close()


def test_classes_split_over_scattered_ids_are_regrouped_with_the_sequential_answers(llama, sequential):
    # Requests of two KV classes arriving in turn take ids 0..5 in turn (nothing of their class decodes yet
    # when each is placed), so each class sits at every other id: without regrouping, each of its tokens
    # would be its own ubatch. Fails if no swap happens, if a decode of one class spans scattered ids, or
    # if a swap loses or mixes up a stream's cells (the answers then differ from the sequential ones).
    backend = BatchedBackend(llama, parallel=6, cells_per_seq=1024, max_prefixes=0)
    rounds: list[list[int]] = []
    decode = backend.context.decode

    def spy(items):
        if all(logits for *_, logits in items):  # a decoding round: one token per sequence
            rounds.append([seq for _, _, seq, _ in items])
        decode(items)

    backend.context.decode = spy
    # Listing replies run to max_tokens, so every request still decodes when the next ones arrive.
    short = [Generation(tokens=chat(llama, f"List the numbers from {4000 + i} to {4100 + i}."), max_tokens=24)
             for i in range(3)]
    long = [Generation(tokens=chat(llama, f"List the numbers from {5000 + i} to {5100 + i}.", system=SYSTEM * 14),
                       max_tokens=24) for i in range(3)]
    work = [job for pair in zip(short, long) for job in pair]
    assert {backend._kv_class(len(j.tokens) + 24) for j in short} == {256}
    assert {backend._kv_class(len(j.tokens) + 1) for j in long} == {512}
    try:
        with ThreadPoolExecutor(6) as pool:
            futures = []
            for job in work:
                futures.append(pool.submit(backend.generate, job))
                time.sleep(0.05)  # arrive in this order
            got = [f.result() for f in futures]
    finally:
        backend.close()
    assert backend.swaps > 0 and all(g.n_output == 24 for g in got)
    assert all(ids == list(range(ids[0], ids[0] + len(ids))) for ids in rounds), rounds
    assert [(g.text, g.n_output) for g in got] == [(e.text, e.n_output) for e in map(sequential.generate, work)]


def test_regrouping_leaves_room_for_the_next_class_and_settles(llama):
    # Two classes of 3 over 6 slots. The first placed (the shorter class, on a tie) fits best at 1-3, 2-4 or
    # 3-5; only 3-5, against the end, leaves 0-2 whole for the other. Then nothing moves at the next step.
    # Fails if the window ignores the ids it leaves, or if the order of placing changes between steps.
    from types import SimpleNamespace

    backend = BatchedBackend(llama, parallel=6, cells_per_seq=1024, max_prefixes=0)
    swaps = []
    backend.context.swap = lambda a, b, via: swaps.append((a, b))  # bookkeeping only: nothing is decoded
    try:
        with backend._cond:  # the worker is idle: no request was sent
            short = {seq: SimpleNamespace(seq=seq, in_prefill=False, n_past=100) for seq in (2, 3, 5)}
            long = {seq: SimpleNamespace(seq=seq, in_prefill=False, n_past=300) for seq in (0, 1, 4)}
            backend._slots, backend._free_slots = {**short, **long}, OrderedDict()
        backend._regroup(backend._by_class())
        assert sorted(s.seq for s in short.values()) == [3, 4, 5] and sorted(s.seq for s in long.values()) == [0, 1, 2]
        assert swaps == [(2, 4)] and backend._slots == {s.seq: s for s in [*short.values(), *long.values()]}
        backend._regroup(backend._by_class())
        assert swaps == [(2, 4)]
    finally:
        backend._slots = {}
        backend.close()


def test_second_request_reuses_exactly_the_shared_prefix(llama):
    backend = BatchedBackend(llama, parallel=4, cells_per_seq=512)
    try:
        first = Generation(tokens=chat(llama, "Name a colour."), max_tokens=4)
        second = Generation(tokens=chat(llama, "Name a fruit."), max_tokens=4)
        shared = int(np.flatnonzero(np.array(first.tokens) != np.array(second.tokens))[0])
        assert backend.generate(first).n_reused == 0
        done = backend.generate(second)
        assert done.n_reused == shared
        # The same prompt again: all but the last token come from the cache.
        assert backend.generate(second).n_reused == len(second.tokens) - 1
    finally:
        backend.close()


def test_engine_usage_reports_reused_input(llama, smollm_info):
    class Intent(dspy.Signature):
        """Pick the colour named in the sentence."""

        sentence: str = dspy.InputField()
        colour: str = dspy.OutputField()

    engine = LlamaEngine(smollm_info, ModelConfig(engine="batched", max_tokens=16, cache=False),
                         backend=BatchedBackend(llama, parallel=4, cells_per_seq=512))
    lm = dspy.LM("llamacpp/test-batched", engine=engine, temperature=0.0, max_tokens=16, cache=False, num_retries=0)
    try:
        with dspy.context(lm=lm, adapter=CacheFriendlyAdapter()):
            dspy.Predict(Intent)(sentence="The sky is blue.")
            with cost.metered() as tally:
                dspy.Predict(Intent)(sentence="Grass is green.")
    finally:
        engine.close()
    # Everything before the sentence is shared; only the sentence and the turn end are computed.
    assert tally.usage.input_reused > 100
    assert tally.usage.input_computed < 25


def test_each_sequence_decodes_under_its_own_grammar(llama, batched):
    work = [Generation(tokens=chat(llama, "What colour is the sky? Reply in JSON."), max_tokens=16,
                       grammar=COLOUR if i % 2 else NUMBER) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(batched.generate, work))
    for i, done in enumerate(got):
        value = json.loads(done.text)
        if i % 2:
            assert value["colour"] in {"red", "green", "blue"}
        else:
            assert isinstance(value["n"], int)


def test_a_bad_request_fails_alone(llama, batched):
    good = Generation(tokens=chat(llama, "Say hi."), max_tokens=4)
    bad = Generation(tokens=chat(llama, "Say hi."), max_tokens=4, grammar="root ::= undefined-rule")
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(batched.generate, bad), pool.submit(batched.generate, good)]
        with pytest.raises(ModelError, match="grammar"):
            futures[0].result()
        assert futures[1].result().n_output > 0


def test_kv_memory_stays_bounded_and_lru_prefixes_are_evicted(llama, sequential):
    backend = BatchedBackend(llama, parallel=2, cells_per_seq=512, max_prefixes=3)
    assert backend.kv_bytes == 6 * 512 * backend.bytes_per_cell  # 2 slots, 3 prefixes, the spare
    try:
        work = [Generation(tokens=chat(llama, "Say one word.", system=f"Session {i}. {SYSTEM} " * 4), max_tokens=4)
                for i in range(8)]  # distinct system prompts: nothing shared, every prompt a new prefix
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(backend.generate, work))
        assert [(g.text, g.n_output) for g in got] == [(e.text, e.n_output) for e in map(sequential.generate, work)]
        assert len(backend.cached_prefixes) == 3  # the LRU keeps the last three
        # A prompt that no longer fits one sequence's cells fails like the engine's context-window check.
        too_long = Generation(tokens=chat(llama, "Say one word. " * 200), max_tokens=4)
        with pytest.raises(lm15.ContextLengthError):
            backend.generate(too_long)
    finally:
        backend.close()
    with pytest.raises(ModelError, match="closed"):
        backend.generate(work[0])


def test_a_call_longer_than_a_stream_runs_alone_on_the_long_backend_with_the_sequential_answer(
        llama, sequential, smollm_info):
    made = []
    def long():  # its own Llama: a prompt answered twice on one context is not recomputed alike (see above)
        made.append(SequentialBackend(load_llama(smollm_info, ModelConfig(n_ctx=2048))))
        return made[-1]

    backend = BatchedBackend(llama, parallel=2, cells_per_seq=256, max_prefixes=0, long=long)
    try:
        short = jobs(llama, 3)
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(backend.generate, short))
        assert not made  # every call fit a stream: the long context was never made
        over = Generation(tokens=chat(llama, "Repeat the number 4242. " * 40), max_tokens=8)
        assert len(over.tokens) + over.max_tokens > 256
        work = [over, over, *jobs(llama, 5)[3:]]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(backend.generate, work))
        assert backend.long_calls == 2 and len(made) == 1  # only the long ones left the streams, to one context
        expected = [sequential.generate(job) for job in work]
        assert [(g.text, g.n_output) for g in got] == [(e.text, e.n_output) for e in expected]
    finally:
        backend.close()
    assert made[0].llama._ctx.ctx is None  # closed with the backend


def test_stream_cells_is_a_multiple_of_the_kv_padding():
    # A stream cut inside a 256-cell block would attend over fewer cells than the sequential engine does.
    with pytest.raises(ValueError, match="multiple of 256"):
        ModelConfig(stream_cells=300)


def test_the_engine_sizes_its_streams_by_stream_cells_and_serves_longer_calls(smollm_info):
    engine = LlamaEngine(smollm_info, ModelConfig(n_ctx=2048, stream_cells=256, kv_cache_mb=200, parallel=4,
                                                  max_tokens=4, cache=False))
    try:
        assert engine.backend.cells_per_seq == 256 and engine.backend.kv_bytes == 7 * 256 * 23040
        assert engine.llama.n_ctx() == 256  # the Llama only tokenizes: its context stays small
        lm = dspy.LM("llamacpp/smollm2", engine=engine, max_tokens=4, cache=False)
        assert lm("Repeat after me. " * 60)[0]  # ~360 tokens: over a stream, under n_ctx
        assert engine.backend.long_calls == 1
    finally:
        engine.close()


def test_slots_fit_the_kv_budget_and_an_impossible_one_is_refused(llama):
    backend = BatchedBackend(llama, parallel=16, max_prefixes=2, kv_budget=10 * 2048 * 23040)
    try:
        assert backend.cells_per_seq == llama.n_ctx() == 2048
        assert backend.parallel == 7 and backend.kv_bytes <= 10 * 2048 * 23040
    finally:
        backend.close()
    with pytest.raises(ModelError, match="holds no decoding slot: one slot, 2 prefix streams and a spare of 2048 cells need 189 MB"):
        BatchedBackend(llama, parallel=16, max_prefixes=2, kv_budget=100_000_000)


def test_the_engine_takes_its_kv_budget_from_the_config(smollm_info):
    engine = LlamaEngine(smollm_info, ModelConfig(n_ctx=1024, kv_cache_mb=200, parallel=16))
    try:
        assert engine.backend.parallel == 200_000_000 // (1024 * 23040) - 2 - 1 == 5
    finally:
        engine.close()


def test_a_settled_choice_stops_decoding_with_the_same_answer(llama, sequential, batched):
    questions = ("What colour is the sky on a clear day?", "What colour is fresh grass?", "What colour is blood?",
                 "Name a colour of the French flag.")
    plain = [Generation(tokens=chat(llama, q + " Reply in JSON."), max_tokens=16, grammar=COLOUR) for q in questions]
    settled = [Generation(**{**job.__dict__, "choice": final_choice(COLOUR_SCHEMA)}) for job in plain]
    expected = [sequential.generate(job) for job in plain]
    with ThreadPoolExecutor(len(settled)) as pool:
        got = list(pool.map(batched.generate, settled))
    assert [json.loads(g.text) for g in got] == [json.loads(e.text) for e in expected]
    assert all(g.n_output < e.n_output for g, e in zip(got, expected))  # the closing tokens were never decoded


ENDLESS = 'root ::= "ab" root'  # never complete: no end of generation is allowed, only max_tokens ends a call


@pytest.mark.parametrize("kind", ["sequential", "batched"])
def test_closing_stops_the_calls_in_flight_with_an_error(kind, llama, smollm_info):
    """What an interrupted run relies on to exit at once: a thread inside a call gets an error within a token
    or two of close(), not its answer minutes later. Fails if close() waits for the calls to finish (they
    would return answers of thousands of tokens) or frees the context under a running call (a crash)."""
    backend = (SequentialBackend(load_llama(smollm_info, ModelConfig(n_ctx=4096))) if kind == "sequential"
               else BatchedBackend(llama, parallel=4, max_prefixes=0))
    tokens = chat(llama, "Write the letters a and b again and again.")
    # As long as the backend allows: the sequential context holds 4,096 cells, a batched stream the shared 2,048.
    long = Generation(tokens=tokens, max_tokens=4000 if kind == "sequential" else 2047 - len(tokens),
                      grammar=ENDLESS)
    with ThreadPoolExecutor(3) as pool:
        calls = [pool.submit(backend.generate, long) for _ in range(3)]
        time.sleep(1.0)  # every call is decoding (a few hundred of its tokens at most)
        assert not any(call.done() for call in calls)
        backend.close()
        errors = [call.exception(timeout=30) for call in calls]
    assert all(isinstance(e, ModelError) and "closed" in str(e) for e in errors), errors
    with pytest.raises(ModelError, match="closed"):
        backend.generate(long)
