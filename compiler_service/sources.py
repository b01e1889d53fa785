"""Where a compile job's checkpoint comes from: a local path, a Hugging Face hub id, or an upload."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from compiler_service.checkpoint import CheckpointError, open_regular
from compiler_service.jobs import JobRequest
from compiler_service.uploads import UploadStore
from shared.errors import shown
from shared.tenancy import Caller

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_./-]+)?")
# what a checkpoint needs; never *.py (no remote code) and never pickles unless allowed
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
HUB_PICKLES = ["*.bin", "*.pt"]
EVAL_PROMPTS_FILE = "eval_prompts.jsonl"
MAX_PROMPTS_FILE_BYTES = 8 << 20


class SourceError(ValueError):
    pass


def check_one_source(req: JobRequest) -> None:
    given = [n for n in ("checkpoint_path", "hub_id", "upload_id") if getattr(req, n)]
    if len(given) != 1:
        raise SourceError("give exactly one of checkpoint_path, hub_id and upload_id"
                          + (f" (got {', '.join(given)})" if given else ""))
    if req.hub_id and not HUB_ID.fullmatch(req.hub_id):
        raise SourceError(f"hub_id: {req.hub_id!r} is not 'org/name' or 'org/name@revision'")


def fetch_hub(hub_id: str, cache_dir: Path, allow_pickle: bool) -> Path:
    """Download the checkpoint files of a hub repository (or find them in the cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo, _, revision = hub_id.partition("@")
    try:
        path = snapshot_download(repo, revision=revision or None, cache_dir=str(cache_dir),
                                 allow_patterns=HUB_FILES + (HUB_PICKLES if allow_pickle else []))
    except RepositoryNotFoundError:
        raise SourceError(f"hub_id: {hub_id} does not exist or is private (set HF_TOKEN on the compiler)") from None
    except LocalEntryNotFoundError:
        raise SourceError(f"hub_id: cannot fetch {hub_id}: the compiler has no network access to the Hugging Face "
                          "hub and it is not in its cache; upload the checkpoint (UploadFiles) or give a local "
                          "checkpoint_path instead") from None
    except HfHubHTTPError as exc:
        raise SourceError(f"hub_id: fetching {hub_id} failed: {exc}") from None
    return Path(path)


def parse_roots(setting: str) -> tuple[Path, ...]:
    """The --checkpoint-roots setting: comma-separated directories, resolved (symlinks and '..')."""
    return tuple(Path(part.strip()).resolve() for part in setting.split(",") if part.strip())


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def checkpoint_location(checkpoint_path: str, roots: tuple[Path, ...]) -> Path:
    """Where a request's checkpoint_path points on the compiler. With roots, a relative path
    resolves against them (the first root holding it), and a path outside every root, after
    symlinks and '..' are resolved, is refused with one message whether or not it exists."""
    if "\0" in checkpoint_path:
        raise SourceError("checkpoint_path: must not contain NUL characters")
    given = Path(checkpoint_path)
    if not roots:
        return given
    candidates = [given.resolve()] if given.is_absolute() else [(root / given).resolve() for root in roots]
    inside = [c for c in candidates if _inside(c, roots)]
    if not inside:
        raise SourceError(f"checkpoint_path: {shown(checkpoint_path)} is not inside the compiler's checkpoint "
                          "roots (--checkpoint-roots); give a path inside them, or upload the checkpoint")
    return next((c for c in inside if c.exists()), inside[0])


def check_files_inside(directory: Path, roots: tuple[Path, ...], label: str) -> None:
    """Every file of a checkpoint directory must resolve inside the roots (no symlink out)."""
    if not roots or not directory.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in filenames + dirnames:
            if not _inside(Path(dirpath, name).resolve(), roots):
                raise SourceError(f"checkpoint path {label} links to files outside the compiler's checkpoint roots")


def upload_prompts(directory: Path) -> list[str] | None:
    """The prompts of an upload's eval_prompts.jsonl, if it has one."""
    f = directory / EVAL_PROMPTS_FILE
    if not f.is_file():
        return None
    try:
        with open_regular(f) as handle:
            data = handle.read(MAX_PROMPTS_FILE_BYTES + 1)
    except CheckpointError as exc:
        raise SourceError(f"{EVAL_PROMPTS_FILE}: {exc}") from None
    if len(data) > MAX_PROMPTS_FILE_BYTES:
        raise SourceError(f"{EVAL_PROMPTS_FILE} is larger than {MAX_PROMPTS_FILE_BYTES >> 20} MiB")
    prompts = []
    for n, line in enumerate(data.decode(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (ValueError, KeyError, TypeError, RecursionError):
            prompt = None
        if not isinstance(prompt, str):
            raise SourceError(f"{EVAL_PROMPTS_FILE}:{n}: expected a JSON object with a \"prompt\" string")
        prompts.append(prompt)
    if not prompts:
        raise SourceError(f"{EVAL_PROMPTS_FILE} holds no prompts")
    return prompts


def label(req: JobRequest) -> str:
    """How messages name the request's checkpoint: as the user gave it, never by a server path."""
    if req.upload_id:
        return f"upload {req.upload_id}"
    if req.hub_id:
        return f"hub {req.hub_id}"
    return shown(req.checkpoint_path)


def resolve(req: JobRequest, caller: Caller, uploads: UploadStore, hub_cache: Path, roots: tuple[Path, ...]) -> Path:
    if req.upload_id:
        return uploads.checkpoint_dir(req.upload_id, caller)
    if req.hub_id:
        return fetch_hub(req.hub_id, hub_cache, req.allow_pickle)
    path = checkpoint_location(req.checkpoint_path, roots)
    check_files_inside(path, roots, label(req))
    return path
