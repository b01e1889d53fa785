"""The `llamaship` command: run the stack, make the demo model, compile, generate, list models."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import grpc

from llamaship import cli_gc
from shared import config
from llamaship.cli_up import cmd_up
from llamaship.client import DEFAULT_GATEWAY, GatewayClient

RECIPES = ("fp32", "fp16", "int8", "int4", "hybrid-int8", "hybrid-int4", "auto")


def _fail(message: str) -> int:
    print(f"llamaship: {message}", file=sys.stderr)
    return 1


def _rpc_error(exc: grpc.RpcError) -> int:
    return _fail(f"{exc.code().name}: {exc.details()}")


def _client(args: argparse.Namespace) -> GatewayClient:
    return GatewayClient(args.gateway, api_key=args.api_key, tls_ca=args.tls_ca)


def cmd_keys(args: argparse.Namespace) -> int:
    from gateway.auth import KeysFileError, create_key

    try:
        key = create_key(args.file, args.tenant, [x for x in args.scopes.split(",") if x])
    except KeysFileError as exc:
        return _fail(str(exc))
    scopes = ",".join(sorted({x for x in args.scopes.split(",") if x}))
    print(f"API key for tenant {args.tenant} (scopes {scopes}); shown once, stored hashed in {args.file}:")
    print(key)
    return 0


def cmd_make_model(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from llamaship.demo_model import STAMP, DemoModelSpec, make_model

    spec = DemoModelSpec()
    out = Path(args.dir)
    bar = None

    def progress(step: int, total: int, loss: float) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="training demo model", unit="step")
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    t0 = time.time()
    make_model(out, spec, force=args.force, progress=progress)
    if bar is not None:
        bar.close()
        print(f"made {out} in {time.time() - t0:.0f}s")
    else:
        print(f"{out} already holds the demo model ({STAMP}); --force remakes it")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2

    bar = tqdm(total=100, desc="queued", unit="%", bar_format="{desc:<40} {bar} {n:.0f}%")
    stage_weight = {"validate": (0, 2), "hash": (2, 8), "auto": (10, 0), "build": (10, 55), "configure": (65, 2), "verify": (67, 5),
                    "profile": (72, 8), "quality": (80, 12), "publish": (92, 8), "done": (100, 0)}

    def on_update(job: compiler_pb2.CompileJob) -> None:
        start, span = stage_weight.get(job.stage, (bar.n, 0))
        bar.n = min(100, start + span * job.progress)
        bar.set_description_str(f"{job.stage}: {job.message}"[:40])
        bar.refresh()

    if bool(args.dir) == bool(args.hub):
        return _fail("give a checkpoint directory or --hub ORG/NAME (one of them)")
    if args.upload and not args.dir:
        return _fail("--upload needs the local checkpoint directory")
    try:
        with _client(args) as client:
            source: dict = {"hub_id": args.hub} if args.hub else {}
            checkpoint = "" if args.hub else str(Path(args.dir).resolve())
            if args.upload:
                up = tqdm(desc="upload", unit="B", unit_scale=True)

                def shown(done: int, total: int) -> None:
                    up.total, up.n = total, done
                    up.refresh()

                state = client.upload(checkpoint, on_progress=shown)
                up.close()
                source, checkpoint = {"upload_id": state.upload_id}, ""
            job = client.compile(checkpoint, args.name, args.recipe, args.pool,
                                 on_update=on_update, wait_served=False,
                                 max_sequence_length=args.max_seq_len, max_batch=args.max_batch,
                                 quality=_quality_gate(args), allow_pickle=args.allow_pickle, **source)
            if job.state == compiler_pb2.JOB_STATE_SUCCEEDED:
                bar.set_description_str("waiting for a replica to serve it")
                bar.refresh()
                client.wait_served(args.name, job.build_id, timeout_s=args.serve_timeout)
    except grpc.RpcError as exc:
        bar.close()
        return _rpc_error(exc)
    except TimeoutError as exc:
        bar.close()
        return _fail(str(exc))
    bar.close()
    if job.state != compiler_pb2.JOB_STATE_SUCCEEDED:
        return _fail(f"compile {compiler_pb2.JobState.Name(job.state).removeprefix('JOB_STATE_').lower()}: {job.message}")
    print(f"{args.name} = build {job.build_id} ({args.recipe}{', reused' if job.reused else ''}) is served")
    return 0


def _quality_gate(args: argparse.Namespace):
    from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2

    gate = compiler_pb2.QualityGate(force_publish=args.force_publish, sampled_prompts_of=args.sampled_prompts_of or "")
    for name in ("min_top1_agreement", "max_mean_kl", "max_perplexity_increase_pct"):
        if getattr(args, name) is not None:
            setattr(gate, name, getattr(args, name))
    if args.eval_prompts:
        with open(args.eval_prompts) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        gate.eval_prompts.append(json.loads(line)["prompt"])
                    except (ValueError, KeyError, TypeError):
                        raise SystemExit(f"llamaship: {args.eval_prompts}:{n}: expected a JSON object with a "
                                         "\"prompt\" string per line") from None
    return gate


def cmd_builds_show(args: argparse.Namespace) -> int:
    from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2

    try:
        with _client(args) as client:
            info = client.stub.GetBuild(compiler_pb2.GetBuildRequest(build_id=args.build_id), timeout=30)
    except grpc.RpcError as exc:
        return _rpc_error(exc)
    if args.json:
        print(info.manifest_json)
        return 0
    q = info.quality
    print(f"build {info.build_id}: {info.model_name}, recipe {info.recipe}, pool {info.target_pool}, "
          f"{info.total_bytes / 1e6:.1f} MB, context {info.context_length}, max batch {info.max_batch}")
    if q.skipped_reason:
        print(f"quality gate: not run: {q.skipped_reason}")
    else:
        verdict = "passed" if q.passed else "FAILED" + (" (published anyway: forced)" if q.forced else "")
        print(f"quality gate: {verdict} on {q.prompts} {q.prompt_source} prompts ({q.tokens} positions)")
        print(f"  top-1 agreement  {q.top1_agreement:.4f}  (min {q.min_top1_agreement:.4f})")
        print(f"  mean KL          {q.mean_kl:.5f} (max {q.max_mean_kl:.5f})")
        inc = 100 * (q.perplexity_build / q.perplexity_reference - 1) if q.perplexity_reference else 0.0
        print(f"  perplexity       {q.perplexity_reference:.3f} -> {q.perplexity_build:.3f} ({inc:+.2f}%, "
              f"max +{q.max_perplexity_increase_pct:.2f}%)")
        print(f"  max |Δlogit|     {q.max_abs_logit_diff:.4f}")
        for f in q.failures:
            print(f"  failed: {f}")
    profile = json.loads(info.manifest_json).get("profile") or {}
    summary, load = profile.get("summary"), profile.get("load")
    if profile.get("skipped"):
        print(f"profile: not run: {profile['skipped']}")
    if summary:
        print(f"profile: prefill {summary['prefill_ms']} ms ({summary['prompt_tokens']} tokens), decode step "
              f"{summary['decode_step_ms_median']} ms (median of {summary['decode_steps']}); attention "
              f"{100 * summary['attention_share']:.1f}% of kernel time")
        print(f"  fused: {', '.join(summary['fused_ops']) or 'none'}; rotary: {summary['rotary']}")
        for op, d in list(summary["per_op"].items())[:6]:
            print(f"  {op:<34} {d['us'] / 1000:9.2f} ms {100 * d['share']:5.1f}%  ({d['calls']} calls)")
        for w in summary["warnings"]:
            print(f"  warning: {w}")
    if load:
        print(f"graph: {load['shipped']}; load {load['load_s_original'] * 1000:.0f} ms original, "
              f"{load['load_s_optimized'] * 1000:.0f} ms optimized")
    return 0


def cmd_sampling(args: argparse.Namespace) -> int:
    from shared.proto_gen.llamaship.gateway.v1 import gateway_pb2

    try:
        with _client(args) as client:
            if args.enable or args.disable:
                s = client.stub.SetPromptSampling(gateway_pb2.PromptSampling(
                    model=args.model, enabled=bool(args.enable), rate=args.rate or 0, max_prompts=args.max_prompts or 0,
                    max_chars=args.max_chars or 0, clear=args.clear), timeout=30)
            else:
                s = client.stub.GetPromptSampling(gateway_pb2.GetPromptSamplingRequest(model=args.model), timeout=30)
    except grpc.RpcError as exc:
        return _rpc_error(exc)
    print(f"{s.model}: sampling {'on' if s.enabled else 'off'} (rate {s.rate:g}, at most {s.max_prompts} prompts of "
          f"{s.max_chars} characters); {s.kept} kept of {s.seen} seen")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    options = {}
    if args.temperature is not None:
        options["temperature"] = args.temperature
    if args.top_p is not None:
        options["top_p"] = args.top_p
    if args.top_k is not None:
        options["top_k"] = args.top_k
    if args.seed is not None:
        options["seed"] = args.seed
    if args.stop:
        options["stop"] = args.stop
    if args.request_id:
        options["request_id"] = args.request_id
    if args.priority == "batch":
        from shared.proto_gen.llamaship.gateway.v1 import gateway_pb2

        options["priority"] = gateway_pb2.PRIORITY_BATCH
    try:
        with _client(args) as client:
            if not args.quiet:
                sys.stdout.write(args.prompt)
            out = client.generate(args.model, args.prompt, args.max_tokens,
                                  on_text=None if args.quiet else (lambda t: (sys.stdout.write(t), sys.stdout.flush())),
                                  **options)
    except grpc.RpcError as exc:
        print()
        return _rpc_error(exc)
    if args.quiet:
        sys.stdout.write(out.text)
    print()
    if args.stats:
        print(f"[{out.completion_tokens} tokens, finish {out.finish_reason}, build {out.build_id}, "
              f"time to first token {out.time_to_first_token_s * 1000:.1f} ms, "
              f"decode {out.decode_tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    return 0


def _readers(m) -> str:
    readers = list(m.readers)
    return "every tenant" if "*" in readers else ", ".join(readers) or "owner only"


def cmd_models(args: argparse.Namespace) -> int:
    if args.models_command == "access":
        return _models_access(args)
    if args.models_command == "delete":
        return _models_delete(args)
    try:
        with _client(args) as client:
            models = client.models()
    except grpc.RpcError as exc:
        return _rpc_error(exc)
    if not models:
        print("no models published yet (llamaship compile DIR --name N --recipe R)")
        return 0
    print(f"{'NAME':<20} {'BUILD':<22} {'RECIPE':<12} {'POOL':<5} {'CONTEXT':>7}  {'OWNER':<12} {'READERS':<16} SERVED BY")
    for m in models:
        # replicas are listed for admin keys only; other keys see which builds are served
        reps = ", ".join(f"{r.replica_id}@{r.address}" + ("" if r.build_id == m.build_id else f" (still {r.build_id})")
                         for r in m.replicas)
        if not reps:
            reps = "replicas serving " + ", ".join(m.served_build_ids) if m.served_build_ids else "none"
        print(f"{m.name:<20} {m.build_id:<22} {m.recipe:<12} {m.pool:<5} {m.context_length:>7}  "
              f"{m.owner or '(admins)':<12} {_readers(m):<16} {reps}")
    return 0


def _models_access(args: argparse.Namespace) -> int:
    readers = ["*"] if args.public else [] if args.private else \
        [t.strip() for t in args.allow.split(",") if t.strip()] if args.allow is not None else None
    try:
        with _client(args) as client:
            if readers is None:
                found = [m for m in client.models() if m.name == args.name]
                if not found:
                    return _fail(f"NOT_FOUND: model {args.name!r} not found")
                owner, shown = found[0].owner, _readers(found[0])
            else:
                access = client.set_model_access(args.name, readers)
                owner, shown = access.owner, _readers(access)
    except grpc.RpcError as exc:
        return _rpc_error(exc)
    print(f"{args.name}: owner {owner or '(admins)'}; may generate: the owner, admins and {shown}")
    return 0


def _models_delete(args: argparse.Namespace) -> int:
    try:
        with _client(args) as client:
            client.delete_model(args.name)
    except grpc.RpcError as exc:
        return _rpc_error(exc)
    print(f"{args.name} deleted: no longer served (its builds stay in the store)")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    try:
        with _client(args) as client:
            found = client.cancel(args.request_id)
    except grpc.RpcError as exc:
        return _rpc_error(exc)
    print(f"{args.request_id}: {'cancelled' if found else 'not running (unknown, finished, or not yours)'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from llamaship.demo import run_demo

    return run_demo(Path(args.workdir), args.recipe, args.prompt, args.max_tokens)


def cmd_bench(args: argparse.Namespace) -> int:
    from llamaship.bench import main as bench_main

    if args.update_readme is None:  # the README's section is the default set's: --models runs leave it alone
        args.update_readme = not args.quick and not args.models
    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamaship", description="Llama checkpoints to production on ONNX Runtime.")
    sub = parser.add_subparsers(dest="command", required=True)

    def client_parser(name: str, help: str, parent=None, default=None) -> argparse.ArgumentParser:
        # default=argparse.SUPPRESS on a sub-subcommand keeps options given before its name
        p = (parent or sub).add_parser(name, help=help, description=help)
        p.add_argument("--gateway", metavar="HOST:PORT", default=default,
                       help=f"gateway address [env LLAMASHIP_GATEWAY; default {DEFAULT_GATEWAY}]")
        p.add_argument("--api-key", default=default, help="API key [env LLAMASHIP_API_KEY]")
        p.add_argument("--tls-ca", default=default, metavar="PEM", help="CA certificate: talk TLS [env LLAMASHIP_TLS_CA]")
        return p

    p = sub.add_parser("up", help="run the whole stack on this machine until Ctrl-C",
                       description="Start Redis (embedded unless --redis-url), the compiler, cpu serving replica(s) and "
                                   "the gateway as processes on loopback; stop them all on Ctrl-C or SIGTERM.")
    p.add_argument("--gateway-port", type=int, default=50051)
    p.add_argument("--http-port", type=int, default=0,
                   help="serve the OpenAI-compatible HTTP API (/v1/chat/completions, ...) on this port too (default: off)")
    p.add_argument("--compiler-port", type=int, default=0, help="default: any free port")
    p.add_argument("--serving-port", type=int, default=0,
                   help="first replica's port, the next ones follow it (default: any free ports)")
    p.add_argument("--replicas", type=int, default=1, help="cpu serving replicas to start")
    p.add_argument("--slots", type=int, default=4, help="concurrent requests per replica")
    p.add_argument("--store", default="./llamaship-store",
                   help="shared build store: a directory, or s3://bucket/prefix (AWS_* environment; "
                        "LLAMASHIP_STORE_CACHE_DIR and the other store_* settings pass through)")
    config.add_arguments(p, config.REDIS)  # a Redis given (URL, cluster or sentinels): no embedded one
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--log-dir", default="./.llamaship/logs")
    p.add_argument("--api-keys-file", default=None, help="require API keys from this file (llamaship keys create)")
    p.add_argument("--allow-open", action="store_true",
                   help="serve without API keys on a non-loopback --host (by default that is refused)")
    p.add_argument("--tls-cert-file", default=None, help="serve the gateway over TLS with this PEM certificate chain")
    p.add_argument("--tls-key-file", default=None, help="the TLS certificate's PEM private key")
    config.add_arguments(p, config.INTERNAL_TLS[:3])  # service-to-service mTLS
    p.add_argument("--internal-tls-generate", action="store_true",
                   help="mTLS between the stack's services with a throwaway CA made now (in <log-dir>/../internal-tls)")
    p.add_argument("--max-restarts", type=int, default=5,
                   help="a service that crashed this often within --restart-window-s is given up on")
    p.add_argument("--restart-window-s", type=float, default=120.0)
    p.add_argument("-v", "--verbose", action="store_true", help="echo service logs to the terminal")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("keys", help="manage API keys (stored hashed)")
    ksub = p.add_subparsers(dest="keys_command", required=True)
    k = ksub.add_parser("create", help="create a key for a tenant and print it once")
    k.add_argument("tenant")
    k.add_argument("--scopes", default="generate", help="comma-separated: generate, compile, admin")
    k.add_argument("--file", default="./llamaship-keys.json", help="keys file the gateway reads (--api-keys-file)")
    k.set_defaults(func=cmd_keys)

    p = sub.add_parser("make-model", help="write the small demo Llama checkpoint (cached)",
                       description="Train a small LlamaForCausalLM (grouped-query attention, byte-level BPE "
                                   "tokenizer) on Python's standard-library sources; deterministic and cached.")
    p.add_argument("dir")
    p.add_argument("--force", action="store_true", help="remake even if DIR already holds it")
    p.set_defaults(func=cmd_make_model)

    p = client_parser("compile", "compile a checkpoint, publish it, and wait until it is served")
    p.add_argument("dir", nargs="?", default=None,
                   help="checkpoint directory visible to the compiler (with --upload: a local directory to upload)")
    p.add_argument("--hub", default=None, metavar="ORG/NAME[@REV]", help="fetch the checkpoint from the Hugging Face hub")
    p.add_argument("--upload", action="store_true",
                   help="upload DIR through the gateway into the shared store first (resumable), then compile it")
    p.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt weights where there are no safetensors")
    p.add_argument("--name", required=True, help="model name to publish under")
    p.add_argument("--recipe", default="fp32", choices=RECIPES)
    p.add_argument("--pool", default="cpu", help="target hardware pool (cpu, cuda)")
    p.add_argument("--max-seq-len", type=int, default=0, help="context limit (default 4096, capped by the model)")
    p.add_argument("--max-batch", type=int, default=0, help="max batch (default 32)")
    p.add_argument("--serve-timeout", type=float, default=120.0)
    g = p.add_argument_group("quality gate (defaults per recipe; see README)")
    g.add_argument("--min-top1-agreement", dest="min_top1_agreement", type=float, default=None)
    g.add_argument("--max-mean-kl", dest="max_mean_kl", type=float, default=None)
    g.add_argument("--max-perplexity-increase-pct", dest="max_perplexity_increase_pct", type=float, default=None)
    g.add_argument("--eval-prompts", default=None, metavar="JSONL",
                   help='evaluation prompts, one {"prompt": "..."} per line (default: a built-in set)')
    g.add_argument("--sampled-prompts-of", default=None, metavar="MODEL",
                   help="calibrate and gate on the prompts the gateway sampled for MODEL (llamaship sampling)")
    g.add_argument("--force-publish", action="store_true", help="publish even if the build fails the gate")
    p.set_defaults(func=cmd_compile)

    p = client_parser("generate", "stream a completion")
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--request-id", default=None, help="an id to cancel the request by (llamaship cancel)")
    p.add_argument("--priority", choices=("interactive", "batch"), default="interactive",
                   help="batch requests wait while interactive ones of the pool are queued")
    p.add_argument("--stats", action="store_true", help="print time to first token and tokens/s to stderr")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the completion, at the end")
    p.set_defaults(func=cmd_generate)

    p = client_parser("models", "list the models this key may generate from; change who may, or delete one")
    p.set_defaults(func=cmd_models)
    msub = p.add_subparsers(dest="models_command")
    m = client_parser("access", "show or change who may generate from a model (its owner or an admin)", msub,
                      argparse.SUPPRESS)
    m.add_argument("name")
    who = m.add_mutually_exclusive_group()
    who.add_argument("--public", action="store_true", help="every tenant")
    who.add_argument("--private", action="store_true", help="the owner (and admins) only")
    who.add_argument("--allow", metavar="T1,T2", default=None, help="these tenants besides the owner")
    m = client_parser("delete", "unpublish a model (its owner or an admin); its builds stay in the store", msub,
                      argparse.SUPPRESS)
    m.add_argument("name")

    p = client_parser("cancel", "stop one of your requests (by the request id it was sent with)")
    p.add_argument("request_id")
    p.set_defaults(func=cmd_cancel)

    p = client_parser("sampling", "show or change prompt sampling of a model (admin scope)")
    p.add_argument("model")
    onoff = p.add_mutually_exclusive_group()
    onoff.add_argument("--enable", action="store_true")
    onoff.add_argument("--disable", action="store_true")
    p.add_argument("--rate", type=float, default=None, help="share of requests considered (default 1)")
    p.add_argument("--max-prompts", type=int, default=None, help="prompts kept at most (default 256)")
    p.add_argument("--max-chars", type=int, default=None, help="characters kept per prompt (default 4000)")
    p.add_argument("--clear", action="store_true", help="with --disable: delete the prompts kept so far")
    p.set_defaults(func=cmd_sampling)

    p = sub.add_parser("builds", help="inspect stored builds")
    bsub = p.add_subparsers(dest="builds_command", required=True)
    p = client_parser("show", "a build's manifest and quality report", parent=bsub)
    p.add_argument("build_id")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    p.set_defaults(func=cmd_builds_show)
    cli_gc.add_parser(bsub)

    p = sub.add_parser("bench", help="benchmark PyTorch, direct ONNX Runtime GenAI and the whole stack",
                       description="Measure time to first token, inter-token latency, decode and aggregate tokens/s, "
                                   "peak RSS, build size and compile time per recipe, against the machine's memory "
                                   "bandwidth limit; write JSON (every sample), Markdown and PNG charts.")
    p.add_argument("--quick", action="store_true", help="demo model only, few samples: under two minutes")
    p.add_argument("--large", action="store_true", help="also a Llama-3.2-1B-shaped checkpoint (random weights)")
    p.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                   help="measure only these models (demo, llama-125m, llama-3.2-1b, llama4-tiny, llama4-16e); "
                        "default: demo and llama-125m (demo only with --quick, llama-3.2-1b too with --large)")
    p.add_argument("--recipes", nargs="+", choices=RECIPES, default=None)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda benchmarks the cuda pool")
    p.add_argument("--threads", type=int, default=0, help="threads for every contender (default: min(cores, 2))")
    p.add_argument("--out", default="bench/results", help="report directory")
    p.add_argument("--cache", default="./.llamaship/bench", help="checkpoints and builds are kept here")
    p.add_argument("--update-readme", action=argparse.BooleanOptionalAction, default=None,
                   help="put the table and charts into README.md (default: on for full runs, off for --quick)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the end-to-end demo (what `make demo` runs)")
    p.add_argument("--workdir", default="./.llamaship/demo")
    p.add_argument("--recipe", default="fp32", choices=RECIPES)
    p.add_argument("--prompt", default="def read_config(path):\n    ")
    p.add_argument("--max-tokens", type=int, default=96)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
