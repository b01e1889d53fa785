"""A small synchronous client of the gateway, used by the CLI, the tests and the benchmark."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import grpc

from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2
from shared.proto_gen.llamaship.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from shared.store import sha256_file

DEFAULT_GATEWAY = "127.0.0.1:50051"
TERMINAL = (compiler_pb2.JOB_STATE_SUCCEEDED, compiler_pb2.JOB_STATE_FAILED, compiler_pb2.JOB_STATE_CANCELLED)


def gateway_address(explicit: str | None = None) -> str:
    return explicit or os.environ.get("LLAMASHIP_GATEWAY") or DEFAULT_GATEWAY


class _AuthHeader(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, key: str):
        self.header = ("authorization", f"Bearer {key}")

    def _add(self, details):
        metadata = [*(details.metadata or ()), self.header]
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._add(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._add(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._add(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._add(details), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, d, metadata):
        self.method, self.timeout, self.metadata = d.method, d.timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = d.credentials, d.wait_for_ready, d.compression


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    build_id: str = ""
    request_id: str = ""
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    chunk_times_s: list[float] = field(default_factory=list)  # arrival time of every token

    @property
    def decode_tokens_per_s(self) -> float:
        decode_time = self.total_s - self.time_to_first_token_s
        return (len(self.token_ids) - 1) / decode_time if decode_time > 0 and len(self.token_ids) > 1 else 0.0


class GatewayClient:
    def __init__(self, address: str | None = None, api_key: str | None = None, tls_ca: str | None = None):
        """`address` may list several gateways, comma-separated: `generate` continues a stream on
        the next one when its gateway goes away. `api_key` defaults to $LLAMASHIP_API_KEY;
        `tls_ca` (a PEM file, or $LLAMASHIP_TLS_CA) turns on TLS."""
        self.addresses = [a.strip() for a in gateway_address(address).split(",") if a.strip()]
        self.address = self.addresses[0]
        tls_ca = tls_ca or os.environ.get("LLAMASHIP_TLS_CA")
        self._ca = open(tls_ca, "rb").read() if tls_ca else None  # noqa: SIM115 - read once, closed by GC
        self._api_key = api_key or os.environ.get("LLAMASHIP_API_KEY")
        self._channels = [self._channel(a) for a in self.addresses]
        self._current = 0
        self.channel = self._channels[0]
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    def _channel(self, address: str) -> grpc.Channel:
        if self._ca:
            channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(self._ca))
        else:
            channel = grpc.insecure_channel(address)
        if self._api_key:
            channel = grpc.intercept_channel(channel, _AuthHeader(self._api_key))
        return channel

    def _next_gateway(self) -> None:
        self._current = (self._current + 1) % len(self._channels)
        self.address = self.addresses[self._current]
        self.channel = self._channels[self._current]
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> "GatewayClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stream(self, model: str, prompt: str, max_tokens: int = 64, timeout: float | None = None,
               **options) -> Iterator[gateway_pb2.GenerateChunk]:
        req = gateway_pb2.GenerateRequest(model=model, prompt=prompt, max_tokens=max_tokens, **options)
        return self.stub.Generate(req, timeout=timeout)

    def _chunks(self, model: str, prompt: str, max_tokens: int, timeout: float | None,
                options: dict) -> Iterator[gateway_pb2.GenerateChunk]:
        """The request's chunks; when its gateway goes away mid-stream, the stream is resumed
        through the next gateway after the last chunk received (each gateway tried once)."""
        if len(self.addresses) == 1:
            yield from self.stream(model, prompt, max_tokens, timeout=timeout, **options)
            return
        options.setdefault("request_id", uuid.uuid4().hex)
        cursor = ""
        tries = 0
        while True:
            try:
                if cursor:
                    req = gateway_pb2.GenerateRequest(request_id=options["request_id"], resume_cursor=cursor)
                    call = self.stub.Generate(req, timeout=timeout)
                else:
                    call = self.stream(model, prompt, max_tokens, timeout=timeout, **options)
                for chunk in call:
                    cursor = chunk.cursor or cursor
                    yield chunk
                return
            except grpc.RpcError as exc:
                if cursor == "0-0" and exc.code() == grpc.StatusCode.NOT_FOUND:
                    # the gateway went away before the request was queued: send it afresh
                    options["request_id"], cursor = uuid.uuid4().hex, ""
                    continue
                tries += 1
                if exc.code() != grpc.StatusCode.UNAVAILABLE or tries >= len(self.addresses) or not self._gateway_gone():
                    raise
                self._next_gateway()
                cursor = cursor or "0-0"

    def _gateway_gone(self) -> bool:
        try:
            grpc.channel_ready_future(self.channel).result(timeout=1.0)
            return False
        except grpc.FutureTimeoutError:
            return True

    def generate(self, model: str, prompt: str, max_tokens: int = 64, on_text: Callable[[str], None] | None = None,
                 timeout: float | None = None, **options) -> Completion:
        out = Completion()
        t0 = time.perf_counter()
        for chunk in self._chunks(model, prompt, max_tokens, timeout, options):
            now = time.perf_counter() - t0
            if chunk.token_ids and not out.token_ids:
                out.time_to_first_token_s = now
            out.chunk_times_s.extend([now] * len(chunk.token_ids))  # tokens that arrived together
            out.text += chunk.text
            out.token_ids.extend(chunk.token_ids)
            out.request_id = chunk.request_id
            out.build_id = chunk.build_id or out.build_id
            if on_text and chunk.text:
                on_text(chunk.text)
            if chunk.finish_reason:
                out.finish_reason = gateway_pb2.FinishReason.Name(chunk.finish_reason).removeprefix("FINISH_REASON_").lower()
                out.prompt_tokens = chunk.usage.prompt_tokens
                out.completion_tokens = chunk.usage.completion_tokens
        out.total_s = time.perf_counter() - t0
        return out

    def upload(self, directory: str, upload_id: str = "", chunk_bytes: int = 1 << 20,
               on_progress: Callable[[int, int], None] | None = None, max_attempts: int = 5) -> compiler_pb2.Upload:
        # on_progress(bytes sent or already there, total bytes)
        """Upload a checkpoint directory (its regular files) into the shared store. Resumable: with
        the `upload_id` of an interrupted upload, only what is missing is sent; a dropped
        connection is resumed here up to `max_attempts` times."""
        root = Path(directory)
        files = sorted(p for p in root.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(root).parts))
        if upload_id:
            state = self.stub.GetUpload(compiler_pb2.GetUploadRequest(upload_id=upload_id), timeout=30)
        else:
            declared = [compiler_pb2.UploadFile(path=str(p.relative_to(root)), size=p.stat().st_size, sha256=sha256_file(p))
                        for p in files]
            state = self.stub.CreateUpload(compiler_pb2.CreateUploadRequest(files=declared), timeout=60)
        attempts = 0
        while not state.complete:
            def chunks(state=state):
                sent = state.received_bytes
                for f in state.files:
                    if f.verified:
                        continue
                    with open(root / f.path, "rb") as src:
                        src.seek(f.received)
                        offset = f.received
                        while offset < f.size:
                            data = src.read(chunk_bytes)
                            yield compiler_pb2.UploadChunk(upload_id=state.upload_id, path=f.path, offset=offset,
                                                           data=data)
                            offset += len(data)
                            sent += len(data)
                            if on_progress:
                                on_progress(sent, state.total_bytes)
            try:
                state = self.stub.UploadFiles(chunks())
            except grpc.RpcError as exc:
                attempts += 1
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                                      grpc.StatusCode.INVALID_ARGUMENT) or attempts >= max_attempts:
                    raise
                # resume from what arrived (a hash mismatch discarded that file: it is sent again)
                time.sleep(min(2.0, 0.2 * attempts))
                state = self.stub.GetUpload(compiler_pb2.GetUploadRequest(upload_id=state.upload_id), timeout=30)
        return state

    def build(self, build_id: str) -> compiler_pb2.BuildInfo:
        return self.stub.GetBuild(compiler_pb2.GetBuildRequest(build_id=build_id), timeout=30)

    def models(self) -> list[gateway_pb2.ModelInfo]:
        """The models this key may generate from (replica addresses for admin keys only)."""
        return list(self.stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10).models)

    def set_model_access(self, name: str, readers: list[str]) -> gateway_pb2.ModelAccess:
        """Who besides the owner may generate from `name`: tenants, or ["*"] for every tenant."""
        return self.stub.SetModelAccess(gateway_pb2.ModelAccess(model=name, readers=readers), timeout=10)

    def delete_model(self, name: str) -> bool:
        return self.stub.DeleteModel(gateway_pb2.DeleteModelRequest(model=name), timeout=10).deleted

    def cancel(self, request_id: str) -> bool:
        """Stop one of this tenant's requests; True if it was still in flight."""
        return self.stub.CancelGeneration(gateway_pb2.CancelGenerationRequest(request_id=request_id), timeout=10).found

    def submit_compile(self, checkpoint: str, name: str, recipe: str, pool: str = "cpu", max_sequence_length: int = 0,
                       max_batch: int = 0, quality: compiler_pb2.QualityGate | None = None, hub_id: str = "",
                       upload_id: str = "", allow_pickle: bool = False) -> compiler_pb2.CompileJob:
        req = compiler_pb2.CompileRequest(checkpoint_path=checkpoint, model_name=name, recipe=recipe, target_pool=pool,
                                          max_sequence_length=max_sequence_length, max_batch=max_batch, quality=quality,
                                          hub_id=hub_id, upload_id=upload_id, allow_pickle=allow_pickle)
        return self.stub.SubmitCompile(req, timeout=30)

    def watch_compile(self, job_id: str) -> Iterator[compiler_pb2.CompileJob]:
        for event in self.stub.WatchCompile(compiler_pb2.WatchCompileRequest(job_id=job_id)):
            yield event.job

    def cancel_compile(self, job_id: str) -> compiler_pb2.CompileJob:
        return self.stub.CancelCompile(compiler_pb2.CancelCompileRequest(job_id=job_id), timeout=10)

    def wait_served(self, name: str, build_id: str, timeout_s: float = 120.0) -> gateway_pb2.ModelInfo:
        """Wait until at least one replica serves `build_id` under `name`."""
        deadline = time.time() + timeout_s
        while True:
            for m in self.models():
                if m.name == name and (build_id in m.served_build_ids or any(r.build_id == build_id for r in m.replicas)):
                    return m
            if time.time() > deadline:
                raise TimeoutError(f"no replica serves {name} = {build_id} after {timeout_s:.0f}s")
            time.sleep(0.2)

    def compile(self, checkpoint: str, name: str, recipe: str, pool: str = "cpu",
                on_update: Callable[[compiler_pb2.CompileJob], None] | None = None, wait_served: bool = True,
                **limits) -> compiler_pb2.CompileJob:
        """Submit, follow to the end, and (on success) wait until the build is served."""
        job = self.submit_compile(checkpoint, name, recipe, pool, **limits)
        interruptions = 0
        while job.state not in TERMINAL:
            try:
                for job in self.watch_compile(job.job_id):
                    if on_update:
                        on_update(job)
                    if job.state in TERMINAL:
                        break
            except grpc.RpcError as exc:
                # the compiler restarting cuts the watch short; the job lives in Redis: watch again
                interruptions += 1
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) or interruptions > 30:
                    raise
                time.sleep(1.0)
        if job.state == compiler_pb2.JOB_STATE_SUCCEEDED and wait_served:
            self.wait_served(name, job.build_id)
        return job
