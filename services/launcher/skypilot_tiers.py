"""What the skypilot backend asks SkyPilot for: a tier's clusters, their tasks, a run's price.

A tier (settings.skypilot_tiers) is `clusters` clusters named `<prefix>-<tier>-<k>`, each
with `accelerator` (`H100:1`, `H200:8`): one run at a time per cluster GPU. The cluster's
task (`launch_task`) is the user's template (deploy/skypilot/task.yaml: image, setup, env)
with the harness as workdir, so its setup installs the requirements and runs prepare.py
once per cluster. A run's task (`exec_task`) syncs a workdir holding only
`runs/<run_id>/<edit_file>` (SkyPilot's workdir sync only adds files, so the harness stays)
and runs RUN_SCRIPT: the run's own directory, train.py's exit code printed and returned.
"""

from __future__ import annotations

import base64
import re
import shlex
from pathlib import Path
from typing import Any

from services.launcher.skypilot_adapter import TaskConfig
from services.settings import Settings, SettingsError, SkyTier

EXIT_MARKER = "[nightshift] exit code:"
_EXIT_RE = re.compile(r"^\[nightshift\] exit code: (-?\d+)\s*$", re.MULTILINE)
# SkyPilot may prefix a job's lines with `(task-name, pid=123) ` and colour them.
_PREFIX_RE = re.compile(r"^\([^()]*, pid=\d+\) ")
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")

# The run command of every run: its own directory under ~/sky_workdir/runs, the harness
# linked in beside the variant's file, and train.py's exit code as the job's.
RUN_SCRIPT = """\
cd "runs/$NIGHTSHIFT_RUN_ID" || exit 90
for f in ../../*; do
  b="$(basename "$f")"
  [ "$b" = runs ] || [ -e "$b" ] || ln -s "$f" "$b"
done
python {edit_file}
code=$?
echo "{marker} $code"
exit $code
"""

# Pool mode: a managed job may carry no workdir, so the variant's file travels inside its
# run command (base64) and is written to the run's own directory under the worker's
# ~/sky_workdir (the pool's workdir: the harness), where SkyPilot starts every job.
WRITE_SOURCE = """\
mkdir -p "runs/$NIGHTSHIFT_RUN_ID" || exit 90
base64 -d > "runs/$NIGHTSHIFT_RUN_ID/{edit_file}" <<'NIGHTSHIFT_SOURCE' || exit 90
{encoded}
NIGHTSHIFT_SOURCE
"""


def tier_of(settings: Settings) -> SkyTier:
    """The tier this launcher serves (settings.tier), checked against the tier list."""
    names = [t.name for t in settings.skypilot_tiers]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SettingsError(f"setting 'skypilot_tiers' names {duplicates} more than once")
    for tier in settings.skypilot_tiers:
        if tier.name == settings.tier:
            return tier
    raise SettingsError(
        f"backend 'skypilot' serves tier {settings.tier!r}, which is not in 'skypilot_tiers' "
        f"({', '.join(names) or 'none configured'}); add it, or set NIGHTSHIFT_TIER to one of them"
    )


def accelerator_parts(accelerator: str) -> tuple[str, int]:
    """`H100:8` -> ("H100", 8); `H100` -> ("H100", 1)."""
    name, _, count = accelerator.partition(":")
    return name, int(count) if count else 1


def cluster_names(prefix: str, tier: SkyTier) -> list[str]:
    return [f"{prefix}-{tier.name}-{k}" for k in range(tier.clusters)]


def resources(tier: SkyTier, accelerators: str, template: TaskConfig) -> dict[str, Any]:
    out: dict[str, Any] = dict(template.get("resources") or {})
    out["accelerators"] = accelerators
    out["use_spot"] = tier.spot
    if tier.infra:
        out["infra"] = tier.infra
    return out


def load_template(path: str | Path) -> TaskConfig:
    """The user's task template; a SettingsError that says which file when it is unusable."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"setting 'skypilot_template': cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"setting 'skypilot_template': {path} is not a YAML mapping")
    return data


def launch_task(template: TaskConfig, tier: SkyTier, harness_dir: Path, profile: str) -> TaskConfig:
    """The cluster's task: the template, the harness as workdir, setup but no run."""
    task = {k: v for k, v in template.items() if k not in ("run", "num_nodes")}
    task["name"] = f"nightshift-{tier.name}"
    task["workdir"] = str(harness_dir)
    task["resources"] = resources(tier, tier.accelerator, template)
    task["envs"] = {**(template.get("envs") or {}), "NIGHTSHIFT_PROFILE": profile}
    return task


def exec_task(
    template: TaskConfig,
    tier: SkyTier,
    stage_dir: Path,
    *,
    run_id: str,
    edit_file: str,
    profile: str,
    replica: int,
) -> TaskConfig:
    """A run's task: one GPU of the cluster, the variant's file in its own directory."""
    name, _count = accelerator_parts(tier.accelerator)
    envs = {
        **(template.get("envs") or {}),
        "NIGHTSHIFT_PROFILE": profile,
        "NIGHTSHIFT_RUN_ID": run_id,
        "PYTHONUNBUFFERED": "1",
    }
    if replica > 0:  # replica 0 runs the source's own SEED, as on the local backend
        envs["NIGHTSHIFT_SEED"] = str(replica)
    return {
        "name": run_id,
        "workdir": str(stage_dir),
        "resources": resources(tier, f"{name}:1", template),
        "envs": envs,
        "run": RUN_SCRIPT.format(edit_file=shlex.quote(edit_file), marker=EXIT_MARKER),
    }


def pool_name(prefix: str, tier: SkyTier) -> str:
    return f"{prefix}-{tier.name}"


def pool_task(template: TaskConfig, tier: SkyTier, harness_dir: Path, profile: str) -> TaskConfig:
    """The pool's task: a cluster's task (setup, harness as workdir) and `clusters` workers."""
    task = launch_task(template, tier, harness_dir, profile)
    task["pool"] = {"workers": tier.clusters}
    return task


def pool_job_task(
    template: TaskConfig, tier: SkyTier, *, run_id: str, edit_file: str, source: str,
    profile: str, replica: int,
) -> TaskConfig:  # fmt: skip
    """A run as a managed job on the pool: the whole worker, its file inside the command."""
    task = exec_task(
        template, tier, Path("."), run_id=run_id, edit_file=edit_file, profile=profile,
        replica=replica,
    )  # fmt: skip
    del task["workdir"]
    task["resources"] = {"accelerators": tier.accelerator}  # as the pool's workers have it
    encoded = base64.encodebytes(source.encode()).decode().rstrip("\n")
    quoted = shlex.quote(edit_file)
    task["run"] = WRITE_SOURCE.format(edit_file=quoted, encoded=encoded) + task["run"]
    return task


def stage_run(stage_dir: Path, run_id: str, edit_file: str, source: str) -> None:
    """The exec workdir: `runs/<run_id>/<edit_file>` and nothing else."""
    target = stage_dir / "runs" / run_id / edit_file
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(source)


def exit_code_of(log_text: str) -> int | None:
    """train.py's exit code as the run script printed it; None when it never got there."""
    found = _EXIT_RE.findall(log_text)
    return int(found[-1]) if found else None


def clean_line(line: str) -> str:
    """A log line without SkyPilot's `(task, pid=N)` prefix and colour codes."""
    return _PREFIX_RE.sub("", _ANSI_RE.sub("", line))


def gpu_cost(tier: SkyTier, seconds: float) -> tuple[float, float]:
    """(GPU-seconds, dollars) of a run that held one GPU for `seconds`."""
    gpu_seconds = max(0.0, seconds)
    return gpu_seconds, gpu_seconds / 3600.0 * tier.usd_per_gpu_hour
