"""Is a summary block a result the run could have produced? Pure checks, no broker.

A training script is written by a language model: it can print any block. What it cannot
change is what the launcher measured (when the run started and ended, the budget it was
given), so the block's own claims are checked against those:

- the training time it claims must fit in the run's wall time (a block claiming 300 s of
  training from a process that lived 1.5 s did not train);
- it must not fall far below the budget (the harness trains until the budget is spent);
- the steps and tokens it claims must be positive and consistent with each other and with
  the time (at least one token a step, no more tokens per second than any accelerator);
- the metric must be in its range (bits per byte between 0 and 20) and the counters
  non-negative.

Each check returns why the numbers cannot be real ('' when they can); the evaluator
records such a run as `implausible` with that reason, never with a metric.
"""

from __future__ import annotations

from services.contracts import NON_NEGATIVE_KEYS, RunFinished

BPB_CEILING = 20.0  # bits per byte beyond this is a bug, not a result (uniform bytes: 8)
# A run's claimed training may exceed the launcher's wall clock by this share plus slack
# (the trainer's clock and the launcher's are read at different instants).
WALL_TOLERANCE = 0.02
WALL_SLACK_S = 0.05
# The harness trains until the budget is spent: a claim below this share of it is no run.
MIN_BUDGET_SHARE = 0.5
# More tokens per second of training than this is no accelerator (an H200: ~1.6M).
MAX_TOKENS_PER_S = 1e9


def metric_range(metric: str, value: float, metrics: dict[str, float]) -> str:
    """The metric out of its range, or a counter below zero."""
    bpb_like = metric.endswith("bpb") or metric.endswith("loss")
    if bpb_like and not 0.0 < value < BPB_CEILING:
        return f"implausible {metric} {value!r} (expected between 0 and {BPB_CEILING:g})"
    for key in NON_NEGATIVE_KEYS:
        if key in metrics and not metrics[key] >= 0:
            return f"implausible {key} {metrics[key]!r} (expected >= 0)"
    return ""


def training_time(finished: RunFinished, metrics: dict[str, float]) -> str:
    """The claimed training time against the launcher's wall clock and the budget."""
    claimed = metrics.get("training_seconds")
    if claimed is None:
        return ""
    scale = finished.clock_scale if finished.clock_scale > 0 else 1.0
    wall = max(0.0, finished.finished_at - finished.started_at) / scale
    if claimed > wall * (1 + WALL_TOLERANCE) + WALL_SLACK_S / scale:
        return (
            f"implausible training_seconds {claimed:g}: the launcher measured the whole run "
            f"at {wall:.1f}s"
        )
    total = metrics.get("total_seconds")
    if total is not None and claimed > total * (1 + WALL_TOLERANCE) + WALL_SLACK_S:
        return f"implausible training_seconds {claimed:g} > total_seconds {total:g}"
    budget = finished.budget_s
    if budget > 0 and claimed < budget * MIN_BUDGET_SHARE:
        return (
            f"implausible training_seconds {claimed:g}: far below the budget of {budget:g}s "
            "(the harness trains until the budget is spent)"
        )
    return ""


def steps_and_tokens(metrics: dict[str, float]) -> str:
    """Steps and tokens: positive, at least one token a step, a possible throughput."""
    steps, tokens_m = metrics.get("num_steps"), metrics.get("total_tokens_M")
    if steps is not None and steps <= 0:
        return f"implausible num_steps {steps:g}: the run claims no training step"
    if tokens_m is not None and tokens_m <= 0:
        return f"implausible total_tokens_M {tokens_m:g}: the run claims no training token"
    if steps is not None and tokens_m is not None and tokens_m * 1e6 < steps:
        return (
            f"inconsistent summary: {tokens_m:g}M tokens in {steps:g} steps "
            "(less than one token a step)"
        )
    seconds = metrics.get("training_seconds")
    if tokens_m is not None and seconds is not None and seconds > 0:
        rate = tokens_m * 1e6 / seconds
        if rate > MAX_TOKENS_PER_S:
            return (
                f"inconsistent summary: {tokens_m:g}M tokens in {seconds:g}s of training "
                f"({rate:.3g} tokens/s, beyond any accelerator)"
            )
    return ""


def implausible(finished: RunFinished, metric: str, value: float, metrics: dict[str, float]) -> str:
    """Why the block cannot be a real result of this run; '' when it can."""
    return (
        metric_range(metric, value, metrics)
        or training_time(finished, metrics)
        or steps_and_tokens(metrics)
    )
