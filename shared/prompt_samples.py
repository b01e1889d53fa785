"""Prompt sampling: a bounded, uniform sample (reservoir) of the prompts a model receives.

The gateway adds prompts of opted-in models; the compiler reads a model's sample when a compile
request names it as its calibration and evaluation set. Prompts are user data: they are kept
only here (Redis, bounded) and in the store snapshot of a build that used them, never logged.

Keys: ls:sampling:{model} (JSON settings), ls:samples:{model} (LIST of prompts),
ls:samples:{model}:seen (prompts considered).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass

import redis.asyncio as aioredis

from shared import redis_keys as keys
from shared.errors import InvalidArgument

MAX_PROMPTS_LIMIT = 10_000
MAX_CHARS_LIMIT = 100_000

# KEYS: samples list, seen counter. ARGV: prompt, max prompts, uniform random in [0, 1).
# Reservoir sampling: the n-th prompt replaces a random kept one with probability max/n.
_RESERVOIR = """
local seen = redis.call('INCR', KEYS[2])
local cap = tonumber(ARGV[2])
if redis.call('LLEN', KEYS[1]) < cap then
  redis.call('RPUSH', KEYS[1], ARGV[1])
else
  local slot = math.floor(tonumber(ARGV[3]) * seen)
  if slot < cap then redis.call('LSET', KEYS[1], slot, ARGV[1]) end
end
return seen
"""


@dataclass
class SamplingSettings:
    enabled: bool = False
    rate: float = 1.0
    max_prompts: int = 256
    max_chars: int = 4000

    def validated(self) -> "SamplingSettings":
        if not 0 < self.rate <= 1:
            raise InvalidArgument(f"rate: must be in (0, 1], got {self.rate}")
        if not 0 < self.max_prompts <= MAX_PROMPTS_LIMIT:
            raise InvalidArgument(f"max_prompts: must be in 1..{MAX_PROMPTS_LIMIT}, got {self.max_prompts}")
        if not 0 < self.max_chars <= MAX_CHARS_LIMIT:
            raise InvalidArgument(f"max_chars: must be in 1..{MAX_CHARS_LIMIT}, got {self.max_chars}")
        return self


def _settings_key(model: str) -> str:
    return keys.sampling_settings(model)


def _samples_key(model: str) -> str:
    return keys.prompt_samples(model)


async def get_settings(r: aioredis.Redis, model: str) -> SamplingSettings:
    raw = await r.get(_settings_key(model))
    return SamplingSettings(**json.loads(raw)) if raw else SamplingSettings()


async def set_settings(r: aioredis.Redis, model: str, s: SamplingSettings, clear: bool = False) -> None:
    s.validated()
    async with r.pipeline(transaction=True) as pipe:
        pipe.set(_settings_key(model), json.dumps(asdict(s)))
        if clear:
            pipe.delete(_samples_key(model), _samples_key(model) + ":seen")
        await pipe.execute()


async def counts(r: aioredis.Redis, model: str) -> tuple[int, int]:
    """(prompts kept, prompts considered)."""
    kept, seen = await r.llen(_samples_key(model)), await r.get(_samples_key(model) + ":seen")
    return int(kept), int(seen or 0)


async def sampled(r: aioredis.Redis, model: str) -> list[str]:
    return list(await r.lrange(_samples_key(model), 0, -1))


class PromptSampler:
    """The gateway's side: settings cached for a few seconds, one atomic script per kept prompt."""

    def __init__(self, r: aioredis.Redis, cache_s: float = 5.0):
        self.r = r
        self.cache_s = cache_s
        self._script = r.register_script(_RESERVOIR)
        self._cache: dict[str, tuple[float, SamplingSettings]] = {}

    async def settings(self, model: str, now: float) -> SamplingSettings:
        cached = self._cache.get(model)
        if cached and now - cached[0] < self.cache_s:
            return cached[1]
        s = await get_settings(self.r, model)
        self._cache[model] = (now, s)
        return s

    async def offer(self, model: str, prompt: str, now: float) -> bool:
        s = await self.settings(model, now)
        if not s.enabled or random.random() >= s.rate:
            return False
        await self._script(keys=[_samples_key(model), _samples_key(model) + ":seen"],
                           args=[prompt[: s.max_chars], s.max_prompts, random.random()])
        return True
