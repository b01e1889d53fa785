"""The compile pipeline: validate → hash → (auto) → build → configure → verify → profile → gate → publish.

Each stage reports progress through a callback (which raises when the job must stop); heavy
stages run in a child process (builder) or a worker thread (hashing, verification, deletions),
never on the event loop. The job's scratch directory is removed when the run ends, however it ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from shared import catalog, prompt_samples
from shared.errors import LlamashipError, PermissionDenied, shown
from shared.model_registry import ModelRegistry
from shared.service import package_versions
from shared.store import BuildStore, Manifest
from shared.tenancy import Caller
from compiler_service import checkpoint as ckpt
from compiler_service.offload import in_child
from compiler_service import (auto_precision, chat_templates, llama4_auto, llama4_checkpoint, llama4_runner,
                              profiling, quality, recipes, request_checks, sources)
from compiler_service.uploads import UploadStore
from compiler_service.builder_runner import BuildCancelled, run_builder
from compiler_service.memory import PeakRss
from compiler_service.jobs import JobRequest
from compiler_service.failures import CompileError, QualityGateFailed
from compiler_service.verify import configure, inspect_graph, smoke_test

log = logging.getLogger("llamaship.compiler.pipeline")
BUILD_FORMAT = 3  # 2: mixed recipes through per-node overrides, q/k/v kept fused; 3: the chat template travels in the build
DEFAULT_MAX_SEQ = 4096
DEFAULT_MAX_BATCH = 32

Progress = Callable[[str, float, str], Awaitable[None]]


@dataclass
class Outcome:
    build_id: str
    reused: bool
    manifest: Manifest


def tool_versions() -> dict[str, str]:
    return package_versions(("llamaship", "onnxruntime-genai", "onnxruntime", "onnx", "transformers", "torch"))


def build_id_for(source_sha: str, req: JobRequest, versions: dict[str, str], builder: str = "") -> str:
    """`builder`: the builder that makes it, if not the GenAI model builder (Llama 4's own)."""
    auto = {}
    if req.recipe == "auto":  # its choice depends on the drift budget and the calibration prompts
        gate = req.quality
        auto = {"budget": quality.thresholds_for("auto", gate).max_mean_kl,
                "prompts": quality.prompts_digest(quality.eval_prompts(gate.get("eval_prompts", []))[0])}
    key = json.dumps(
        {
            "auto": auto,
            "source": source_sha,
            "recipe": req.recipe,
            "pool": req.target_pool,
            "max_seq": req.max_sequence_length,
            "max_batch": req.max_batch,
            "builder": builder or versions.get("onnxruntime-genai", ""),
            "format": BUILD_FORMAT,
        },
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def normalize(req: JobRequest) -> JobRequest:
    req.target_pool = req.target_pool or "cpu"
    req.max_sequence_length = req.max_sequence_length or DEFAULT_MAX_SEQ
    req.max_batch = req.max_batch or DEFAULT_MAX_BATCH
    try:
        request_checks.check_bounds(req)
        sources.check_one_source(req)
        recipes.get(req.recipe, req.target_pool)
        quality.thresholds_for(req.recipe, req.quality)
        quality.eval_prompts(req.quality.get("eval_prompts", []))
    except (recipes.RecipeError, quality.GateInputError, sources.SourceError) as exc:
        raise CompileError(str(exc)) from None
    except LlamashipError as exc:
        raise CompileError(exc.message) from None
    return req


class CompilePipeline:
    def __init__(self, store: BuildStore, redis, work_dir: Path, uploads: UploadStore | None = None,
                 checkpoint_roots: tuple[Path, ...] = ()):
        self.store = store
        self.r = redis
        self.work_dir = work_dir
        self.uploads = uploads or UploadStore(store.root)
        self.roots = checkpoint_roots
        self.hub_cache = store.root / ".hub"

    async def run(
        self,
        job_id: str,
        req: JobRequest,
        caller: Caller,
        progress: Progress,
        should_cancel: Callable[[], Awaitable[bool]],
    ) -> Outcome:
        # a private copy: prompts resolved below must not ride along in every job event
        req = dataclasses.replace(normalize(req), quality=dict(req.quality))
        job_dir = self.work_dir / job_id
        stop = threading.Event()  # set when the run ends: thread stages that outlive it stop early
        try:
            with PeakRss() as peak:
                return await self._run(job_dir, req, caller, progress, should_cancel, stop, peak)
        finally:
            stop.set()
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, job_dir, True))

    async def _run(self, job_dir: Path, req: JobRequest, caller: Caller, progress: Progress,
                   should_cancel: Callable[[], Awaitable[bool]], stop: threading.Event, peak: PeakRss) -> Outcome:
        recipe = recipes.get(req.recipe, req.target_pool)
        where = sources.label(req)
        await progress("validate", 0.0, f"checking checkpoint {where}")
        await asyncio.to_thread(job_dir.mkdir, parents=True, exist_ok=True)
        try:
            await self._check_sampled_prompts_owner(req, caller)
            if req.upload_id:
                path = await asyncio.to_thread(self.uploads.snapshot, req.upload_id, caller, job_dir / "source")
            else:
                path = await asyncio.to_thread(sources.resolve, req, caller, self.uploads, self.hub_cache, self.roots)
            source = await asyncio.to_thread(ckpt.inspect, path, req.allow_pickle, where)
            if source.is_llama4:
                recipes.check_llama4(recipe, req.target_pool, llama4_runner.supported_precisions())
            if req.upload_id and not req.quality.get("eval_prompts"):
                prompts = await asyncio.to_thread(sources.upload_prompts, path)
                if prompts:
                    quality.eval_prompts(prompts)
                    request_checks.check_prompts(prompts, "eval_prompts.jsonl")
                    req.quality = {**req.quality, "eval_prompts": prompts, "prompt_source": "upload"}
            if req.quality.get("sampled_prompts_of"):
                await self._use_sampled_prompts(req)
        except (ckpt.CheckpointError, sources.SourceError, quality.GateInputError, recipes.RecipeError) as exc:
            raise CompileError(str(exc)) from None
        except LlamashipError as exc:  # an incomplete or unknown upload, a name of another tenant
            raise CompileError(exc.message) from None
        # Llama 4 configs state 10M positions (Scout): the build's context is what the request asks
        context_length = min(req.max_sequence_length, source.max_position_embeddings or req.max_sequence_length)

        await progress("hash", 0.0, "hashing checkpoint")
        loop = asyncio.get_running_loop()
        try:
            source_sha = await asyncio.to_thread(
                ckpt.content_hash, source.path,
                lambda f: asyncio.run_coroutine_threadsafe(progress("hash", f, "hashing checkpoint"), loop),
                stop,
            )
        except ckpt.CheckpointError as exc:
            raise CompileError(str(exc)) from None
        versions = tool_versions()
        builder = llama4_runner.builder_version() if source.is_llama4 else ""
        build_id = build_id_for(source_sha, req, versions, builder)

        if await asyncio.to_thread(self.store.exists, build_id):
            manifest = await asyncio.to_thread(self.store.manifest, build_id)
            local = await asyncio.to_thread(self.store.path, build_id)  # an s3:// store fetches it first
            report = await self._gate(req, source, local, manifest.quality, progress,
                                      manifest.recipe_details.get("builder_precision", ""))
            if report.to_dict() != manifest.quality:
                manifest.quality = report.to_dict()
                await asyncio.to_thread(self.store.update_manifest, manifest)
            await self._publish_if_passed(req, manifest, report)
            await progress("publish", 0.5, f"identical build {build_id} exists; publishing it")
            manifest = await self._add_tenant(manifest, caller)
            await self._publish_alias(req, manifest, caller)
            return Outcome(build_id, True, manifest)

        staging = await asyncio.to_thread(self.store.new_staging, build_id)
        auto_details: dict = {}
        try:
            if recipe.name == "auto":
                recipe, auto_details = await self._choose_auto(req, source, job_dir, context_length, progress,
                                                               should_cancel, stop)
            t0 = time.perf_counter()
            builder_details, llama4_report = await self._build(source, recipe, req, staging, job_dir, context_length,
                                                               builder, progress, should_cancel, stop)
            build_seconds = time.perf_counter() - t0
            try:  # the replicas render chat messages with it (serving_service.chat_template)
                builder_details["chat_template"] = await asyncio.to_thread(
                    chat_templates.store_in_build, source.path, staging)
            except chat_templates.ChatTemplateError as exc:
                raise CompileError(str(exc)) from None

            await progress("configure", 0.0, f"context length {context_length}, max batch {req.max_batch}")
            await asyncio.to_thread(configure, staging, context_length)

            await progress("verify", 0.0, "checking graph shapes and fused kernels; smoke test")
            if source.is_llama4:
                graph = await asyncio.to_thread(inspect_graph, staging, recipe, source.num_layers,
                                                tuple(llama4_report["moe_layers"]))
            else:
                graph = await asyncio.to_thread(inspect_graph, staging, recipe)
            profile: dict = {}
            if req.target_pool == "cpu":
                await progress("profile", 0.0, "offline graph optimization: does it load faster?")
                profile["load"] = await in_child(profiling.offline_optimize, staging, job_dir)
            await progress("verify", 0.5, "smoke test: the runtime loads the build and keeps its limits")
            await in_child(smoke_test, staging, context_length, req.max_batch)
            if req.target_pool == "cpu":
                await progress("profile", 0.5, "ONNX Runtime profile: 1 prefill + 16 decode steps")
                profile["summary"] = await in_child(
                    profiling.profile_build, staging, job_dir, graph["ops"], source.vocab_size)
                for warning in profile["summary"]["warnings"]:
                    log.warning("build %s: %s", build_id, warning)
            else:
                profile["skipped"] = f"{req.target_pool} builds are profiled where they run, not on the compiler"
            report = await self._gate(req, source, staging, {}, progress, builder_details["builder_precision"])

            if await should_cancel():
                raise BuildCancelled("cancelled before publishing")
            await progress("publish", 0.0, "hashing files and publishing atomically")
            manifest = Manifest(
                build_id=build_id,
                model_name=req.model_name,
                source_path=where,
                source_sha256=source_sha,
                recipe=recipe.name,
                recipe_details={
                    "description": llama4_report.get("precision_description", recipe.description),
                    **builder_details,
                    "build_seconds": round(build_seconds, 3),
                    # the compiler and its builder child together, from validation to the gate
                    "compile_peak_rss_bytes": peak.bytes,
                    "graph": graph,
                    **({"auto": auto_details} if auto_details else {}),
                },
                target_pool=req.target_pool,
                execution_provider=recipes.POOLS[req.target_pool].execution_provider,
                context_length=context_length,
                max_batch=req.max_batch,
                tool_versions=versions,
                architecture=source.architecture,
                parameters=source.parameters,
                quality=report.to_dict(),
                profile=profile,
                tenants=[caller.tenant],
            )
            manifest = await asyncio.to_thread(self.store.publish, staging, manifest, stop)
            manifest = await self._add_tenant(manifest, caller)  # published meanwhile by another tenant
            await self._publish_if_passed(req, manifest, report)
            await self._publish_alias(req, manifest, caller)
            return Outcome(build_id, False, manifest)
        finally:
            await asyncio.shield(asyncio.to_thread(self.store.discard_staging, staging))

    async def _build(self, source: ckpt.Checkpoint, recipe: recipes.Recipe, req: JobRequest, staging: Path,
                     job_dir: Path, context_length: int, builder: str, progress: Progress,
                     should_cancel: Callable[[], Awaitable[bool]], stop: threading.Event) -> tuple[dict, dict]:
        """Llama 4: its own graph builder, in a thread; Llama: the GenAI model builder, in a child.
        Returns the manifest's builder details and the Llama 4 builder's report ({} for Llama)."""
        if source.is_llama4:
            await progress("build", 0.0, f"running the Llama 4 graph builder ({recipe.name})")
            # auto's choice is over the Llama 4 builder's groups; the named recipes are its presets
            precision = llama4_auto.precision(dict(recipe.assignment)) if recipe.name == "auto" else recipe.name
            report = await llama4_runner.run_llama4_build(
                source.path, staging, precision=precision, pool=req.target_pool, context_length=context_length,
                on_progress=lambda f, msg: progress("build", f, msg), should_cancel=should_cancel, stop=stop)
            return {"builder": builder, "builder_precision": precision, "llama4": report}, report
        await progress("build", 0.0, f"running the GenAI model builder ({recipe.name})")
        args = recipes.builder_args(recipe, req.target_pool, source.num_layers)
        await run_builder(source.path, staging, job_dir / "cache", args, source.num_layers, job_dir / "builder.log",
                          lambda f, msg: progress("build", f, msg), should_cancel)
        return {"builder_precision": recipe.precision, "builder_args": args}, {}

    async def _check_sampled_prompts_owner(self, req: JobRequest, caller: Caller) -> None:
        """Prompts sampled from a model's traffic are its owner's: only they (or an admin) use them."""
        model = req.quality.get("sampled_prompts_of")
        if model:
            access = await ModelRegistry(self.r).access(model)
            if access is None or not caller.owns(access.owner):
                raise CompileError(f"quality.sampled_prompts_of: no model {shown(model)} of yours")

    async def _add_tenant(self, manifest: Manifest, caller: Caller) -> Manifest:
        if caller.tenant in manifest.tenants:
            return manifest
        manifest.tenants = sorted({*manifest.tenants, caller.tenant})
        await asyncio.to_thread(self.store.update_manifest, manifest)
        return manifest

    async def _use_sampled_prompts(self, req: JobRequest) -> None:
        """The prompts the gateway sampled for a model become the calibration and eval set; a
        snapshot goes into the shared store (samples/<model>/<digest>.jsonl)."""
        model = req.quality["sampled_prompts_of"]
        prompts = await prompt_samples.sampled(self.r, model)
        if not prompts:
            raise CompileError(f"quality.sampled_prompts_of: no prompts sampled for {model!r} yet "
                               "(the gateway samples a model's prompts once SetPromptSampling enables it)")
        prompts = prompts[: quality.MAX_PROMPTS]
        digest = quality.prompts_digest(prompts)
        snapshot = self.store.root / "samples" / model / f"{digest}.jsonl"

        def write() -> None:
            snapshot.parent.mkdir(parents=True, exist_ok=True)
            tmp = snapshot.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
            tmp.chmod(0o600)
            tmp.replace(snapshot)

        await asyncio.to_thread(write)
        req.quality = {**req.quality, "eval_prompts": prompts, "prompt_source": f"sampled:{model}",
                       "prompts_snapshot": str(snapshot.relative_to(self.store.root))}

    async def _choose_auto(self, req: JobRequest, source: ckpt.Checkpoint, job_dir: Path, context_length: int,
                           progress: Progress, should_cancel: Callable[[], Awaitable[bool]],
                           stop: threading.Event) -> tuple[recipes.Recipe, dict]:
        """Measure each group's drift, choose the assignment, return the concrete recipe (Llama 4:
        over its builder's groups, see compiler_service.llama4_auto)."""
        gate = req.quality
        limits = quality.thresholds_for("auto", gate, routed=source.is_llama4)
        budget = auto_precision.Budget(limits.max_mean_kl, 1.0 - limits.min_top1_agreement,
                                       limits.max_perplexity_increase_pct)
        prompts, prompt_source = quality.eval_prompts(gate.get("eval_prompts", []))
        prompt_source = gate.get("prompt_source", prompt_source)
        await progress("auto", 0.0, f"PyTorch reference on {len(prompts)} calibration prompts")
        ids = await asyncio.to_thread(quality.tokenize, source.path, prompts)
        reference = await asyncio.to_thread(quality.reference_logits, source.path, ids)
        base = recipes.get("auto", req.target_pool)

        async def trial(assignment: dict[str, str], label: str) -> auto_precision.Drift:
            out = job_dir / "auto" / label.replace("=", "-")
            await asyncio.to_thread(shutil.rmtree, out, True)
            if source.is_llama4:
                await llama4_runner.run_llama4_build(
                    source.path, out, precision=llama4_auto.precision(assignment), pool=req.target_pool,
                    context_length=context_length, on_progress=lambda f, msg: asyncio.sleep(0),
                    should_cancel=should_cancel, stop=stop)
            else:
                trial_recipe = dataclasses.replace(base, assignment=tuple(assignment.items()))
                await run_builder(source.path, out, job_dir / "cache",
                                  recipes.builder_args(trial_recipe, req.target_pool, source.num_layers),
                                  source.num_layers, job_dir / f"builder-auto-{out.name}.log",
                                  lambda f, msg: asyncio.sleep(0), should_cancel)
            logits = await in_child(quality.build_logits, out, ids)
            await asyncio.to_thread(shutil.rmtree, out, True)
            got = quality.compare(list(zip(reference, logits, ids)))
            return auto_precision.Drift(got.mean_kl, 1.0 - got.top1_agreement, got.perplexity_increase_pct)

        async def on_trial(i: int, n: int, label: str) -> None:
            await progress("auto", i / n, f"sensitivity {i + 1}/{n}: only {label}")

        if source.is_llama4:
            params = llama4_auto.group_params(llama4_checkpoint.parse(source.config)[0])
            sensitivity = await llama4_auto.measure_sensitivity(list(params), trial, on_trial)
            choice = auto_precision.choose(sensitivity, params, budget)
        else:
            sensitivity = await auto_precision.measure_sensitivity(trial, on_trial)
            choice = auto_precision.choose(sensitivity, auto_precision.group_params(source.config), budget)
        chosen = ", ".join(f"{g} {w}" for g, w in choice.assignment.items())
        log.info("auto: %s (predicted %s within %s)", chosen, choice.predicted, budget)
        await progress("auto", 1.0, f"chose {chosen}")
        details = {
            "budget": dataclasses.asdict(budget), "safety": auto_precision.SAFETY, "prompt_source": prompt_source,
            "sensitivity": {f"{g}={w}": dataclasses.asdict(d) for (g, w), d in sensitivity.items()},
            "chosen": choice.assignment, "predicted": dataclasses.asdict(choice.predicted),
            "predicted_bytes": int(choice.bytes),
        }
        return dataclasses.replace(base, assignment=tuple(choice.assignment.items())), details

    async def _gate(self, req: JobRequest, source: ckpt.Checkpoint, build_dir: Path, previous: dict,
                    progress: Progress, precision: str = "") -> quality.QualityReport:
        """Run the quality gate, or re-judge an earlier report made on the same prompts
        (`precision`: the builder's, which a Llama 4 gate needs to measure router flips)."""
        checkpoint, is_llama4 = source.path, source.is_llama4
        options = req.quality
        thresholds = quality.thresholds_for(req.recipe, options, routed=is_llama4)
        prompts, prompt_source = quality.eval_prompts(options.get("eval_prompts", []))
        prompt_source = options.get("prompt_source", prompt_source)
        old = quality.QualityReport.from_dict(previous) if previous.get("metrics") else None
        if old is not None and old.prompts_digest == quality.prompts_digest(prompts):
            return quality.rejudge(old, thresholds)
        note = ("the built-in default prompts (no eval_prompts given)" if prompt_source == "default"
                else f"{len(prompts)} given prompts")
        await progress("quality", 0.0, f"comparing with the PyTorch reference on {note}")
        report = await in_child(quality.run_gate, checkpoint, build_dir, req.recipe, req.target_pool,
                                         prompts, prompt_source, thresholds, precision if is_llama4 else "")
        if old is not None:  # measured again on other prompts: the record of forced publishes stays
            report.forced, report.forced_publishes = old.forced, old.forced_publishes
        if options.get("prompts_snapshot"):
            report.extra["prompts_snapshot"] = options["prompts_snapshot"]
        return report

    async def _publish_if_passed(self, req: JobRequest, manifest: Manifest, report: quality.QualityReport) -> None:
        """Raise QualityGateFailed unless the build passed (or the request forces it, recorded)."""
        if report.passed or report.skipped_reason:
            return
        failures = "; ".join(report.failures)
        if not req.quality.get("force_publish"):
            raise QualityGateFailed(
                f"quality gate failed ({failures}); build {manifest.build_id} is stored with its report "
                f"(llamaship builds show {manifest.build_id}) but not published as {req.model_name}", manifest.build_id)
        log.warning("publishing build %s although it failed the quality gate (%s): forced by the request",
                    manifest.build_id, failures)
        report.forced = True
        report.forced_publishes.append({"model_name": req.model_name, "at": time.time()})
        manifest.quality = report.to_dict()
        await asyncio.to_thread(self.store.update_manifest, manifest)

    async def _publish_alias(self, req: JobRequest, manifest: Manifest, caller: Caller) -> None:
        """Point the name at the build, if the job's tenant (still) may publish under it."""
        alias = catalog.Alias(name=req.model_name, build_id=manifest.build_id, pool=manifest.target_pool,
                              recipe=manifest.recipe, context_length=manifest.context_length,
                              max_batch=manifest.max_batch, published_at=time.time())
        try:
            await ModelRegistry(self.r).publish(alias, caller)
        except PermissionDenied as exc:
            raise CompileError(f"{exc.message}; build {manifest.build_id} is stored but not published") from None
