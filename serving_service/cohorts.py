"""Continuous batching over static-batch generators: which waiting sequences decode together.

onnxruntime-genai 0.18 on CPU has no paged KV cache, so a running batch cannot take new rows.
Its Engine batches at most 4 requests and makes a newcomer wait for the whole batch (measured:
about 1 s to the first token), so we schedule ourselves. Sequences that arrive together start a
*cohort*: one generator with a right-padded [rows, length] prompt. Every running cohort decodes
one step in turn, so a newcomer waits for one round of steps plus its prefill, and the weights
read by one step serve every row of the cohort (decode is bandwidth-bound: 16 rows cost little
more than one).

Rows share a cohort only when that cannot change what they produce:
- greedy rows only: a sampled row draws from the cohort's one random generator, so its tokens
  would depend on its neighbours and could not be replayed exactly after a failover;
- no row whose prompt holds the pad token (right padding is masked by that id);
- the cohort's KV cache (rows x longest max_length) stays within the KV its rows reserved,
  so batching never commits more memory than admission accounted for;
- no row with structured output: onnxruntime-genai's guidance (llguidance inside) constrains a
  whole generator, so such a row decodes in a cohort of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Waiting:
    rid: str
    prompt_ids: list[int]
    max_new: int  # tokens this sequence may generate
    options: dict  # its search options (sampling); lengths are set per cohort
    reserved_tokens: int  # KV tokens admission reserved for it
    guidance: dict | None = None  # structured output (serving_service.constraints), out of the options

    def __post_init__(self) -> None:
        if "guidance" in self.options:
            self.options = dict(self.options)
            self.guidance = self.options.pop("guidance") or None

    def batchable(self, pad_token_id: int | None) -> bool:
        return not self.options.get("do_sample") and self.guidance is None and \
            (pad_token_id is None or pad_token_id not in self.prompt_ids)


@dataclass
class CohortPlan:
    rows: list[Waiting] = field(default_factory=list)

    @staticmethod
    def length_with(rows: list[Waiting]) -> int:
        """The generator's max_length: every row's prompt padded to the longest, plus the most
        tokens any row may generate."""
        return max(len(w.prompt_ids) for w in rows) + max(w.max_new for w in rows)

    @property
    def max_length(self) -> int:
        return self.length_with(self.rows)

    @property
    def prompt_width(self) -> int:
        return max(len(w.prompt_ids) for w in self.rows)


def plan_cohorts(waiting: list[Waiting], max_rows: int, pad_token_id: int | None,
                 context_length: int, equal_lengths: bool = False) -> list[CohortPlan]:
    """Group waiting sequences into cohorts; `equal_lengths`: only prompts of one length share a
    cohort (no padding: see serving_service.graph_facts)."""
    plans: list[CohortPlan] = []
    batch: list[Waiting] = []
    for w in waiting:
        if max_rows > 1 and w.batchable(pad_token_id):
            batch.append(w)
        else:
            plans.append(CohortPlan([w]))
    # longest first, so that rows of similar length share a cohort; a row joins the open cohort
    # while the padded length fits the context and the cohort's KV stays within what its rows
    # reserved, else it opens the next one
    batch.sort(key=(lambda w: (len(w.prompt_ids), w.max_new)) if equal_lengths else
               (lambda w: len(w.prompt_ids) + w.max_new), reverse=True)
    current: list[Waiting] = []
    for w in batch:
        rows = [*current, w]
        length = CohortPlan.length_with(rows)
        fits = len(rows) <= max_rows and length <= context_length and \
            len(rows) * length <= sum(max(r.reserved_tokens, len(r.prompt_ids) + r.max_new) for r in rows) and \
            not (equal_lengths and len(w.prompt_ids) != len(rows[0].prompt_ids))
        if current and not fits:
            plans.append(CohortPlan(current))
            rows = [w]
        current = rows
    if current:
        plans.append(CohortPlan(current))
    return plans


def padded_prompts(plan: CohortPlan, pad_token_id: int) -> list[list[int]]:
    width = plan.prompt_width
    return [w.prompt_ids + [pad_token_id] * (width - len(w.prompt_ids)) for w in plan.rows]
