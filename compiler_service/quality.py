"""The quality gate: a build against the PyTorch reference, teacher-forced on evaluation prompts.

For every prompt both models see the same tokens; at every position we compare the next-token
distributions: top-1 agreement, KL(reference || build), the largest logit difference, and the
perplexity each gives the prompt itself. A build that misses its recipe's thresholds (or the
request's) is stored with its report but does not become the model's current build.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# Used when a request brings no prompts: short code and prose of the kind the demo model and
# most code/chat checkpoints see. The report says when these were used: calibration that does
# not match production prompts is how quantization drift goes unnoticed.
DEFAULT_PROMPTS = (
    "def parse_args(argv):\n    parser = argparse.ArgumentParser(description=__doc__)\n",
    "class LRUCache:\n    def __init__(self, capacity):\n        self.capacity = capacity\n",
    "import os\nimport sys\n\n\ndef main():\n    for name in sorted(os.listdir(sys.argv[1])):\n",
    "    try:\n        result = self._call(request, timeout=timeout)\n    except TimeoutError:\n",
    "The quick brown fox jumps over the lazy dog. Then the dog wakes up and",
    "Q: What is the capital of France?\nA: The capital of France is",
    "for i, line in enumerate(open(path)):\n    if line.startswith('#'):\n        continue\n",
    "    return {key: value for key, value in items if value is not None}\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "if __name__ == '__main__':\n    logging.basicConfig(level=logging.INFO)\n    sys.exit(main())\n",
    "SELECT name, count(*) FROM users WHERE created_at > '2024-01-01' GROUP BY name",
    "Summary: the function reads the file, splits it into lines and returns",
)
MAX_PROMPTS = 256
MAX_PROMPT_TOKENS = 512


class GateInputError(ValueError):
    """Thresholds or prompts the gate cannot use (the request is invalid)."""


@dataclass(frozen=True)
class Thresholds:
    min_top1_agreement: float
    max_mean_kl: float
    max_perplexity_increase_pct: float


# Per recipe: what a build must reach on the evaluation prompts (top-1 share, mean KL in nats,
# perplexity increase in %). float builds must match almost exactly; weight-only int8 leaves a
# little drift, int4 more.
DEFAULT_THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(0.99, 0.001, 0.5),
    "fp16": Thresholds(0.98, 0.005, 1.0),
    "int8": Thresholds(0.95, 0.02, 3.0),
    "hybrid-int8": Thresholds(0.95, 0.02, 3.0),
    "hybrid-int4": Thresholds(0.85, 0.10, 15.0),
    "int4": Thresholds(0.85, 0.10, 15.0),
    "auto": Thresholds(0.95, 0.02, 3.0),  # max_mean_kl is also the budget auto chooses within
}


# Routed (mixture-of-experts) models: a small drift that flips the router's choice of expert
# changes that token's whole MLP, so quantized builds drift in rarer, larger steps than a dense
# model's. Float builds stay as strict as a dense model's.
ROUTED_THRESHOLDS: dict[str, Thresholds] = {
    **DEFAULT_THRESHOLDS,
    "int8": Thresholds(0.93, 0.03, 4.0),
    "hybrid-int8": Thresholds(0.93, 0.03, 4.0),
    "hybrid-int4": Thresholds(0.80, 0.15, 20.0),
    "int4": Thresholds(0.80, 0.15, 20.0),
    "auto": Thresholds(0.93, 0.03, 4.0),
}


def thresholds_for(recipe: str, overrides: dict, routed: bool = False) -> Thresholds:
    table = ROUTED_THRESHOLDS if routed else DEFAULT_THRESHOLDS
    base = asdict(table.get(recipe, table["int4"]))
    for name in base:
        value = overrides.get(name)
        if value is None:
            continue
        value = float(value)
        if not math.isfinite(value):
            raise GateInputError(f"quality.{name}: must be a finite number")
        if name == "min_top1_agreement" and not 0.0 <= value <= 1.0:
            raise GateInputError(f"quality.min_top1_agreement: must be in [0, 1], got {value}")
        if name != "min_top1_agreement" and value < 0:
            raise GateInputError(f"quality.{name}: must be >= 0, got {value}")
        base[name] = value
    return Thresholds(**base)


def eval_prompts(requested: list[str]) -> tuple[list[str], str]:
    """The prompts to evaluate on and where they came from ("request" or "default")."""
    if not requested:
        return list(DEFAULT_PROMPTS), "default"
    if len(requested) > MAX_PROMPTS:
        raise GateInputError(f"quality.eval_prompts: at most {MAX_PROMPTS} prompts, got {len(requested)}")
    for i, p in enumerate(requested):
        if not isinstance(p, str) or not p.strip():
            raise GateInputError(f"quality.eval_prompts[{i}]: must be a non-empty string")
    return list(requested), "request"


def prompts_digest(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]


@dataclass
class Metrics:
    top1_agreement: float
    mean_kl: float
    max_abs_logit_diff: float
    perplexity_reference: float
    perplexity_build: float
    tokens: int

    @property
    def perplexity_increase_pct(self) -> float:
        return 100.0 * (self.perplexity_build / self.perplexity_reference - 1.0)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(pairs: list[tuple[np.ndarray, np.ndarray, list[int]]]) -> Metrics:
    """Metrics over every position of every prompt: (reference logits [L, V], build logits [L, V], ids)."""
    agree = kl_sum = nll_ref = nll_build = 0.0
    max_diff = 0.0
    positions = scored = 0
    for ref, got, ids in pairs:
        vocab = min(ref.shape[-1], got.shape[-1])
        ref, got = ref[:, :vocab], got[:, :vocab]
        lp_ref, lp_got = _log_softmax(ref), _log_softmax(got)
        agree += float((ref.argmax(-1) == got.argmax(-1)).sum())
        kl_sum += float((np.exp(lp_ref) * (lp_ref - lp_got)).sum())
        max_diff = max(max_diff, float(np.abs(ref.astype(np.float64) - got).max()))
        positions += ref.shape[0]
        nxt = np.asarray(ids[1:])
        rows = np.arange(len(nxt))
        nll_ref -= float(lp_ref[rows, nxt].sum())
        nll_build -= float(lp_got[rows, nxt].sum())
        scored += len(nxt)
    return Metrics(
        top1_agreement=agree / positions,
        mean_kl=kl_sum / positions,
        max_abs_logit_diff=max_diff,
        perplexity_reference=math.exp(nll_ref / max(scored, 1)),
        perplexity_build=math.exp(nll_build / max(scored, 1)),
        tokens=positions,
    )


def judge(m: Metrics, t: Thresholds) -> list[str]:
    failures = []
    if m.top1_agreement < t.min_top1_agreement:
        failures.append(f"top-1 agreement {m.top1_agreement:.4f} < {t.min_top1_agreement:.4f}")
    if m.mean_kl > t.max_mean_kl:
        failures.append(f"mean KL {m.mean_kl:.5f} > {t.max_mean_kl:.5f}")
    if m.perplexity_increase_pct > t.max_perplexity_increase_pct:
        failures.append(f"perplexity +{m.perplexity_increase_pct:.2f}% > +{t.max_perplexity_increase_pct:.2f}%")
    return failures


@dataclass
class QualityReport:
    passed: bool
    failures: list[str]
    metrics: dict
    thresholds: dict
    prompt_source: str
    prompts: int
    prompts_digest: str
    forced: bool = False  # the build was published at least once although it failed
    forced_publishes: list[dict] = field(default_factory=list)  # {model_name, at} per forced publish
    skipped_reason: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QualityReport":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def tokenize(checkpoint: Path, prompts: list[str]) -> list[list[int]]:
    from compiler_service.torch_reference import load_tokenizer

    tok = load_tokenizer(checkpoint)
    out = []
    for p in prompts:
        ids = tok(p)["input_ids"][:MAX_PROMPT_TOKENS]
        if len(ids) < 2:
            raise GateInputError(f"quality.eval_prompts: {p[:40]!r} is under 2 tokens; nothing to score")
        out.append(list(ids))
    return out


def reference_logits(checkpoint: Path, token_ids: list[list[int]], routes: dict | None = None) -> list[np.ndarray]:
    """The PyTorch (transformers, float32) logits at every position of every prompt (a Llama 4
    checkpoint: its text model, one layer at a time, its router choices into `routes`; see
    compiler_service.torch_reference)."""
    from compiler_service.torch_reference import reference_logits as logits

    return logits(checkpoint, token_ids, routes)


def rejudge(old: QualityReport, t: Thresholds) -> QualityReport:
    """An earlier report's metrics (same build, same prompts) judged against other thresholds."""
    known = set(Metrics.__dataclass_fields__)
    failures = judge(Metrics(**{k: v for k, v in old.metrics.items() if k in known}), t) if old.metrics else []
    return QualityReport(passed=not failures, failures=failures, metrics=old.metrics, thresholds=asdict(t),
                         prompt_source=old.prompt_source, prompts=old.prompts, prompts_digest=old.prompts_digest,
                         forced=old.forced, forced_publishes=old.forced_publishes,
                         skipped_reason=old.skipped_reason, seconds=old.seconds, extra=old.extra)


def run_gate(checkpoint: Path, build_dir: Path, recipe: str, pool: str, prompts: list[str], source: str,
             t: Thresholds, llama4_precision: str = "") -> QualityReport:
    """`llama4_precision`: a Llama 4 build's builder precision; a quantized one's report also
    says how often its router's choice of experts flips (extra.router_flips)."""
    import time

    t0 = time.perf_counter()
    digest = prompts_digest(prompts)
    provider = None
    if pool != "cpu":
        import torch

        if not torch.cuda.is_available():
            return QualityReport(True, [], {}, asdict(t), source, len(prompts), digest,
                                 skipped_reason=f"the compiler has no GPU to run a {pool} build on; "
                                                "only its smoke test ran")
        provider = "cuda"
    ids = tokenize(checkpoint, prompts)
    routes: dict = {}
    # the build first: its runtime frees the build's weights before the PyTorch reference loads
    # layers, so the two never hold memory together (the compile's peak RSS, issue 10)
    got = build_logits(build_dir, ids, provider)
    ref = reference_logits(checkpoint, ids, routes)
    metrics = compare(list(zip(ref, got, ids)))
    failures = judge(metrics, t)
    m = asdict(metrics)
    m["perplexity_increase_pct"] = metrics.perplexity_increase_pct
    extra = {}
    if llama4_precision and routes:
        from compiler_service.llama4_router_flips import router_flips

        extra["router_flips"] = router_flips(checkpoint, ids, llama4_precision, routes)
    return QualityReport(not failures, failures, m, asdict(t), source, len(prompts), digest,
                         seconds=round(time.perf_counter() - t0, 2), extra=extra)


def build_logits(build_dir: Path, token_ids: list[list[int]], provider: str | None = None) -> list[np.ndarray]:
    """The build's logits at every prompt position: one prefill per prompt through onnxruntime-genai
    (the runtime serving uses), whose logits output holds every position after a prefill."""
    import onnxruntime_genai as og

    config = og.Config(str(build_dir))
    config.clear_providers()
    if provider:
        config.append_provider(provider)
    model = og.Model(config)
    out = []
    for ids in token_ids:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 1, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        out.append(np.asarray(gen.get_output("logits"))[0].astype(np.float32))
        del gen
    del model
    return out
