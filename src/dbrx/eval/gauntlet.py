"""LLM Foundry's Eval Gauntlet (llmfoundry/callbacks/eval_gauntlet_callback.py): each benchmark's accuracy rescaled
as (acc - random_baseline) / (1 - random_baseline), averaged per category (weighted EQUAL, SAMPLE_SZ or
LOG_SAMPLE_SZ), then named averages over categories. Foundry silently drops a category with a missing benchmark;
here such a category is reported as incomplete, naming what is missing, and the averages say which categories they
left out."""

from __future__ import annotations

import math
from typing import Any

from dbrx.eval.tasks import EvalError

PREFIX = "icl/metrics/eval_gauntlet"


def gauntlet_scores(cfg: dict, metrics: dict[str, float], sizes: dict[str, int]) -> dict[str, Any]:
    """`metrics`: Foundry-named results (metrics/{label}/{k}-shot[/{category}]/{Metric}); `sizes`: examples per
    "{label}/{k}-shot". Returns the logged values under Foundry's names, plus `incomplete` and `benchmarks`."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("categories"), list):
        raise EvalError("eval_gauntlet: expected a mapping with a 'categories' list")
    weighting = str(cfg.get("weighting", "EQUAL")).upper()
    if weighting not in ("EQUAL", "SAMPLE_SZ", "LOG_SAMPLE_SZ"):
        raise EvalError(f"eval_gauntlet.weighting: {weighting!r} is not EQUAL, SAMPLE_SZ or LOG_SAMPLE_SZ")
    subtract = bool(cfg.get("subtract_random_baseline", True))
    rescale = bool(cfg.get("rescale_accuracy", True))
    if rescale and not subtract:
        raise EvalError("eval_gauntlet: rescale_accuracy needs subtract_random_baseline")
    # a benchmark's score: the plain mean of its accuracy entries (its categories', with has_categories)
    found: dict[str, list[float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) >= 4 and "Accuracy" in parts[-1]:
            found.setdefault("/".join(parts[1:3]), []).append(value)
    out: dict[str, Any] = {"benchmarks": {}, "incomplete": {}}
    categories = {}
    for c, category in enumerate(cfg["categories"]):
        name = category.get("name") if isinstance(category, dict) else None
        if not name or not isinstance(category.get("benchmarks"), list):
            raise EvalError(f"eval_gauntlet.categories[{c}]: expected {{name, benchmarks: [...]}}")
        total = weights = 0.0
        missing = []
        for b, bench in enumerate(category["benchmarks"]):
            try:
                key = f"{bench['name']}/{bench['num_fewshot']}-shot"
                baseline = float(bench["random_baseline"])
            except (KeyError, TypeError, ValueError):
                raise EvalError(f"eval_gauntlet.categories[{c}].benchmarks[{b}]: expected name, num_fewshot and "
                                "random_baseline") from None
            if key not in found:
                missing.append(key)
                continue
            score = sum(found[key]) / len(found[key])
            if subtract:
                score -= baseline
            if rescale:
                score /= 1.0 - baseline
            size = sum(n for label, n in sizes.items() if label.startswith(key))
            weight = {"EQUAL": 1.0, "SAMPLE_SZ": max(size, 1),
                      "LOG_SAMPLE_SZ": max(math.log2(max(size, 1)), 1)}[weighting]
            out["benchmarks"][key] = score
            total += score * weight
            weights += weight
        if missing:
            out["incomplete"][name] = missing
        elif weights:
            categories[name] = total / weights
            out[f"{PREFIX}/{name}"] = categories[name]
    averages = cfg.get("averages") or {"default_average": [c["name"] for c in cfg["categories"]]}
    for avg, names in averages.items():
        if avg in categories or avg in [c["name"] for c in cfg["categories"]]:
            raise EvalError(f"eval_gauntlet.averages: {avg!r} is also a category name")
        present = [n for n in names if n in categories]
        out[f"{PREFIX}/{avg}"] = sum(categories[n] for n in present) / len(present) if present else 0.0
        left_out = [n for n in names if n not in categories]
        if left_out:
            out["incomplete"][avg] = [f"category {n}" for n in left_out]
    return out
