"""`ghostpen`: serve completions, manage the models it serves, report on how they do."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from ghostpen.server.errors import ModelError, StoreUnavailable, TrainingError
from ghostpen.server.settings import ENGINES, Settings

OPEN_LOOP_SLOTS = 8  # KV slots of each llama-server under open-loop load: requests in flight

if TYPE_CHECKING:
    from ghostpen.benchmarks.load import LoadConfig
    from ghostpen.server.telemetry.store import Store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ghostpen", description=__doc__)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any setting (see server/settings.py), e.g. --set max_files=10",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the gRPC server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--metrics-port", type=int)
    serve.add_argument("--engine", choices=ENGINES)
    serve.add_argument("--model", help="a registry name, a .gguf file, or a Hugging Face directory")

    models = commands.add_parser("models", help="fetch, verify, list and convert models")
    actions = models.add_subparsers(dest="action", required=True)
    for action, text in (("fetch", "download, join and verify"), ("verify", "check the sha256")):
        sub = actions.add_parser(action, help=text)
        sub.add_argument("name", nargs="?")
    actions.add_parser("list", help="built-in models and the versions the flywheel made")
    promote = actions.add_parser(
        "promote", help="make a version the default, if it beats the current one held out"
    )
    promote.add_argument("name")
    promote.add_argument("--force", action="store_true", help="without evidence that it is better")
    promote.add_argument("--by", default=os.environ.get("USER", ""), help="who promotes it")
    convert = actions.add_parser("convert", help="GGUF -> Hugging Face checkpoint for vLLM")
    convert.add_argument("name", nargs="?", help="a registry name or a .gguf path")
    convert.add_argument("--out", type=Path)

    report = commands.add_parser("report", help="acceptance and retention from the telemetry store")
    report.add_argument("--since", help="ISO date or time (UTC), e.g. 2026-11-01")
    report.add_argument("--until", help="ISO date or time (UTC), exclusive")
    report.add_argument("--model", default="")
    report.add_argument(
        "--template", default="", help="a template id, e.g. qwen25-coder-repo-fim@v1"
    )
    report.add_argument("--language", default="")
    report.add_argument("--user", default="")
    report.add_argument("--team", default="")
    report.add_argument("--tenant", default="")
    report.add_argument("--format", choices=("html", "json", "csv"), default="html")
    report.add_argument("--out", type=Path, help="a file to write; default: standard output")

    tokens = commands.add_parser("tokens", help="per-user tokens: add, list, revoke")
    token_actions = tokens.add_subparsers(dest="action", required=True)
    add = token_actions.add_parser("add", help="a new token for a user, printed once")
    add.add_argument("user")
    add.add_argument("--team", default="")
    add.add_argument("--tenant", default="default")
    token_actions.add_parser("list", help="users and token ids (never the tokens)")
    revoke = token_actions.add_parser("revoke", help="a token by its id, or all of a user's")
    revoke.add_argument("who", help="a token id or a user")

    data = commands.add_parser("data", help="training data: export; captured text: delete")
    data_actions = data.add_subparsers(dest="action", required=True)
    export = data_actions.add_parser(
        "export", help="training samples from kept completions and a repository"
    )
    export.add_argument("--out", type=Path, required=True, help="a directory")
    export.add_argument(
        "--repo",
        type=Path,
        action="append",
        default=[],
        help="the team's own code, to cut samples from (again for each repository)",
    )
    export.add_argument(
        "--no-captures", action="store_true", help="leave out the captured completions"
    )
    export.add_argument("--samples", type=int, default=2000, help="cuts from each repository")
    export.add_argument("--min-retained", type=float, default=0.5, help="at 5 minutes, 0..1")
    export.add_argument("--heldout-files", type=float, default=0.1, help="files held out, 0..1")
    export.add_argument(
        "--heldout-recent", type=float, default=0.1, help="newest samples held out, 0..1"
    )
    export.add_argument(
        "--template", help="the prompt template to render in; default: the serving one"
    )
    export.add_argument("--seed", type=int, default=0)
    delete = data_actions.add_parser("delete", help="a tenant's captured text, or one user's")
    delete.add_argument("--tenant", required=True, help="a tenant; '*': every tenant")
    delete.add_argument("--user", help="only this user's")

    bench = commands.add_parser("bench", help="load: simulated developers typing real files")
    bench.add_argument("--sessions", type=int, default=4)
    bench.add_argument("--sweep", help="comma-separated session counts, e.g. 1,2,4,8,16,32,64")
    bench.add_argument("--duration", type=float, default=60.0, help="measured seconds per run")
    bench.add_argument("--warmup", type=float, default=5.0)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--files", type=Path, help="a directory of .py files to type")
    bench.add_argument("--engine", choices=ENGINES, default="auto")
    bench.add_argument(
        "--vs", choices=ENGINES, help="also run each point on this engine; report the ratios"
    )
    bench.add_argument("--save-result", type=Path, help="JSON here, a Markdown table beside it")
    bench.add_argument(
        "--llama-servers",
        type=int,
        default=0,
        help="serve through the remote engine from this many llama-servers it starts",
    )
    bench.add_argument(
        "--upstream-threads", type=int, default=0, help="compute threads of each; 0: cores / N"
    )
    loop = bench.add_argument_group(
        "open loop", "stateless Complete requests at a set rate (as `vllm bench serve`)"
    )
    loop.add_argument("--rate", type=float, help="requests per second ('inf': all at once)")
    loop.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1: Poisson")
    loop.add_argument("--requests", type=int, default=100)
    loop.add_argument("--max-tokens", type=int, default=24)
    loop.add_argument("--deadline-ms", type=int, default=10_000)
    loop.add_argument("--peers", default="", help="also run, on the same model: llama-cpp,vllm")
    loop.add_argument("--endpoint", default="", help="an OpenAI-compatible /v1 URL to measure")
    loop.add_argument("--endpoint-model", default="", help="the model name the endpoint serves")

    loop = commands.add_parser(
        "loop", help="the flywheel: export, tune, quantize, evaluate and register a version"
    )
    loop.add_argument("--name", required=True, help="the version to make, e.g. shop-2026-11")
    loop.add_argument(
        "--repo",
        type=Path,
        action="append",
        default=[],
        help="the team's own code (again for each repository)",
    )
    loop.add_argument("--no-captures", action="store_true", help="leave out kept completions")
    loop.add_argument("--base", help="the model to tune; default: the served one")
    loop.add_argument("--template", help="the prompt format; default: the serving one")
    loop.add_argument("--samples", type=int, default=2000, help="cuts from each repository")
    loop.add_argument("--minutes", type=float, help="of training; default 25")
    loop.add_argument("--steps", type=int, help="of training, at most")
    loop.add_argument(
        "--heldout", type=int, dest="heldout_samples", help="samples each model scores; default 600"
    )
    loop.add_argument("--lr", type=float, help="the tune's learning rate; default 5e-4")
    loop.add_argument(
        "--prompt-weight", type=float, help="loss weight of the prompt's own code; default 1"
    )
    loop.add_argument(
        "--lr-decay",
        action=argparse.BooleanOptionalAction,
        help="the rate falls to zero at --minutes or --steps (the default), or stays at its peak",
    )
    loop.add_argument("--top-layers", type=int, help="LoRA on the top N layers only; default all")
    loop.add_argument(
        "--batch-tokens", type=int, help="tokens an optimizer step reads; default 4096"
    )
    loop.add_argument("--rank", type=int, help="the adapter's rank (alpha twice it); default 64")
    loop.add_argument(
        "--train-prefix-tokens", type=int, help="cut training prompts' prefix window; default 256"
    )
    loop.add_argument(
        "--train-context-tokens", type=int, help="cut training prompts' context; default 160"
    )
    loop.add_argument("--note", default="")
    loop.add_argument("--seed", type=int, default=0)

    agent = commands.add_parser("agent", help="the editor agent: a language server (LSP)")
    agent.add_argument("--stdio", action="store_true", required=True, help="LSP over stdin/stdout")

    evaluate = commands.add_parser(
        "eval", help="completion quality on third-party code (pinned suites) or a local tree"
    )
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--suite", help="comma-separated suites of suites.toml, e.g. python,go")
    source.add_argument("--tree", type=Path, help="a local directory of source code")
    source.add_argument(
        "--compare", nargs=2, type=Path, metavar="RECORDS", help="two runs' records.jsonl"
    )
    evaluate.add_argument("--tasks", type=int, default=200, help="per suite (or for the tree)")
    evaluate.add_argument(
        "--function-tasks", type=int, default=0, help="Python function bodies run against tests"
    )
    evaluate.add_argument(
        "--kinds", default="line,rest_of_line,block", help="task kinds: line,rest_of_line,block"
    )
    evaluate.add_argument(
        "--variants",
        default="edit-distance,none",
        help="comma-separated; the first is the baseline (see benchmarks/eval/run.py)",
    )
    evaluate.add_argument(
        "--retrieval-only", action="store_true", help="no engine: recall@k of each variant"
    )
    evaluate.add_argument(
        "--needs-context",
        action="store_true",
        help="only the tasks whose expected text needs a definition another open file holds",
    )
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument(
        "--resume",
        action="store_true",
        help="keep the plan's records already in OUT and run only the rest",
    )
    evaluate.add_argument("--concurrency", type=int, default=8, help="completions in flight")
    evaluate.add_argument("--engine", choices=("auto", "llama.cpp", "vllm"))
    evaluate.add_argument("--out", type=Path, default=Path("eval-out"), help="a directory")

    prompt = commands.add_parser("prompts", help="prompt templates: list, show, diff, new")
    verbs = prompt.add_subparsers(dest="action", required=True)
    verbs.add_parser("list", help="built-in and registered versions")
    show = verbs.add_parser("show", help="a version's TOML, to edit into a new one")
    show.add_argument("template", help="name@vN, or name for its latest")
    compare = verbs.add_parser("diff", help="two versions, as a unified diff")
    compare.add_argument("before")
    compare.add_argument("after")
    make = verbs.add_parser("new", help="register an edited template as the next version")
    make.add_argument("name", help="a template's name (its next version) or a new one")
    make.add_argument("--from", dest="parent", required=True, help="the version it was made from")
    make.add_argument("--file", type=Path, required=True, help="its TOML; '-' for stdin")
    make.add_argument("--note", default="")
    make.add_argument("--by", default=os.environ.get("USER", ""), help="its author")
    experiment = commands.add_parser(
        "experiments", help="A/B arms on real traffic: start, stop, promote, list, report"
    )
    steps = experiment.add_subparsers(dest="action", required=True)
    begin = steps.add_parser("start", help="serve arms side by side; the first is the control")
    begin.add_argument("name")
    begin.add_argument(
        "--arm",
        action="append",
        required=True,
        help="name:weight[:template=ID,adapter=NAME,SETTING=VALUE,...]; at least two",
    )
    begin.add_argument("--note", default="")
    end = steps.add_parser("stop", help="end it: every session is served the default again")
    end.add_argument("name")
    winner = steps.add_parser("promote", help="make an arm the default, and end its experiment")
    winner.add_argument("name")
    winner.add_argument("arm")
    steps.add_parser("list", help="every experiment, and what was done to them, by whom")
    shown = steps.add_parser("report", help="per arm, with 95%% confidence sequences")
    shown.add_argument("name")
    shown.add_argument("--json", action="store_true")
    for command in (begin, end, winner):
        command.add_argument("--by", default=os.environ.get("USER", ""), help="who does it")

    again = commands.add_parser(
        "replay", help="accepted completions (captured with consent) re-run on a candidate arm"
    )
    again.add_argument(
        "--candidate", required=True, help="key=value,...: template, adapter, context settings"
    )
    again.add_argument("--control", default="", help="as --candidate; default: the default")
    again.add_argument("--limit", type=int, default=200, help="the most recent captures")
    again.add_argument("--json", action="store_true")

    tune = commands.add_parser("tune", help="LoRA fine-tune on samples: adapter, merged model")
    tune.add_argument("--data", type=Path, required=True, help="JSONL: prompt and target a line")
    tune.add_argument(
        "--heldout", type=Path, help="as --data, other files: the lowest loss's adapter is kept"
    )
    tune.add_argument("--heldout-every", type=int, help="steps between held-out losses")
    tune.add_argument("--out", type=Path, required=True, help="a directory a second run goes on in")
    tune.add_argument("--base", help="a registry name or a Hugging Face directory; default: model")
    tune.add_argument("--steps", type=int, help="in all, across runs; given alone, --minutes rules")
    tune.add_argument("--minutes", type=float, help="of this run; the step in progress finishes")
    tune.add_argument("--rank", type=int)
    tune.add_argument("--lr", type=float)
    tune.add_argument(
        "--prompt-weight", type=float, help="loss weight of the prompt's own code; 0: target only"
    )
    tune.add_argument(
        "--lr-decay",
        action=argparse.BooleanOptionalAction,
        help="the rate falls to zero at --minutes or --steps (the default), or stays at its peak",
    )
    tune.add_argument("--top-layers", type=int, help="LoRA on the top N layers only; 0: all")
    tune.add_argument("--max-seq-tokens", type=int, help="a sample's; its prompt is cut to fit")
    tune.add_argument("--batch-tokens", type=int, help="tokens an optimizer step reads")
    tune.add_argument("--seed", type=int)
    tune.add_argument("--dtype", choices=("auto", "bf16", "fp32"))
    tune.add_argument(
        "--gguf",
        action="store_true",
        help="also the model (Q4_K_M) and adapter as GGUF for llama.cpp",
    )

    args = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set)
    if args.command == "serve":
        for flag in ("host", "port", "metrics_port", "engine", "model"):
            if getattr(args, flag) is not None:
                overrides[flag] = str(getattr(args, flag))
    if args.command == "agent":
        from ghostpen.editor_client.agent import run_stdio

        run_stdio()
        return 0
    settings = Settings.load(overrides)
    if args.command == "serve" and "model" not in overrides and "GHOSTPEN_MODEL" not in os.environ:
        settings = _promoted(settings)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "serve":
            import uvloop

            from ghostpen.server.app import serve as run_server

            uvloop.run(run_server(settings))
            return 0
        if args.command == "report":
            return _report(args, settings)
        if args.command == "tokens":
            return _tokens(args, settings)
        if args.command == "data":
            return _data(args, settings)
        if args.command == "loop":
            return _loop(args, settings)
        if args.command == "tune":
            return _tune(args, settings)
        if args.command == "replay":
            return _replay(args, settings)
        if args.command == "experiments":
            return _experiments(args, settings)
        if args.command == "prompts":
            return _prompts(args, settings)
        if args.command == "eval":
            return _eval(args, settings)
        if args.command == "bench":
            if args.rate is not None or args.endpoint or args.peers:
                return _bench_open_loop(args, settings)
            return _bench(args, settings)
        return _models(args, settings)
    except (ModelError, TrainingError, StoreUnavailable) as error:
        print(f"ghostpen: {error}", file=sys.stderr)
        return 2


def _bench(args: argparse.Namespace, settings: Settings) -> int:
    import uvloop

    from ghostpen.benchmarks.load import (
        DEFAULT_FILES,
        LoadConfig,
        markdown,
        ratios,
        run_load,
        save,
        source_files,
    )
    from ghostpen.benchmarks.server_process import running_server

    counts = [int(n) for n in args.sweep.split(",")] if args.sweep else [args.sessions]
    files = source_files(args.files or DEFAULT_FILES)
    engines = [args.engine, *([args.vs] if args.vs else [])]
    runs: dict[str, list[dict[str, object]]] = {engine: [] for engine in engines}
    for sessions in counts:  # each point on every engine in turn: the same machine conditions
        config = LoadConfig(sessions, args.duration, files, args.seed, args.warmup)
        for engine in engines:
            if args.llama_servers:
                result = _remote_load(args, settings, config)
            else:
                with running_server("--engine", engine) as server:
                    result = uvloop.run(run_load(server, config))
            runs[engine].append({"engine": engine, **result})
            print(markdown(runs[engine][-1:]).splitlines()[-1], flush=True)
    for engine in engines:
        print(f"\n{engine}\n{markdown(runs[engine])}")
    if args.vs:
        print(f"\n{ratios(runs[args.engine], runs[args.vs], args.engine, args.vs)}")
    if args.save_result:
        for engine in engines:
            path = args.save_result
            save(runs[engine], path if engine == args.engine else path.with_stem(f"{path.stem}-vs"))
    return 0


def _remote_load(
    args: argparse.Namespace, settings: Settings, config: LoadConfig
) -> dict[str, object]:
    """One load point through the remote engine, from llama-servers started for it: a KV slot
    for every simulated developer on each, as ghostpen's own engine keeps one per session."""
    import uvloop

    from ghostpen.benchmarks.load import run_load
    from ghostpen.benchmarks.server_process import running_server

    with _upstreams(args, settings, slots=config.sessions) as upstreams:
        env = {"GHOSTPEN_UPSTREAMS": upstreams}
        with running_server("--engine", "remote", env=env) as server:
            return uvloop.run(run_load(server, config))


@contextlib.contextmanager
def _upstreams(args: argparse.Namespace, settings: Settings, slots: int) -> Iterator[str]:
    """`--llama-servers` llama-servers on the default model, as an `upstreams` setting."""
    from ghostpen.benchmarks.upstreams import llama_servers
    from ghostpen.server.model_store import resolve

    model = resolve(settings.engine.model, settings.cache_dir, want="gguf").path
    threads = args.upstream_threads or max(1, (os.cpu_count() or 1) // args.llama_servers)
    with llama_servers(args.llama_servers, model, settings.cache_dir, threads, slots) as servers:
        yield ",".join(server.url for server in servers)


def _bench_open_loop(args: argparse.Namespace, settings: Settings) -> int:
    if args.llama_servers:
        with _upstreams(args, settings, slots=OPEN_LOOP_SLOTS) as upstreams:
            return _open_loop(args, settings, upstreams)
    return _open_loop(args, settings, "")


def _open_loop(args: argparse.Namespace, settings: Settings, upstreams: str) -> int:
    from ghostpen.benchmarks.load import DEFAULT_FILES
    from ghostpen.benchmarks.open_loop import OpenLoopConfig, markdown, run_comparison

    config = OpenLoopConfig(
        tree=args.files or DEFAULT_FILES,
        requests=args.requests,
        rate=args.rate if args.rate is not None else 1.0,
        burstiness=args.burstiness,
        seed=args.seed,
        max_tokens=args.max_tokens,
        deadline_s=args.deadline_ms / 1000,
        engine="remote" if upstreams else args.engine,
        peers=tuple(peer for peer in args.peers.split(",") if peer),
        endpoint=args.endpoint,
        endpoint_model=args.endpoint_model,
        upstreams=upstreams,
    )
    results = run_comparison(config, settings)
    table = markdown(results)
    print(table)
    if args.save_result:
        args.save_result.parent.mkdir(parents=True, exist_ok=True)
        args.save_result.write_text(json.dumps(results, indent=2))
        args.save_result.with_suffix(".md").write_text(table + "\n")
    return 0


def _eval(args: argparse.Namespace, settings: Settings) -> int:
    from ghostpen.benchmarks.eval.harness import Plan, run_plan, variants_of
    from ghostpen.benchmarks.eval.report import compare, read_records
    from ghostpen.benchmarks.eval.suites import SuiteError

    if args.compare:
        rows = compare(read_records(args.compare[0]), read_records(args.compare[1]))
        print(json.dumps(rows, indent=2))
        return 0
    if args.engine:
        settings = dataclasses.replace(
            settings, engine=dataclasses.replace(settings.engine, engine=args.engine)
        )
    try:
        chosen = variants_of([spec for spec in args.variants.split(",") if spec])
    except ValueError as error:
        print(f"ghostpen eval: {error}", file=sys.stderr)
        return 2
    plan = Plan(
        suites=tuple(name for name in (args.suite or "").split(",") if name),
        tree=args.tree,
        tasks=args.tasks,
        function_tasks=args.function_tasks,
        kinds=tuple(args.kinds.split(",")),
        variants=chosen,
        seed=args.seed,
        concurrency=args.concurrency,
        retrieval_only=args.retrieval_only,
        needs_context=args.needs_context,
    )
    try:
        run_plan(plan, settings, args.out, args.resume)
    except (SuiteError, ValueError) as error:
        print(f"ghostpen eval: {error}", file=sys.stderr)
        return 2
    print((args.out / "report.md").read_text())
    return 0


def _tune(args: argparse.Namespace, settings: Settings) -> int:
    from ghostpen.server.errors import TrainingError
    from ghostpen.server.llama_cpp_build import LlamaCppBuild
    from ghostpen.server.training.quantize import adapter_to_gguf, to_gguf
    from ghostpen.server.training.tune import TuneConfig, tune

    options = (
        "steps", "minutes", "rank", "lr", "prompt_weight", "top_layers", "max_seq_tokens",
        "batch_tokens", "seed", "dtype", "heldout", "heldout_every", "lr_decay",
    )  # fmt: skip
    given = {name: getattr(args, name) for name in options if getattr(args, name) is not None}
    if args.minutes is not None and args.steps is None:
        given["steps"] = None  # bounded by time alone
    base = args.base or settings.engine.model
    try:
        result = tune(TuneConfig(args.data, args.out, base, settings.cache_dir, **given))
    except (TrainingError, ValueError) as error:
        print(f"ghostpen tune: {error}", file=sys.stderr)
        return 2
    print(result.merged_dir)
    if args.gguf:
        build = LlamaCppBuild.at(settings.cache_dir)
        print(to_gguf(result.merged_dir, args.out / "model-q4_k_m.gguf", build))
        print(
            adapter_to_gguf(result.adapter_dir, result.base_dir, args.out / "adapter.gguf", build)
        )
    return 0


def _report(args: argparse.Namespace, settings: Settings) -> int:
    from ghostpen.server.telemetry.report import (
        ReportFilter,
        build_report,
        to_csv,
        to_html,
        to_json,
    )

    chosen = ReportFilter(
        since_ms=_unix_ms(args.since) if args.since else 0,
        until_ms=_unix_ms(args.until) if args.until else ReportFilter.until_ms,
        model=args.model,
        template=args.template,
        language=args.language,
        user=args.user,
        team=args.team,
        tenant=args.tenant,
    )
    with _store(settings) as store:
        report = build_report(store, chosen)
    text = {"html": to_html, "json": to_json, "csv": to_csv}[args.format](report)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
        print(args.out)
    else:
        sys.stdout.write(text)
    return 0


def _tokens(args: argparse.Namespace, settings: Settings) -> int:
    from ghostpen.server.auth import TokenFile

    tokens = TokenFile.at(settings.auth, settings.cache_dir)
    if args.action == "add":
        token, entry = tokens.add(args.user, args.team, args.tenant)
        print(f"token {entry.token_id} for {entry.user} (kept as its hash in {tokens.path}):")
        print(token)
        return 0
    if args.action == "revoke":
        gone = tokens.revoke(args.who)
        if not gone:
            print(f"ghostpen: no token or user {args.who!r} in {tokens.path}", file=sys.stderr)
            return 1
        for entry in gone:
            print(f"revoked {entry.token_id} ({entry.user})")
        return 0
    print(f"{'id':8}  {'user':16}  {'team':16}  {'tenant':12}  created")
    for entry in tokens.entries():
        print(
            f"{entry.token_id:8}  {entry.user:16}  {entry.team:16}  {entry.tenant:12}  "
            f"{entry.created}"
        )
    return 0


def _data(args: argparse.Namespace, settings: Settings) -> int:

    with _store(settings) as store:
        if args.action == "delete":
            since_ms = int(datetime.now(UTC).timestamp() * 1000)
            texts, corrections = store.delete_captured(args.tenant, args.user)
            print(f"deleted {texts} completions' text and {corrections} corrections")
            forgotten = "SELECT path FROM exports WHERE forgotten_ms >= ? ORDER BY path"
            for (path,) in store.query(forgotten, (since_ms,)):
                print(f"deleted the export holding it: {path}")
            return 0
        return _export(args, settings, store)


def _export(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    from ghostpen.context.template import load_template
    from ghostpen.server.training.export import ExportConfig, export

    if args.no_captures and not args.repo:
        print(
            "ghostpen: nothing to export: give --repo, or leave out --no-captures", file=sys.stderr
        )
        return 2
    config = ExportConfig(
        out=args.out,
        template=load_template(args.template or settings.context.template),
        context=settings.context,
        min_retained=args.min_retained,
        repo_samples=args.samples,
        heldout_files=args.heldout_files,
        heldout_recent=args.heldout_recent,
        seed=args.seed,
    )
    manifest = export(config, None if args.no_captures else store, args.repo)
    print(json.dumps({k: manifest[k] for k in ("counts", "dropped", "privacy", "hash")}, indent=2))
    print(f"wrote {args.out}/train.jsonl, heldout.jsonl and manifest.json")
    return 0


def _prompts(args: argparse.Namespace, settings: Settings) -> int:
    from ghostpen.server import prompts
    from ghostpen.server.errors import InvalidInput

    with _store(settings) as store:
        try:
            if args.action == "show":
                print(prompts.version(store, args.template).content, end="")
            elif args.action == "diff":
                print(prompts.diff(store, args.before, args.after), end="")
            elif args.action == "new":
                text = sys.stdin.read() if str(args.file) == "-" else args.file.read_text()
                made = prompts.new(store, args.name, args.parent, text, args.by, args.note)
                print(f"registered {made.template_id} ({made.content_hash})")
            else:
                for v in prompts.listed(store):
                    made = "built-in" if v.builtin else f"from {v.parent} by {v.author or '-'}"
                    print(f"{v.template.template_id}\t{v.template.content_hash}\t{made}\t{v.note}")
        except InvalidInput as error:
            print(f"ghostpen prompts: {error}", file=sys.stderr)
            return 2
    return 0


def _experiments(args: argparse.Namespace, settings: Settings) -> int:
    from ghostpen.server import experiments
    from ghostpen.server.errors import InvalidInput
    from ghostpen.server.telemetry.arms_report import arms_report, to_text

    with _store(settings) as store:
        try:
            if args.action == "start":
                arms = tuple(experiments.parse_arm(text) for text in args.arm)
                adapters = settings.engine.adapter_paths()
                experiments.start(store, args.name, arms, args.by, adapters, args.note)
                print(
                    f"started {args.name}: servers serve its arms within "
                    f"{settings.telemetry.experiment_refresh_s:g} s"
                )
            elif args.action == "stop":
                experiments.stop(store, args.name, args.by)
                print(f"stopped {args.name}")
            elif args.action == "promote":
                arm = experiments.promote(store, args.name, args.arm, args.by)
                print(f"the default is now {args.name}/{arm.name}: {arm}")
            elif args.action == "report":
                report = arms_report(store, args.name)
                print(json.dumps(report, indent=2) if args.json else to_text(report), end="")
            else:
                for experiment in experiments.listed(store):
                    arms = ", ".join(f"{a.name}:{a.weight:g}" for a in experiment.arms)
                    print(f"{experiment.name}\t{experiment.status}\t{arms}\t{experiment.note}")
                for action in experiments.actions(store):
                    when = datetime.fromtimestamp(action.at_ms / 1000, UTC).isoformat(
                        "T", "seconds"
                    )
                    print(f"  {when} {action.actor or '-'} {action.action} {action.experiment}")
        except InvalidInput as error:
            print(f"ghostpen experiments: {error}", file=sys.stderr)
            return 2
    return 0


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from ghostpen.server import replay
    from ghostpen.server.engines.factory import start_in_process
    from ghostpen.server.errors import InvalidInput
    from ghostpen.server.experiments import parse_arm

    async def run(store: Store) -> dict[str, object]:
        candidate = parse_arm(f"candidate:1:{args.candidate}")
        control = parse_arm(f"control:1:{args.control}")
        chosen = replay.arms(store, settings, candidate, control)  # told before the model loads
        engine = await start_in_process(settings.engine, settings.cache_dir)
        try:
            return await replay.replay(engine, settings, store, chosen, args.limit)
        finally:
            await engine.close()

    with _store(settings) as store:
        try:
            report = asyncio.run(run(store))
        except InvalidInput as error:
            print(f"ghostpen replay: {error}", file=sys.stderr)
            return 2
    print(json.dumps(report, indent=2) if args.json else replay.to_text(report), end="")
    return 0


@contextlib.contextmanager
def _store(settings: Settings) -> Iterator[Store]:
    """The telemetry database, open for one command."""
    from ghostpen.server.telemetry.store import Store

    store = Store.open(settings.telemetry.database, settings.cache_dir)
    try:
        yield store
    finally:
        store.close()


def _unix_ms(moment: str) -> int:
    parsed = datetime.fromisoformat(moment)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


def _models(args: argparse.Namespace, settings: Settings) -> int:
    from ghostpen.server import model_store

    name = getattr(args, "name", None) or settings.engine.model
    cache = settings.cache_dir
    if args.action == "fetch":
        print(model_store.fetch(name, cache))
    elif args.action == "verify":
        model = model_store.REGISTRY.get(name)
        if model is None:
            raise ModelError(
                f"unknown model {name!r}; the registry has: {', '.join(model_store.REGISTRY)}"
            )
        model_store.verify(model, model_store.models_dir(cache) / model.filename)
        print(f"{name}: sha256 {model.sha256} OK")
    elif args.action == "list":
        _list_models(settings)
    elif args.action == "promote":
        return _promote(args, settings)
    else:
        if name in model_store.REGISTRY:
            gguf = model_store.fetch(name, cache)
            out = args.out or model_store.converted_dir(cache, name)
        else:
            gguf = Path(name)
            out = args.out or gguf.with_suffix("")
        print(model_store.convert(gguf, out))
    return 0


def _list_models(settings: Settings) -> None:
    from ghostpen.server import model_store
    from ghostpen.server.training import registry

    cache = settings.cache_dir
    with _store(settings) as store:
        versions, default = registry.versions(store), registry.default(store)
    default = default or settings.engine.model
    for model in model_store.REGISTRY.values():
        path = model_store.models_dir(cache) / model.filename
        converted = model_store.converted_dir(cache, model.name)
        print(
            f"{model.name}{'  (default)' if model.name == default else ''}"
            f"\n  gguf: {path if path.is_file() else 'not fetched'}"
            f"\n  hf:   {converted if converted.is_dir() else 'not converted'}"
            f"\n  from: {model.source}"
        )
    for version in versions:
        scores = json.loads(version.scores)
        similarity = scores.get("similarity", {})
        made = datetime.fromtimestamp(version.created_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")
        print(
            f"{version.name}{'  (default)' if version.name == default else ''}"
            f"\n  {version.kind} tuned from {version.base} on data {version.data_hash[:12]}, "
            f"{version.steps} steps, {version.train_tokens} tokens, {version.quantization}, "
            f"template {version.template or settings.context.template}, {made} UTC"
            f"\n  held out vs {scores.get('against', '?')} ({scores.get('samples', 0)} samples): "
            f"edit similarity {similarity.get('mean', 0):+.3f} "
            f"(95% CI {similarity.get('low', 0):+.3f} to {similarity.get('high', 0):+.3f})"
            f"\n  gguf: {version.path}" + (f"\n  note: {version.note}" if version.note else "")
        )


def _promote(args: argparse.Namespace, settings: Settings) -> int:
    from ghostpen.context.template import load_template
    from ghostpen.server.training import registry
    from ghostpen.server.training.export import read_samples
    from ghostpen.server.training.loop import Contender, drawn, measure

    with _store(settings) as store:
        version = registry.get(store, args.name)
        current = registry.default(store) or settings.engine.model
        evidence: dict = {}
        if version is not None:
            scores = json.loads(version.scores)
            if scores.get("against") == current:
                evidence = scores
            else:  # measured against another model: measure against this one
                folder = registry.version_dir(settings.cache_dir, args.name)
                heldout = read_samples(folder / "data" / "heldout.jsonl")
                heldout = drawn(heldout, scores["samples"], 0)
                served = (
                    Contender(name, name, load_template(
                        registry.template_of(store, name, settings.context.template)
                    ))
                    for name in (current, args.name)
                )  # fmt: skip
                evidence = measure(settings, *served, heldout)
        why_not = registry.decide(evidence) if evidence else "no held-out comparison"
        if why_not and not args.force:
            print(
                f"ghostpen: {args.name} is not promoted over {current}: {why_not} "
                "(--force promotes it anyway)",
                file=sys.stderr,
            )
            return 1
        registry.promote(store, args.name, args.by, bool(why_not), evidence)
    print(f"{args.name} is the default" + (f" (forced: {why_not})" if why_not else ""))
    return 0


def _promoted(settings: Settings) -> Settings:
    """The settings with the promoted version as the model (models promote), in the template
    it was tuned in."""
    from ghostpen.server.training import registry

    with _store(settings) as store:
        chosen = registry.default(store)
        if chosen is None:
            return settings
        template = registry.template_of(store, chosen, settings.context.template)
    return dataclasses.replace(
        settings,
        engine=dataclasses.replace(settings.engine, model=chosen),
        context=dataclasses.replace(settings.context, template=template),
    )


def _train_budgets(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """The (prefix, context) tokens of a training prompt, where either is given."""
    from ghostpen.server.training.loop import TRAIN_BUDGETS

    prefix, context = args.train_prefix_tokens, args.train_context_tokens
    if prefix is None and context is None:
        return {}
    return {
        "train_budgets": (
            TRAIN_BUDGETS[0] if prefix is None else prefix,
            TRAIN_BUDGETS[1] if context is None else context,
        )
    }


def _loop(args: argparse.Namespace, settings: Settings) -> int:
    from ghostpen.server.training.loop import LoopConfig, run_loop

    served = _promoted(settings)
    recipe = (
        "minutes", "heldout_samples", "lr", "lr_decay", "prompt_weight", "top_layers",
        "batch_tokens", "rank",
    )  # fmt: skip
    try:
        config = LoopConfig(
            name=args.name,
            base=args.base or served.engine.model,
            repos=tuple(args.repo),
            captures=not args.no_captures,
            template=args.template or served.context.template,
            repo_samples=args.samples,
            steps=args.steps,
            seed=args.seed,
            note=args.note,
            **_train_budgets(args),
            **{name: getattr(args, name) for name in recipe if getattr(args, name) is not None},
        )
    except ValueError as error:
        print(f"ghostpen loop: {error}", file=sys.stderr)
        return 2
    with _store(settings) as store:
        run_loop(config, settings, store, lambda line: print(line, flush=True))
    return 0
