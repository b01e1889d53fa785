"""Where a compile job's checkpoint comes from: a local path, a Hugging Face hub id, or an upload."""

from __future__ import annotations

import json
import re
from pathlib import Path

from compiler_service.jobs import JobRequest
from compiler_service.uploads import UploadStore

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_./-]+)?")
# what a checkpoint needs; never *.py (no remote code) and never pickles unless allowed
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
HUB_PICKLES = ["*.bin", "*.pt"]
EVAL_PROMPTS_FILE = "eval_prompts.jsonl"


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


def upload_prompts(directory: Path) -> list[str] | None:
    """The prompts of an upload's eval_prompts.jsonl, if it has one."""
    f = directory / EVAL_PROMPTS_FILE
    if not f.is_file():
        return None
    prompts = []
    for n, line in enumerate(f.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompts.append(json.loads(line)["prompt"])
        except (ValueError, KeyError, TypeError):
            raise SourceError(f"{EVAL_PROMPTS_FILE}:{n}: expected a JSON object with a \"prompt\" string") from None
    if not prompts:
        raise SourceError(f"{EVAL_PROMPTS_FILE} holds no prompts")
    return prompts


def resolve(req: JobRequest, uploads: UploadStore, hub_cache: Path) -> Path:
    if req.upload_id:
        return uploads.checkpoint_dir(req.upload_id)
    if req.hub_id:
        return fetch_hub(req.hub_id, hub_cache, req.allow_pickle)
    return Path(req.checkpoint_path)
