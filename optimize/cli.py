"""The `chainopt` command line: parse, load the config, call one library function, print the result.

The project's own errors become one clean line on stderr and a meaningful exit code:
0 ok, 1 unexpected failure, 2 bad input (config, model, data), 3 budget stop, 4 a run FAILED on chain
errors (over eval.max_error_rate), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

from optimize.bench import CHILDREN, PATHS, WORKLOADS, format_table, measure, run_bench
from optimize.errors import ChainoptError, ConfigError
from optimize.tables import fmt, table

EXAMPLES = {
    "run": "chainopt run experiments/banking77-fewshot.toml",
    "eval": "chainopt eval --program intent.predict --dataset banking77 --split test --limit 20",
    "validate": "chainopt validate experiments/banking77-fewshot.toml",
    "datasets": "chainopt datasets list",
    "models": "chainopt models list",
    "programs": "chainopt programs list",
    "compare": "chainopt compare experiments/banking77-fewshot.toml",
    "ui": "chainopt ui --port 5000",
    "report": "chainopt report experiments/banking77-fewshot.toml  # writes reports/banking77-fewshot.html",
    "export": "chainopt export best --experiment experiments/banking77-fewshot.toml --out exports/banking77-best",
    "bench": "chainopt bench --workload banking77 --n 200 --stock-limit 20",
    "predict": "chainopt predict exports/banking77-best --input queries.jsonl --output answers.jsonl",
}


class Output:
    """Where results go: human text, or JSON for scripts; quiet drops progress, verbose adds detail."""

    def __init__(self, args: argparse.Namespace):
        self.json, self.quiet, self.verbose = args.json, args.quiet, args.verbose
        self.live = False if (self.quiet or self.json) else None  # None: a live bar only on a terminal
        self.stdout = sys.stdout  # results go here; library prints are redirected while a command runs

    def progress(self, message: str) -> None:
        if not self.quiet and not self.json:
            print(message, file=sys.stderr, flush=True)

    def result(self, text: str, data: Any) -> None:
        print(json.dumps(data, indent=1, default=_json_default) if self.json else text, file=self.stdout,
              flush=True)  # a reader (a script, `chainopt ui`'s caller) may be waiting while we keep running


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return str(value)


# -- commands -------------------------------------------------------------------------------------
def _result_text(result) -> str:
    from optimize.tracking import default_uri

    rows = [[t.trial.program.name, t.trial.optimizer.name, t.trial.cascade.name if t.trial.cascade else t.trial.model.spec,
             t.trial.seed,
             t.metrics.get("accuracy"), f"{int(t.metrics.get('successes', 0))}/{int(t.metrics.get('n', 0))}",
             t.metrics.get("tokens_per_success"), t.metrics.get("seconds_per_success"),
             t.metrics.get("parse_failures"), t.metrics.get("error_rate"), _status(t)] for t in result.trials]
    failures = "".join(f"\nFAILED {t.trial.run_name}: {t.failed}" for t in result.trials if t.failed)
    uri = result.tracking_uri
    ui = f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000" if uri.startswith("sqlite") else uri
    hint = "" if uri != default_uri() else "\n(or: chainopt ui)"
    return (table(["program", "optimizer", "model", "seed", "accuracy", "ok/n", "tokens/success", "s/success",
                   "parse fail", "error rate", "status"], rows)
            + failures + f"\n\nMLflow parent run {result.parent_run_id} in {uri}\nOpen it with: {ui}{hint}")


def _status(t) -> str:
    status = "reused" if t.reused else "FAILED" if t.failed else (t.stopped or "ok")
    hits = int(t.metrics.get("cache_hits", 0) or 0)
    return f"{status}, {hits} cache hits (off the Pareto front)" if hits else status


def _result_data(result) -> dict:
    return {"experiment": result.experiment.name, "parent_run_id": result.parent_run_id,
            "tracking_uri": result.tracking_uri,
            "runs": [{"run_id": t.run_id, "program": t.trial.program.name, "optimizer": t.trial.optimizer.name,
                      "model": t.trial.model.spec, "seed": t.trial.seed, "reused": t.reused, "stopped": t.stopped,
                      "failed": t.failed,
                      "metrics": t.metrics} for t in result.trials]}


def cmd_run(args, out: Output) -> int:
    from optimize.config import load_experiment
    from optimize.experiment import run_experiment

    exp = load_experiment(args.experiment)
    if args.ray is not None:  # the file's [execution], with the backend and address the option gives
        exp = exp.model_copy(update={"execution": exp.execution.model_copy(
            update={"backend": "ray", "address": args.ray or None})})
    result = run_experiment(exp, Path(args.experiment), progress=out.progress, live=out.live)
    out.result(_result_text(result), _result_data(result))
    return 4 if any(t.failed for t in result.trials) else 3 if any(t.stopped for t in result.trials) else 0


def cmd_eval(args, out: Output) -> int:
    from optimize.config import DataConfig, EvalConfig, ModelConfig, ProgramConfig, TrackingConfig, parse_experiment
    from optimize.experiment import run_experiment

    sizes = {"train": args.train, "dev": 0, "test": 0}
    sizes[args.split] += args.limit
    exp = parse_experiment({
        "name": f"eval-{args.program}-{args.dataset}", "models": [ModelConfig(spec=args.model).model_dump()],
        "data": DataConfig(dataset=args.dataset, **sizes).model_dump(),
        "programs": [ProgramConfig(name=args.program).model_dump()],
        "eval": EvalConfig(split=args.split).model_dump(), "tracking": TrackingConfig().model_dump()}, "chainopt eval")
    result = run_experiment(exp, progress=out.progress, live=out.live)
    out.result(_result_text(result), _result_data(result))
    return 0


def cmd_validate(args, out: Output) -> int:
    from optimize.config import load_experiment
    from optimize.experiment import check

    exp = load_experiment(args.experiment)
    check(exp, Path(args.experiment))
    n, b = len(exp.combinations()), len(exp.baselines)
    out.result(f"{args.experiment}: valid ({n} combination{'s' * (n != 1)}"
               + (f", {b} baseline{'s' * (b != 1)})" if b else ")"), {"valid": True, "combinations": n, "baselines": b})
    return 0


def cmd_datasets(args, out: Output) -> int:
    from optimize.data import list_datasets

    rows = list_datasets()
    out.result(table(["name", "task", "splits", "licence"],
                     [[r["name"], r["kind"], ", ".join(f"{k}={v}" for k, v in r["splits"].items()), r["licence"]]
                      for r in rows]), rows)
    return 0


def cmd_models(args, out: Output) -> int:
    from optimize.llm.models import EMBEDDED, describe

    rows = []
    for spec in EMBEDDED:
        try:
            info = describe(spec)
            rows.append({"spec": spec, "quantization": info.quantization, "params": info.n_params,
                         "size_mb": round(info.size_bytes / 1e6, 1), "sha256": info.sha256[:12], "available": True})
        except ChainoptError as exc:
            rows.append({"spec": spec, "available": False, "reason": str(exc)})
    out.result(table(["spec", "quantization", "params", "size MB", "sha256", "status"],
                     [[r["spec"], r.get("quantization"), r.get("params"), r.get("size_mb"), r.get("sha256"),
                       "ok" if r["available"] else r["reason"]] for r in rows])
               + "\nAlso: any path/to/model.gguf, or hf:<owner>/<repo>/<file.gguf> when online.", rows)
    return 0


def cmd_programs(args, out: Output) -> int:
    from optimize.trial import PROGRAMS

    rows = [{"name": p.name, "task": p.kind, "description": p.description} for p in PROGRAMS.values()]
    out.result(table(["name", "task", "description"], [list(r.values()) for r in rows]), rows)
    return 0


def cmd_compare(args, out: Output) -> int:
    from optimize.config import load_experiment
    from optimize.tracking import child_rows, runs_of

    exp = load_experiment(args.experiment) if args.experiment.endswith(".toml") else None
    name = (exp.tracking.experiment or exp.name) if exp else args.experiment
    experiment_id, parent = runs_of(name, exp.tracking.uri if exp else None)
    metric = f"{args.unit}_per_success"
    rows = child_rows(experiment_id, parent.info.run_id, metric)
    text = table(["", "run", "run id", "accuracy", metric, "tokens/success", "latency p50", "status"],
                 [["*" if r["pareto"] else "", r["name"], r["run_id"], r["accuracy"], r["cost"],
                   r["metrics"].get("tokens_per_success"), r["metrics"].get("latency_p50"),
                   r["stopped"] or r["status"]] for r in rows])
    if any(r["baseline"] for r in rows):
        text += "\nbaseline.*: a classical TF-IDF classifier on the same training split, no LM (0 tokens)"
    out.result(text + "\n* Pareto-optimal: no other run is both more accurate and cheaper per success."
               "\nExport one with: chainopt export RUN_ID --out FOLDER (the first 8 characters of its id will do), "
               f"or the best with: chainopt export best --experiment {args.experiment} --out FOLDER",
               [{k: v for k, v in r.items()} for r in rows])
    return 0


def cmd_export(args, out: Output) -> int:
    from optimize.export import export_run, pick_run
    from optimize.tracking import show_mlflow_chatter

    show_mlflow_chatter(args.verbose)  # "Successfully registered model …" and MLflow's warnings: with -v only
    run_id, uri = pick_run(args.run, args.experiment)
    manifest = export_run(run_id, Path(args.out), register=not args.no_register, uri=uri)
    reg = manifest.get("registered")
    out.result(f"exported run {run_id} to {args.out}: {manifest['program']['name']} on {manifest['model']['name']}, "
               f"accuracy {fmt(manifest['metrics'].get('accuracy'))}"
               + (f", f1 {fmt(manifest['metrics']['f1'])}" if "f1" in manifest["metrics"] else "")
               + (f"\nregistered as MLflow model {reg['name']} version {reg['version']}" if reg else "")
               + f"\nrun it with: chainopt predict {args.out} --input in.jsonl --output out.jsonl", manifest)
    return 0


def cmd_predict(args, out: Output) -> int:
    from optimize.export import EVAL_SLICE, predict_file

    source = Path(args.input) if args.input else Path(args.export) / EVAL_SLICE
    summary = predict_file(Path(args.export), source, Path(args.output), model_spec=args.model, force=args.force,
                           threads=args.threads)
    text = f"wrote {summary['n']} answers to {summary['output']}"
    if "accuracy" in summary:
        text += f"; accuracy {fmt(summary['accuracy'])} (exported run measured {fmt(summary['exported_accuracy'])})"
    if "f1" in summary:
        text += f"; f1 {fmt(summary['f1'])} (exported run measured {fmt(summary['exported_f1'])})"
    out.result(text, summary)
    return 0


def cmd_ui(args, out: Output) -> int:
    from optimize.interrupts import stop_on
    from optimize.tracking import tracking_uri
    from optimize.ui import start_ui, stop_ui

    uri = tracking_uri(args.uri)
    out.progress(f"starting the MLflow UI on {uri} ...")
    # The server runs in its own session, out of reach of the signals sent to us: kill or a closed
    # terminal must stop it through the same path as Ctrl-C.
    with stop_on(signal.SIGTERM, signal.SIGHUP):
        process, url = start_ui(uri, args.port)
        try:
            out.result(f"MLflow UI: {url}\n(store {uri}; Ctrl-C to stop)",
                       {"url": url, "tracking_uri": uri, "pid": process.pid})
            code = process.wait()
            print(f"chainopt: error: the MLflow server stopped by itself (exit code {code})", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            out.progress("stopping the MLflow UI")
            return 0
        finally:
            stop_ui(process)


def cmd_report(args, out: Output) -> int:
    from optimize.report import write_report

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    path, data = write_report(args.experiment, Path(args.output) if args.output else None, args.unit)
    best = next((r for r in data["runs"] if r["run_id"] == data["best_run_id"]), None)
    out.result(f"wrote {path}" + (f"\nbest run: {best['name']} (accuracy {fmt(best['accuracy'])})" if best else ""),
               {"path": str(path), "experiment": data["experiment"], "parent_run_id": data["parent_run_id"],
                "best_run_id": data["best_run_id"], "runs": len(data["runs"]), "unit": data["unit"]})
    return 0


def cmd_bench(args, out: Output) -> int:
    if args.child:  # one measurement of a parent `chainopt bench`, in this fresh process
        if not args.out:
            raise ConfigError("--child needs --out, the JSON file its parent reads")
        data = measure(args.child, args.workload, n=args.n, parallel=args.parallel, model=args.model, seed=args.seed)
        Path(args.out).write_text(json.dumps(data))
        return 0
    result = run_bench(args.workload, n=args.n, stock_limit=args.stock_limit,
                       paths=tuple(args.paths.split(",")) if args.paths else None, parallel=args.parallel,
                       model=args.model, seed=args.seed, timeout=args.timeout, progress=out.progress)
    out.result(format_table(result), result.as_dict())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chainopt", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tune DSPy programs on local GGUF models for the lowest cost per successful chain.",
        epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()))
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print machine-readable JSON")
    noise = common.add_mutually_exclusive_group()
    noise.add_argument("-q", "--quiet", action="store_true", help="no progress, only the result")
    noise.add_argument("-v", "--verbose", action="store_true", help="show library warnings and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common],
                           epilog=f"example:\n  {EXAMPLES[name]}", formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = add("run", cmd_run, "run (or resume) an experiment file and record it in MLflow")
    p.add_argument("experiment", help="experiment TOML file")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run the trials on a Ray cluster ([execution] backend = \"ray\"): `auto` joins the one "
                   "`ray start` began here, HOST:PORT or ray://HOST:10001 another; with no ADDRESS, a local one")
    p = add("eval", cmd_eval, "score one program on a dataset slice (zero-shot) and record it")
    p.add_argument("--program", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--train", type=int, default=0,
                   help="training examples a retrieval program (intent.retrieve) searches; default 0")
    add("validate", cmd_validate, "check an experiment file without running it").add_argument("experiment")
    add("datasets", cmd_datasets, "list the datasets").add_argument("action", choices=["list"])
    add("models", cmd_models, "list the embedded models").add_argument("action", choices=["list"])
    add("programs", cmd_programs, "list the programs").add_argument("action", choices=["list"])
    p = add("compare", cmd_compare, "table of an experiment's runs, cheapest per success first")
    p.add_argument("experiment", help="experiment TOML file or experiment name")
    p.add_argument("--unit", default="seconds", choices=["tokens", "seconds", "joules", "usd"])
    p = add("export", cmd_export, "export a finished run's compiled program with its manifest and register it")
    p.add_argument("run", metavar="RUN", help="a child run's id or a unique start of it (see chainopt compare), "
                   "or `best`: the experiment's most accurate LLM run, the cheapest per success among equals")
    p.add_argument("--experiment", help="experiment TOML file or name: whose best run (and whose [tracking] store "
                   "holds the run)")
    p.add_argument("--out", required=True, help="folder to write (must not exist or be empty)")
    p.add_argument("--no-register", action="store_true", help="skip the MLflow model registry")
    p = add("bench", cmd_bench, "measure the stock DSPy + llama.cpp paths against chainopt's engines, side by side")
    p.add_argument("--workload", default="banking77", choices=list(WORKLOADS))
    p.add_argument("--n", type=int, help="examples (default: the workload's)")
    p.add_argument("--stock-limit", type=int, help="run the slow stock rows on the first N examples only")
    p.add_argument("--paths", help=f"comma-separated rows among {','.join(PATHS)}")
    p.add_argument("--parallel", type=int, default=16, help="threads and batched sequences of chainopt rows")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seed", type=int, default=0, help="which examples (shuffle seed)")
    p.add_argument("--timeout", type=float, help="seconds allowed per row")
    # The bench's own children: each measures one row (or the rates) in a fresh process, into --out.
    p.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p = add("predict", cmd_predict, "run an exported program on new inputs (JSONL in, JSONL out)")
    p.add_argument("export", help="export folder")
    p.add_argument("--input", help="JSONL with the experiment's input columns ([data] inputs) or the program's input "
                   "names; default: the exported evaluation slice")
    p.add_argument("--output", required=True)
    p.add_argument("--model", help="model spec to use instead of the manifest's")
    p.add_argument("--force", action="store_true", help="run even if the model file's sha256 differs")
    p.add_argument("--threads", type=int, default=8)
    p = add("ui", cmd_ui, "open the MLflow web UI on the project's store (until Ctrl-C)")
    p.add_argument("--uri", help="tracking store; default: $MLFLOW_TRACKING_URI or ./mlflow.db")
    p.add_argument("--port", type=int, help="default: a free port")
    p = add("report", cmd_report, "write a self-contained HTML report of an experiment's latest run")
    p.add_argument("experiment", help="experiment TOML file or experiment name")
    p.add_argument("--output", help="HTML file to write; default: reports/<experiment>.html")
    p.add_argument("--unit", default="seconds", choices=["tokens", "seconds", "joules", "usd"],
                   help="cost unit for the Pareto mark and the best run")
    return parser


def _hush_libraries() -> None:
    """DSPy's optimizers log and draw tqdm bars of their own; chainopt reports progress itself
    (their prints are dropped by `main`)."""
    import logging

    import tqdm

    if not getattr(tqdm.tqdm.__init__, "chainopt_hushed", False):
        original = tqdm.tqdm.__init__

        def init(self, *args, **kwargs):
            kwargs["disable"] = True
            original(self, *args, **kwargs)

        init.chainopt_hushed = True
        tqdm.tqdm.__init__ = init
    import dspy  # noqa: F401  (it sets its loggers up at import; quiet them after)

    for name in ("dspy", "mlflow", "LiteLLM", "httpx", "alembic", "optuna"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.json:  # with a tracking server MLflow prints "View run at <url>" to stdout, breaking the JSON
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    if not args.verbose:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read by mlflow at import
        _hush_libraries()
    out = Output(args)
    try:
        # What libraries print (DSPy's teleprompters report every compile, and a KNN program compiles at
        # every call) is chatter: shown on stderr with -v, dropped otherwise; results go to out.stdout.
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(sys.stderr if args.verbose else devnull):
            return args.func(args, out)
    except ChainoptError as exc:
        if args.verbose:
            raise
        print(f"chainopt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # the reader went away (`chainopt compare | head`): nothing left to say
        sys.stderr = open(os.devnull, "w")
        return 0
    except OSError as exc:  # the machine, not the user's input: a full disk, a vanished folder
        if args.verbose:
            raise
        print(f"chainopt: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # run_experiment and predict_file close the models themselves (engine.closed_on_interrupt); this
        # covers every command: worker threads left inside their chains would keep the interpreter at exit.
        from optimize.llm.engine import close_engines

        close_engines()
        print("chainopt: interrupted; finished runs are kept, run the same command again to resume",
              file=sys.stderr)
        return 130
