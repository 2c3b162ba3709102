"""The `sim` backend: a simulated fleet whose runs sleep instead of training.

A run "trains" for sim_budget_s x sim_time_scale seconds of asyncio sleep (no subprocess,
so hundreds of slots fit on two cores), emitting real-shaped progress lines, then ends with
a log the evaluator parses like any run's: autoresearch's summary block with val_bpb from
the landscape (reference: the campaign's seed), or a real-shaped failure (CUDA OOM
traceback, divergence FAIL, the SyntaxError of a source that does not compile).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
import time
import traceback

import msgspec

from services.contracts import cancelled_line, format_summary, knob_values_only, timed_out_line
from services.launcher import landscape as ls
from services.launcher.backend import FixedSlots, Job, LineCallback, RunOutcome

OVERHEAD_S = 25.0  # simulated start-up + evaluation seconds beyond the training budget
PROGRESS_LINES = 5


class SimParams(msgspec.Struct, frozen=True, kw_only=True):
    """What a simulated run is like; each field is the setting of the same name."""

    sim_budget_s: float = 300.0
    sim_time_scale: float = 0.002
    sim_noise: float = 7e-4
    sim_failure_rate: float = 0.5
    sim_seed: int = 0
    sim_speed: float = 1.0
    sim_memory_gb: float = 141.0


class SimBackend(FixedSlots):
    name = "sim"
    reports_placement = False

    def __init__(self, params: SimParams | None = None, slots: int = 1, host: str = "sim") -> None:
        self.params = params or SimParams()
        self._slots = max(1, slots)
        self.host = host
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancelled: dict[str, str] = {}
        self._landscapes: dict[tuple[str, str], ls.Landscape] = {}

    def placement(self, _slot: int) -> tuple[str, str]:
        return self.host, "sim"  # every slot is on the one simulated host

    def landscape(self, reference: str, profile: str = "") -> ls.Landscape:
        """The landscape over the knobs of `reference` that take effect on `profile`."""
        found = self._landscapes.get((reference, profile))
        if found is None:
            if len(self._landscapes) > 64:
                self._landscapes.clear()
            found = ls.Landscape(reference, seed=self.params.sim_seed, profile=profile)
            self._landscapes[reference, profile] = found
        return found

    def observe(self, job: Job) -> ls.SimObservation:
        reference = job.reference_source if job.reference_source is not None else job.source
        # A variant that only changes knob values compiles when its reference does; skipping
        # the compile keeps the simulator's own CPU out of the orchestration it measures.
        if not knob_values_only(job.source, reference):
            try:
                compile(job.source, job.edit_file, "exec")
            except (SyntaxError, ValueError) as exc:
                return ls.SimObservation(None, "crash", None, f"{type(exc).__name__}: {exc}")
        try:
            scape = self.landscape(reference, job.profile)
        except SyntaxError:
            scape = ls.Landscape("", seed=self.params.sim_seed, profile=job.profile)
        p = self.params
        obs = scape.observe(
            job.source, f"{p.sim_seed}:{job.run_id}", p.sim_noise, p.sim_failure_rate
        )
        return on_tier(obs, job.source, p)

    async def run(self, job: Job, on_line: LineCallback) -> RunOutcome:
        started = time.time()
        obs = self.observe(job)
        budget_s = self.params.sim_budget_s
        outcome = RunOutcome(
            None, started, started, clock_scale=self.params.sim_time_scale, budget_s=budget_s
        )
        sim_seconds = simulated_seconds(obs, budget_s, f"{self.params.sim_seed}:{job.run_id}")
        limit = job.timeout_s
        lines: list[str] = [f"sim: {job.run_id} on {self.host} (profile {job.profile})"]

        def emit(line: str) -> None:
            lines.append(line)
            # Last resort: on_line is the caller's observer; whatever it raises must not
            # end the simulated run (the local backend guards its calls the same way).
            with contextlib.suppress(Exception):
                on_line(line)

        task = asyncio.create_task(self._train(obs, min(sim_seconds, limit), emit))
        self._tasks[job.run_id] = task
        try:
            await task
        except asyncio.CancelledError:
            if job.run_id not in self._cancelled:
                raise  # our own caller was cancelled, not the run
            outcome.cancelled = True
            lines.append(cancelled_line(self._cancelled[job.run_id]))
        finally:
            self._tasks.pop(job.run_id, None)
            self._cancelled.pop(job.run_id, None)
        if not outcome.cancelled:
            if sim_seconds > limit:
                outcome.timed_out = True
                lines.append(timed_out_line(limit))
            else:
                outcome.exit_code = _finish(job, obs, budget_s, lines, self.params.sim_speed)
        outcome.log_text = "\n".join(lines) + "\n"
        outcome.finished_at = time.time()
        return outcome

    async def _train(self, obs: ls.SimObservation, sim_seconds: float, emit: LineCallback) -> None:
        """Sleep the scaled time, printing progress lines along the way."""
        wall = sim_seconds * self.params.sim_time_scale
        budget_s = self.params.sim_budget_s
        if obs.failure == "crash":
            await asyncio.sleep(wall)
            return
        total_steps = 953
        loss0, loss1 = 9.0, 3.2 + (obs.true_val_bpb or 1.0)
        train_fraction = min(sim_seconds / budget_s, 1.0) if budget_s > 0 else 1.0
        for k in range(1, PROGRESS_LINES + 1):
            await asyncio.sleep(wall / PROGRESS_LINES)
            frac = train_fraction * k / PROGRESS_LINES
            step = int(total_steps * frac)
            loss = loss1 + (loss0 - loss1) * (1 - frac) ** 3
            if obs.failure == "diverged" and k == PROGRESS_LINES:
                loss = float("nan")
            emit(
                f"step {step:05d} ({frac * 100:.1f}%) | loss: {loss:.6f} | lrm: 1.00 | "
                f"dt: 314ms | tok/sec: {1_668_123 + 1000 * k:,} | mfu: 39.8% | epoch: 1 | "
                f"remaining: {max(0.0, budget_s * (1 - frac)):.0f}s"
            )

    async def cancel(self, run_id: str, reason: str = "") -> None:
        task = self._tasks.get(run_id)
        if task is None or task.done():
            return
        self._cancelled[run_id] = reason
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)


# val_bpb gained per unit of log(speed): a tier 9% faster trains 9% more steps in the same
# budget and ends ~0.0017 lower (the published H200 vs H100 gap is of that order).
SPEED_GAIN = 0.02


def on_tier(obs: ls.SimObservation, source: str, p: SimParams) -> ls.SimObservation:
    """The observation on this launcher's tier: a faster tier ends lower; a variant whose
    memory exceeds the tier's GPU memory fails as out-of-memory."""
    if obs.val_bpb is None:
        return obs
    peak_gb = peak_vram_mb(source) / 1024
    if p.sim_memory_gb > 0 and peak_gb > p.sim_memory_gb:
        detail = f"peak memory {peak_gb:.0f} GB > the tier's {p.sim_memory_gb:g} GB"
        return dataclasses.replace(obs, val_bpb=None, failure="oom", detail=detail)
    gain = SPEED_GAIN * math.log(p.sim_speed) if p.sim_speed > 0 else 0.0
    return dataclasses.replace(obs, val_bpb=obs.val_bpb - gain)


def _depth_scale(source: str) -> tuple[int, float]:
    """DEPTH and the model's size relative to depth 8 (memory and time grow as depth**3)."""
    try:
        constants = ls.parse_constants(source)
    except SyntaxError:
        constants = {}
    depth = int(constants.get("DEPTH", 8))
    return depth, (depth / 8) ** 3


def peak_vram_mb(source: str) -> float:
    """The simulated peak GPU memory of a source (45 GB at the seed's depth 8)."""
    return 45060.2 * max(_depth_scale(source)[1], 0.05)


def simulated_seconds(obs: ls.SimObservation, budget_s: float, key: str) -> float:
    """How long the simulated run lasts: an OOM dies at start, a divergence mid-way.

    Start-up and evaluation vary from run to run (compilation, data loading), as on real
    machines, so a fleet's runs do not all end in the same instant.
    """
    if obs.failure == "crash":
        return 1.0
    if obs.failure == "oom":
        return min(budget_s, 0.05 * budget_s + 10.0)
    if obs.failure == "diverged":
        return 0.3 * budget_s
    jitter = random.Random(key).uniform(0.6, 1.4)
    return budget_s + OVERHEAD_S * jitter


def _finish(
    job: Job, obs: ls.SimObservation, budget_s: float, lines: list[str], speed: float
) -> int:
    """Append the end of the log; return the exit code."""
    if obs.failure == "crash":
        lines.extend(_crash_traceback(job, obs.detail))
        return 1
    if obs.failure == "oom":
        lines.extend(_OOM_TRACEBACK)
        return 1
    if obs.failure == "diverged":
        lines.append("FAIL")
        return 1
    lines.extend(summary_block(job.source, obs.val_bpb or 0.0, budget_s, speed))
    return 0


def summary_block(source: str, val_bpb: float, budget_s: float, speed: float = 1.0) -> list[str]:
    """DESIGN §5's block, with plausible numbers derived from the source's constants."""
    depth, scale = _depth_scale(source)
    steps = max(1, int(953 * speed / max(scale, 0.05)))
    return format_summary(
        {
            "val_bpb": f"{val_bpb:.6f}",
            "training_seconds": f"{budget_s + 0.1:.1f}",
            "total_seconds": f"{budget_s + OVERHEAD_S + 0.9:.1f}",
            "peak_vram_mb": f"{peak_vram_mb(source):.1f}",
            "mfu_percent": "39.80",
            "total_tokens_M": f"{steps * 0.524288:.1f}",
            "num_steps": str(steps),
            "num_params_M": f"{50.3 * scale:.1f}",
            "depth": str(depth),
        }
    )


def _crash_traceback(job: Job, detail: str) -> list[str]:
    """A SyntaxError's lines, or the assertion a knob outside its domain trips."""
    try:
        compile(job.source, job.edit_file, "exec")
    except (SyntaxError, ValueError) as exc:
        return "".join(traceback.format_exception_only(exc)).rstrip("\n").split("\n")
    return [
        "Traceback (most recent call last):",
        f'  File "{job.edit_file}", line 565, in <module>',
        detail or "RuntimeError: simulated crash",
    ]


_OOM_TRACEBACK = [
    "Traceback (most recent call last):",
    '  File "train.py", line 512, in <module>',
    "    loss = model(x, y)",
    '  File "torch/nn/modules/module.py", line 1751, in _wrapped_call_impl',
    "    return self._call_impl(*args, **kwargs)",
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
    "total capacity of 79.19 GiB of which 1.21 GiB is free. Of the allocated memory 75.02 GiB "
    "is allocated by PyTorch, and 1.30 GiB is reserved by PyTorch but unallocated.",
]
