"""Configuration: defaults < `nightshift.toml` < environment variables < command-line flags.

Every field `name` can be set by the environment variable `NIGHTSHIFT_<NAME>` (upper case)
or by the key `name` in `nightshift.toml` (in the working directory, or the file named by
`NIGHTSHIFT_CONFIG`). `NATS_URL` is also read as is, as every NATS tool does.

Each field's type says what it accepts: msgspec converts a raw toml or environment value to
it (lax: "4" is an int), checks its range (`Meta(ge=...)`) and its choices (a `Literal`), so
a bad value fails at load time with an error naming the setting and where its value came
from, not minutes later in the service that reads it. The field's `Meta(description=...)`
is the one line the CLI shows as a flag's help: the settings are the only list of options.

The NATS credentials (`nats_password`, `nats_token`, a password inside `nats_url`) are
settings so that every service reads them the same way, and are never printed: `repr()` and
`redacted()` mask them. ANTHROPIC_API_KEY stays out of the settings (see the proposer).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

Backend = Literal["local", "sim", "skypilot"]
Direction = Literal["minimize", "maximize"]
StrategyName = Literal["auto", "grid", "claude"]
KeepRuleName = Literal["noise-aware", "strict"]  # the names in services.ledger.keep.RULES
LogFormat = Literal["", "json", "console"]
SandboxMode = Literal["auto", "bwrap", "none"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
# Level names are written either way (logging prints INFO): accepted in any case.
CASE_FREE_SETTINGS = frozenset({"log_level"})

# Settings whose values are secrets: masked by repr() and redacted().
SECRET_SETTINGS = frozenset({"nats_password", "nats_token", "api_token"})
REDACTED = "[redacted]"


class SettingsError(ValueError):
    """A setting with a bad value; the message names the setting and where it came from."""


class SkyTier(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """One hardware tier of the skypilot backend: `clusters` clusters of `accelerator`."""

    name: Annotated[str, Meta(min_length=1, pattern=r"^[a-z0-9][a-z0-9-]*$")]
    accelerator: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]+(:[1-9][0-9]*)?$")] = "H100:1"
    clusters: Annotated[int, Meta(ge=1)] = 1
    infra: str = ""  # "k8s/<context>", "aws", "gcp/us-central1", ...; empty: any enabled
    spot: bool = False
    autostop_minutes: Annotated[int, Meta(ge=-1)] = 10  # -1: never
    usd_per_gpu_hour: Annotated[float, Meta(ge=0)] = 0.0
    # clusters: our own clusters, one sky.exec per run; pool: SkyPilot managed jobs on a
    # pool of `clusters` workers (sky.jobs.launch(task, pool=...)): SkyPilot recovers spot.
    mode: Literal["clusters", "pool"] = "clusters"
    # clusters mode: submit the next run's sky.exec this many seconds before the run ahead
    # of it on the cluster is expected to end (0: never), hiding SkyPilot's exec latency.
    presubmit_s: Annotated[float, Meta(ge=0)] = 15.0


class Settings(msgspec.Struct, kw_only=True):
    """Every option of every service; build it with `load_settings()`.

    `Settings(**values)` and `msgspec.structs.replace()` do not check ranges or choices
    (msgspec checks on conversion, not on construction): call `validate_settings()` on
    settings built in code from values that did not come through `load_settings()`.
    """

    # --- broker ---------------------------------------------------------------------
    nats_url: Annotated[
        str,
        Meta(description="NATS server URL; empty: `nightshift up` starts a private nats-server"),
    ] = ""
    nats_creds: Annotated[str, Meta(description="path to a NATS credentials file")] = ""
    nats_user: Annotated[str, Meta(description="NATS user name (with nats_password)")] = ""
    nats_password: Annotated[str, Meta(description="NATS password (never printed)")] = ""
    nats_token: Annotated[str, Meta(description="NATS auth token (never printed)")] = ""
    subject_prefix: Annotated[str, Meta(description="prefix of every NATS subject")] = "ns"
    replicas: Annotated[
        int,
        Meta(
            ge=1,
            le=5,
            description="copies a NATS cluster keeps of the stream and buckets (3: survives a node)",
        ),
    ] = 1
    home: Annotated[
        str, Meta(description="state directory: nats store, ledger, run directories")
    ] = ".nightshift"

    # --- ledger ---------------------------------------------------------------------
    ledger_db: Annotated[str, Meta(description="ledger database; empty: <home>/ledger.db")] = ""
    http_host: Annotated[str, Meta(description="ledger HTTP address")] = "127.0.0.1"
    http_port: Annotated[
        int, Meta(ge=0, le=65535, description="ledger HTTP port (0: any free port)")
    ] = 8780
    api_token: Annotated[
        str,
        Meta(
            description="bearer token for POST /campaigns/{name}/stop and /resume "
            "(empty: those are off; never printed)"
        ),
    ] = ""
    api_token_reads: Annotated[
        bool, Meta(description="require api_token for every read too (not /healthz)")
    ] = False

    # --- launcher -------------------------------------------------------------------
    backend: Annotated[Backend, Meta(description="where runs execute")] = "local"
    slots: Annotated[int, Meta(ge=1, description="concurrent runs (one per GPU)")] = 1
    tier: Annotated[str, Meta(description="the hardware tier this launcher serves")] = "default"
    launcher_id: Annotated[str, Meta(description="launcher name; empty: hostname-pid")] = ""
    launcher_tiers: Annotated[
        str, Meta(description="comma-separated tiers one launcher process serves (empty: `tier`)")
    ] = ""
    run_dir: Annotated[str, Meta(description="run directories; empty: <home>/runs")] = ""
    gpus: Annotated[
        str, Meta(description="comma-separated CUDA device ids, one slot each (empty: CPU slots)")
    ] = ""
    log_tail_lines: Annotated[
        int, Meta(ge=0, description="lines of a failed run's log kept in its result")
    ] = 60
    sandbox: Annotated[
        SandboxMode,
        Meta(description="how local runs are confined: bwrap, none, or auto (bwrap when it works)"),
    ] = "auto"
    sandbox_network: Annotated[
        bool, Meta(description="whether a sandboxed run may use the network")
    ] = False
    sandbox_read_only: Annotated[
        str,
        Meta(
            description="comma-separated paths a sandboxed run may read "
            "(besides the system, Python and the data cache)"
        ),
    ] = ""
    run_log_max_bytes: Annotated[
        int, Meta(ge=1024, description="bytes of a run's output kept (its first and last halves)")
    ] = 4 * 1024 * 1024
    run_output_bytes_s: Annotated[
        int, Meta(ge=0, description="bytes per second read from a run's output (0: no limit)")
    ] = 1024 * 1024
    ack_wait_s: Annotated[
        float,
        Meta(
            gt=0,
            description="seconds before a message whose service went silent (a launcher's run, "
            "an evaluation, a ledger update) is delivered again",
        ),
    ] = 30.0
    gpu_usd_per_hour: Annotated[
        float,
        Meta(ge=0, description="price of one slot's accelerator per hour, for the GPU cost metric"),
    ] = 0.0
    sim_time_scale: Annotated[
        float, Meta(ge=0, description="sim: seconds of wall time per second of budget")
    ] = 0.002
    sim_budget_s: Annotated[
        float, Meta(gt=0, description="sim: the training budget a simulated run trains for")
    ] = 300.0
    sim_noise: Annotated[
        float, Meta(ge=0, description="sim: run-to-run spread of val_bpb (std)")
    ] = 7e-4
    sim_failure_rate: Annotated[
        float, Meta(ge=0, le=1, description="sim: failure chance for a value far from its optimum")
    ] = 0.5
    sim_seed: Annotated[int, Meta(description="sim: random seed")] = 0
    skypilot_tiers: Annotated[
        list[SkyTier],
        Meta(
            description="skypilot: the tiers (toml [[skypilot_tiers]], env a JSON list): "
            "name, accelerator, clusters, infra, spot, autostop_minutes, usd_per_gpu_hour, "
            "mode (clusters / pool), presubmit_s"
        ),
    ] = msgspec.field(default_factory=list)
    skypilot_cluster_prefix: Annotated[
        str,
        Meta(
            pattern=r"^[a-z][a-z0-9-]*$",
            description="skypilot: cluster names are <prefix>-<tier>-<k>",
        ),
    ] = "ns"
    skypilot_template: Annotated[
        str, Meta(description="skypilot: task template (image, setup, env)")
    ] = "deploy/skypilot/task.yaml"
    sim_speed: Annotated[
        float,
        Meta(gt=0, description="sim: this tier's training speed (1.09: 9% more steps, lower)"),
    ] = 1.0
    sim_memory_gb: Annotated[
        float,
        Meta(ge=0, description="sim: this tier's GPU memory; a larger variant is OOM (0: none)"),
    ] = 141.0

    # --- proposer -------------------------------------------------------------------
    strategy: Annotated[
        StrategyName,
        Meta(description="auto: claude when an Anthropic API key is configured, else grid"),
    ] = "auto"
    lookahead: Annotated[
        int,
        Meta(
            ge=0, description="variants queued beyond the slots (0: a quarter of the slots, >= 2)"
        ),
    ] = 0
    wave_size: Annotated[int, Meta(ge=0, description="variants per wave (0: free capacity)")] = 0
    lease_ttl_s: Annotated[
        float,
        Meta(
            gt=0,
            description="a proposer's lease on a campaign lapses when not renewed for this long; "
            "another proposer then takes the campaign over",
        ),
    ] = 4.0
    lease_renew_s: Annotated[
        float,
        Meta(
            gt=0,
            description="how often a proposer renews its campaign leases (at most a third of "
            "lease_ttl_s is used)",
        ),
    ] = 1.0
    noise_floor: Annotated[
        float,
        Meta(
            ge=0,
            description="run-to-run spread the proposer assumes until the ledger measures it "
            "(0: 0.017 on cpu, 7e-4 on gpu)",
        ),
    ] = 0.0
    model: Annotated[str, Meta(description="claude: model name; empty: the default")] = ""
    budget_usd: Annotated[float, Meta(ge=0, description="claude: spend cap (0: none)")] = 0.0
    budget_requests: Annotated[int, Meta(ge=0, description="claude: request cap (0: none)")] = 0
    claude_timeout_s: Annotated[
        float, Meta(gt=0, description="claude: seconds one request may take")
    ] = 240.0
    claude_max_retries: Annotated[
        int, Meta(ge=0, description="claude: SDK retries on 429 / 5xx / 529 overloaded")
    ] = 4
    claude_max_tokens: Annotated[
        int, Meta(ge=1, description="claude: output budget of one request, thinking included")
    ] = 32000
    claude_effort: Annotated[
        str, Meta(description="claude: output_config.effort; empty: not sent")
    ] = ""
    claude_price: Annotated[
        str, Meta(description="claude: '$in,$out[,$cache_write,$cache_read]' per million tokens")
    ] = ""

    # --- campaign -------------------------------------------------------------------
    campaign: Annotated[str, Meta(description="campaign name")] = "default"
    trainer_dir: Annotated[str, Meta(description="trainer directory")] = "trainer"
    edit_file: Annotated[str, Meta(description="the file the researcher edits")] = "train.py"
    metric: Annotated[str, Meta(description="metric key in the summary block")] = "val_bpb"
    direction: Annotated[
        Direction, Meta(description="whether a lower or a higher metric is better")
    ] = "minimize"
    profile: Annotated[str, Meta(description="NIGHTSHIFT_PROFILE passed to runs")] = "cpu"
    max_experiments: Annotated[
        int, Meta(ge=0, description="stop after N finished experiments (0: until stopped)")
    ] = 0
    run_timeout_s: Annotated[
        float, Meta(gt=0, description="seconds before a run is killed and recorded as timeout")
    ] = 600.0
    keep_rule: Annotated[
        KeepRuleName,
        Meta(
            description="when a variant replaces the best (strict: any lower mean, as autoresearch)"
        ),
    ] = "noise-aware"
    keep_confidence: Annotated[
        float, Meta(gt=0.5, lt=1, description="noise-aware: one-sided confidence a keep must reach")
    ] = 0.99
    keep_max_runs: Annotated[
        int, Meta(ge=1, description="noise-aware: replicate cap, ok runs of a close candidate")
    ] = 5
    tiers: Annotated[
        str,
        Meta(
            description="a campaign's tiers in promotion order, comma-separated (e.g. "
            "screen,validate; empty: the launcher's tier); a keep is decided on the last"
        ),
    ] = ""
    noise_runs: Annotated[
        int, Meta(ge=1, description="runs of the seed at campaign start that measure the noise")
    ] = 3
    confirm_jump: Annotated[
        float,
        Meta(
            ge=0,
            description="a result better than the best by more than this share of it is kept "
            "only once a replicate run agrees (0: never asks)",
        ),
    ] = 0.1

    # --- telemetry ------------------------------------------------------------------
    log_format: Annotated[
        LogFormat, Meta(description="log output; empty: console on a TTY, else json")
    ] = ""
    log_level: Annotated[LogLevel, Meta(description="lowest level logged")] = "info"

    @property
    def ledger_path(self) -> Path:
        return Path(self.ledger_db) if self.ledger_db else Path(self.home) / "ledger.db"

    @property
    def runs_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(self.home) / "runs"

    def redacted(self) -> dict[str, Any]:
        """Every setting, secrets masked: what may be logged or printed."""
        out = msgspec.structs.asdict(self)
        for name in SECRET_SETTINGS:
            if out[name]:
                out[name] = REDACTED
        out["nats_url"] = redact_url(self.nats_url)
        return out

    def __repr__(self) -> str:
        # msgspec's repr would print the secrets; this one is safe in a log or a traceback.
        body = ", ".join(f"{k}={v!r}" for k, v in self.redacted().items())
        return f"Settings({body})"

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        return list(self.redacted().items())


def redact_url(url: str) -> str:
    """`nats://user:secret@host` -> `nats://[redacted]@host`, for each server of a list."""
    return re.sub(r"//[^/@,\s]+@", f"//{REDACTED}@", url)
