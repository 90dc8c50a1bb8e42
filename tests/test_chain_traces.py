"""A chain's events (its LM calls and validator verdicts, in order, with their times) and the trace written
from them: one LLM span per counted call, one validator span per verdict, in the run's Traces tab."""

import json
import pickle
import time

import dspy
import mlflow
import pytest
from dspy.utils.dummies import DummyLM

from optimize import cost, tracking
from optimize.config import DataConfig
from optimize.data import Task, load_splits
from optimize.evaluate import evaluate
from optimize.llm.types import Usage
from optimize.trial import adapter, get_program
from programs.retrieval import fill_retrievers

LABELS = ("card_arrival", "card_linking", "top_up_failed", "exchange_rate")
INTENT = Task("banking77", "intent", ("query",), "intent", LABELS)
POOL = [dspy.Example(query=q, intent=label).with_inputs("query") for q, label in [
    ("When will my new card arrive?", "card_arrival"), ("How do I link my new card?", "card_linking"),
    ("Top up failed again", "top_up_failed"), ("What is the exchange rate?", "exchange_rate")]]
ADAPTER = dspy.ChatAdapter(use_json_adapter_fallback=False)  # one scripted answer per call, no silent retry
CALL = Usage(input_computed=30, input_reused=70, output=5, calls=1, seconds=0.02)


class MeteredLM(DummyLM):
    """DummyLM that reports each call's usage as the engine does, under the model name `dummy`: after the
    call, which really takes the seconds it reports (an instant call reporting 20 ms would seem to start
    before its chain)."""

    def __call__(self, *args, **kwargs):
        time.sleep(CALL.seconds)
        cost.record(CALL, "dummy")
        return super().__call__(*args, **kwargs)


def _records(answers: list[dict], n: int = 1) -> list:
    """intent.retrieve (k = 2 over a pool of different labels: a call per example, and one retry) on `n`
    examples, answered from `answers`."""
    program = get_program("intent.retrieve").build(INTENT, k=2)
    fill_retrievers(program, POOL)
    examples = [dspy.Example(query=f"my card has not come yet {i}", intent="card_arrival").with_inputs("query")
                for i in range(n)]
    with dspy.context(lm=MeteredLM(answers), adapter=ADAPTER):
        result = evaluate(program, examples, get_program("intent.retrieve").metric(INTENT), "intent", threads=1)
    return sorted(result.records, key=lambda r: r.index)


def test_a_chain_keeps_its_calls_and_verdicts_in_order_as_plain_data():
    """A first answer the label check rejects, then the retry's accepted one. Fails if an LM call counted in
    the record's usage has no event (or an event has no counted call), if the rejection is not followed by
    `retry`, if the order or the times are wrong, or if the events do not survive JSON and pickle."""
    (record,) = _records([{"intent": "my card is lost"}, {"intent": "card_arrival"}])
    assert record.success and (record.validator_failures, record.retries) == (1, 1)
    shape = [(e["kind"], e["step"], e.get("accepted"), e.get("retry")) for e in record.events]
    assert shape == [("lm", "classify", None, None), ("verdict", "classify", False, True),
                     ("lm", "classify.retry", None, None), ("verdict", "classify.retry", True, False)]
    calls = [e for e in record.events if e["kind"] == "lm"]
    assert len(calls) == record.usage.calls == 2
    assert sum(e["input_computed"] for e in calls) == record.usage.input_computed
    assert sum(e["input_reused"] for e in calls) == record.usage.input_reused
    assert sum(e["output"] for e in calls) == record.usage.output
    assert all(e["model"] == "dummy" and not e["cached"] for e in calls)
    assert calls[0]["end_ns"] - calls[0]["start_ns"] == int(CALL.seconds * 1e9)
    rejected = record.events[1]
    assert rejected["validator"] == "check_label" and rejected["value"] == "my card is lost"
    assert "not an allowed label" in rejected["reason"]
    times = [e.get("end_ns", e.get("time_ns")) for e in record.events]
    assert record.start_ns <= calls[0]["start_ns"] and times == sorted(times)
    assert record.start_ns + record.seconds * 1e9 >= times[-1]
    assert json.loads(json.dumps(record.events)) == record.events
    assert pickle.loads(pickle.dumps(record)).events == record.events


def _spans(trace) -> dict[str, list]:
    by_type: dict[str, list] = {}
    for span in sorted(trace.data.spans, key=lambda s: s.start_time_ns):
        by_type.setdefault(span.span_type, []).append(span)
    return by_type


def test_a_trace_has_a_span_per_counted_call_and_per_verdict_in_the_run(mlflow_store):
    """Fails if traces are written beyond the sample, are not found by the run (or the experiment), if their
    LLM spans are not the calls the record counted (number, tokens computed, reused and generated, times),
    or if the rejected verdict's span is not ERROR with its reason and `retry`, the accepted one OK."""
    records = _records([{"intent": "my card is lost"}, {"intent": "card_arrival"}] * 3, n=3)
    experiment_id = tracking.setup("chain-traces", mlflow_store)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        assert tracking.log_chain_traces(records, 2, "intent.retrieve") == 2
    traces = mlflow.search_traces(locations=[experiment_id], run_id=run.info.run_id, return_type="list")
    assert len(traces) == 2
    assert len(mlflow.search_traces(locations=[experiment_id], return_type="list")) == 2
    for trace in traces:
        spans = _spans(trace)
        (root,) = spans["CHAIN"]
        record = next(r for r in records if root.name == f"intent.retrieve {r.example_id}")
        assert record.index < 2 and trace.info.state.value == "OK"
        assert root.inputs == record.inputs and root.outputs["answer"] == "card_arrival"
        assert root.start_time_ns == record.start_ns
        llm = spans["LLM"]
        assert [s.name for s in llm] == ["classify", "classify.retry"] and len(llm) == record.usage.calls
        for key, total in (("input_tokens_computed", record.usage.input_computed),
                           ("input_tokens_reused", record.usage.input_reused),
                           ("output_tokens", record.usage.output)):
            assert sum(s.attributes[f"chainopt.{key}"] for s in llm) == total
        calls = [e for e in record.events if e["kind"] == "lm"]
        assert [(s.start_time_ns, s.end_time_ns) for s in llm] == [(e["start_ns"], e["end_ns"]) for e in calls]
        assert llm[0].attributes["chainopt.model"] == "dummy"
        rejected, accepted = spans["GUARDRAIL"]
        assert (rejected.name, accepted.name) == ("check_label: rejected, retried", "check_label: accepted")
        assert rejected.status.status_code.value == "ERROR" and "not an allowed label" in rejected.status.description
        assert rejected.attributes["chainopt.retry"] is True and rejected.inputs == {"value": "my card is lost"}
        assert accepted.status.status_code.value == "OK" and accepted.attributes["chainopt.accepted"] is True
    usage = traces[0].info.token_usage
    assert usage["input_tokens"] == 2 * (CALL.input_computed + CALL.input_reused)


@pytest.mark.model
def test_a_real_chain_on_the_embedded_model_traces_every_counted_call(mlflow_store, sequential_lm):
    """Two Banking77 examples through intent.retrieve on SmolLM2-135M. Fails if the trace's LLM spans are
    not the record's counted calls (number and token sums), or a call's measured time is not its span's."""
    splits = load_splits(DataConfig(dataset="banking77", train=40, dev=0, test=2, seed=0))
    spec = get_program("intent.retrieve")
    program = spec.build(splits.task)
    fill_retrievers(program, splits.train)
    with dspy.context(lm=sequential_lm, adapter=adapter()):
        records = evaluate(program, splits.test, spec.metric(splits.task), "intent", threads=1).records
    experiment_id = tracking.setup("chain-traces-model", mlflow_store)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        assert tracking.log_chain_traces(records, 5, "intent.retrieve") == 2
    traces = mlflow.search_traces(locations=[experiment_id], run_id=run.info.run_id, return_type="list")
    assert len(traces) == 2
    for trace in traces:
        spans = _spans(trace)
        record = next(r for r in records if spans["CHAIN"][0].name.endswith(f" {r.example_id}"))
        llm = spans.get("LLM", [])
        assert len(llm) == record.usage.calls >= 1
        assert sum(s.attributes["chainopt.input_tokens_computed"] for s in llm) == record.usage.input_computed
        assert sum(s.attributes["chainopt.output_tokens"] for s in llm) == record.usage.output > 0
        assert llm[0].attributes["chainopt.model"].startswith("llamacpp/")
        seconds = sum((s.end_time_ns - s.start_time_ns) / 1e9 for s in llm)
        assert seconds == pytest.approx(record.usage.seconds, abs=1e-6 * len(llm))
        checks = spans.get("GUARDRAIL", [])
        assert sum(s.status.status_code.value == "ERROR" for s in checks) == record.validator_failures
        assert sum(s.attributes["chainopt.accepted"] for s in checks) == (record.predicted is not None)
