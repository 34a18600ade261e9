"""The papers' claims, checked on a compare's results with their numbers.

Each claim compares a metric between two entries over the seeds. It is *supported* when the difference has the
paper's sign and Welch's t-test (unequal variances, two-sided) gives p < ALPHA; *contradicted* when it is
significant the other way; otherwise *not separable at this scale* (never a win). With fewer than two seeds per
side nothing is separable. A claim whose entries are not in the compare is *not tested*, with what it needs.

- LoCA: learned locations (``alternate_until > 0``) reach a lower held-out loss than the same budget with its
  random locations kept fixed (``alternate_until: 0``).
- FO-LoRA: on mixed tasks (``data.tasks``), a lower held-out loss per task than one shared LoRA (less
  interference): the mean over tasks of each task's loss.
- FRoD: faster early convergence than LoRA: the mean training loss over the first quarter of the steps.
- OD-LoRA: its gradient is better aligned with the full-parameter gradient than LoRA's: the mean over steps of
  cos(G, G̃) (``probes.GradientCosine``).
- ScaLoRA: faster loss descent than LoRA (the mean training loss over all steps), and rank(W_T − W_0) > r at every
  measured site in every seed.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Sequence

ALPHA = 0.05


def welch(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test, or None when it is undefined (fewer than 2 values a side, or no
    variance on either side and equal means)."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy import stats

    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    if math.isnan(p):
        return 0.0 if statistics.fmean(a) != statistics.fmean(b) else None
    return p


def _verdict(ours: list[float], theirs: list[float], lower_is_better: bool) -> tuple[str, float | None]:
    p = welch(ours, theirs)
    if p is None or p >= ALPHA:
        return "not separable at this scale", p
    better = statistics.fmean(ours) < statistics.fmean(theirs) if lower_is_better else \
        statistics.fmean(ours) > statistics.fmean(theirs)
    return ("supported" if better else "contradicted"), p


def _first(results: dict[str, list[dict]], pred: Callable[[dict], bool]) -> str | None:
    return next((label for label, runs in results.items() if runs and pred(runs[0])), None)


def _method(name: str) -> Callable[[dict], bool]:
    return lambda r: r["method"] == name


def final_loss(run: dict) -> float:
    return run["eval_after"]["eval_loss"]


def task_losses(run: dict) -> dict[str, float]:
    """Each task's held-out loss (multitask data), else empty."""
    return {k[5:-5]: v for k, v in run["eval_after"].items() if k.startswith("eval_") and k.endswith("_loss")
            and k != "eval_loss"}


def train_losses(run: dict) -> list[float]:
    """The loss of every optimizer step (a skipped non-finite step made none: ``train/guards.py``)."""
    return [r["loss"] for r in run["history"] if "lr" in r and not r.get("skipped")]


def mean_loss(fraction: float) -> Callable[[dict], float]:
    """The mean training loss over the first ``fraction`` of the steps (an area under the loss curve)."""
    def metric(run: dict) -> float:
        losses = train_losses(run)
        return statistics.fmean(losses[:max(1, math.ceil(fraction * len(losses)))])
    return metric


def mean_cosine(run: dict) -> float:
    return statistics.fmean(run["gradient_cosine"])


def _compare(claim: str, paper: str, metric_name: str, results: dict[str, list[dict]], ours: str | None,
             theirs: str | None, metric: Callable[[dict], float], lower_is_better: bool, needs: str) -> dict[str, Any]:
    row: dict[str, Any] = {"claim": claim, "paper": paper, "metric": metric_name, "ours": ours, "theirs": theirs}
    if ours is None or theirs is None:
        return {**row, "verdict": f"not tested: needs {needs}", "p": None}
    try:
        a, b = [metric(r) for r in results[ours]], [metric(r) for r in results[theirs]]
    except (KeyError, TypeError, statistics.StatisticsError) as e:
        return {**row, "verdict": f"not tested: {metric_name} unavailable ({e})", "p": None}
    verdict, p = _verdict(a, b, lower_is_better)
    return {**row, "values": {ours: a, theirs: b}, "verdict": verdict, "p": p}


def evaluate_claims(spec: Any, results: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """Every claim's row: the entries compared, each seed's metric, the verdict and Welch's p."""
    lora = _first(results, _method("lora"))
    loca_learned = _first(results, lambda r: r["method"] == "loca" and r["options"].get("alternate_until", 1) > 0)
    loca_fixed = _first(results, lambda r: r["method"] == "loca" and r["options"].get("alternate_until") == 0)
    multitask = any(task_losses(r[0]) for r in results.values() if r)
    rows = [
        _compare("LoCA", "learned locations beat the same budget with random fixed locations", "held-out loss",
                 results, loca_learned, loca_fixed, final_loss, True,
                 "a LoCA entry and one with alternate_until: 0"),
        _compare("FO-LoRA", "less task interference than one shared LoRA of the same size on mixed tasks",
                 "mean of the per-task held-out losses", results, _first(results, _method("folora")) if multitask
                 else None, lora, lambda r: statistics.fmean(task_losses(r).values()), True,
                 "an FO-LoRA and a LoRA entry on multitask data (data.tasks)"),
        _compare("FRoD", "faster early convergence than LoRA", "mean training loss, first quarter of the steps",
                 results, _first(results, _method("frod")), lora, mean_loss(0.25), True, "a FRoD and a LoRA entry"),
        _compare("OD-LoRA", "gradient better aligned with the full-parameter gradient than LoRA's",
                 "mean cos(G, G̃) over steps", results, _first(results, _method("odlora")), lora, mean_cosine, False,
                 "an OD-LoRA and a LoRA entry on an engine with whole weights"),
        _compare("ScaLoRA", "faster loss descent than LoRA", "mean training loss over all steps", results,
                 _first(results, _method("scalora")), lora, mean_loss(1.0), True, "a ScaLoRA and a LoRA entry"),
    ]
    rows.append(_rank_claim(results, _first(results, _method("scalora"))))
    return rows


def _rank_claim(results: dict[str, list[dict]], label: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {"claim": "ScaLoRA", "paper": "rank(W_T − W_0) > r", "metric": "smallest site rank",
                           "ours": label, "theirs": None, "p": None}
    runs = results.get(label, []) if label else []
    if not runs or any(r["update_rank"] is None for r in runs):
        why = runs[0]["probes_skipped"] if runs else None
        return {**row, "verdict": f"not tested: {why or 'needs a ScaLoRA entry'}"}
    r = runs[0]["options"]["r"]
    smallest = [min(run["update_rank"].values()) for run in runs]
    return {**row, "values": {label: smallest}, "r": r,
            "verdict": "supported" if all(s > r for s in smallest) else "contradicted"}
