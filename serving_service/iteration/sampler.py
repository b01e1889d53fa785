"""Per-row token choice. Every sampled row owns a numpy Generator seeded with the request's seed,
so its draws depend on nothing but its own logits: a replay of the request yields the same
tokens whatever rows share its batch (failover replay depends on this).

Sampling follows the search options the engine sends (shared.generation's fields):
logits / temperature, softmax, keep the top_k most likely tokens (0 or the vocabulary size: all),
then the smallest set of those whose probability reaches top_p, renormalize and draw.

A row with structured output (options["guidance"], serving_service.constraints) first drops every
token its grammar forbids, then picks as above and feeds the pick back to the grammar.
"""

from __future__ import annotations

import numpy as np


class Sampler:
    def __init__(self, options: dict):
        self.greedy = not options.get("do_sample")
        self.temperature = float(options.get("temperature", 1.0))
        self.top_k = int(options.get("top_k", 0))
        self.top_p = float(options.get("top_p", 1.0))
        self.rng = None if self.greedy else np.random.default_rng(int(options.get("random_seed", 0)))
        self.constraint = None
        if options.get("guidance"):
            from serving_service.constraints import Constraint

            self.constraint = Constraint(options["guidance"])

    def __call__(self, logits: np.ndarray) -> int:
        if self.constraint is None:
            return self._pick(logits)
        token = self._pick(self.constraint.mask(logits))
        self.constraint.consume(token)
        return token

    def _pick(self, logits: np.ndarray) -> int:
        if self.greedy:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / max(self.temperature, 1e-6)
        k = self.top_k if 0 < self.top_k < scaled.shape[0] else scaled.shape[0]
        top = np.argpartition(-scaled, k - 1)[:k] if k < scaled.shape[0] else np.arange(scaled.shape[0])
        # most likely first; ties by token id, so the order never depends on the partition
        top = top[np.lexsort((top, -scaled[top]))]
        probs = np.exp(scaled[top] - scaled[top[0]])
        probs /= probs.sum()
        if self.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), self.top_p)) + 1
            top, probs = top[:keep], probs[:keep] / probs[:keep].sum()
        cdf = np.cumsum(probs)
        pick = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return int(top[min(pick, len(top) - 1)])
