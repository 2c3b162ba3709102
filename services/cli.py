"""The `nightshift` command.

Flags that set a setting are built from the setting's field (services.settings), so a
flag's type, its choices and its help are the setting's: there is one list of options.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from services.metrics import configure_metrics
from services.settings import Settings, SettingsError
from services.settings_loader import SETTING_FIELDS, load_settings
from services.telemetry import configure_logging, configure_tracing

# The settings a campaign is started with: `up` and `campaign start` take the same flags.
CAMPAIGN_SETTINGS = (
    "campaign",
    "trainer_dir",
    "edit_file",
    "metric",
    "direction",
    "profile",
    "strategy",
    "max_experiments",
    "run_timeout_s",
    "keep_rule",
    "tiers",
)

# Which settings each command takes from its flags. The flags of `up` and `campaign start`
# are built from the fields (type, choices, help), so they cannot drift from the settings.
COMMAND_SETTINGS: dict[str, tuple[str, ...]] = {
    "up": (*CAMPAIGN_SETTINGS, "backend", "slots", "http_port", "home"),
    "campaign start": CAMPAIGN_SETTINGS,
    "status": ("campaign", "home"),
    "best": ("campaign", "home"),
    "results": ("campaign", "home"),
}

# Flag spellings other than `--<name-with-dashes>`, kept for the users who type them.
FLAG_ALIASES: dict[str, tuple[str, ...]] = {
    "campaign": ("--campaign", "--name"),
    "trainer_dir": ("--trainer",),
    "run_timeout_s": ("--run-timeout",),
}


def setting_flag(
    parser: argparse.ArgumentParser, name: str, *flags: str, help_text: str | None = None
) -> argparse.Action:
    """Add the flag that sets `name`: its type, choices and help come from the field, and an
    absent flag leaves the value to the file, the environment or the default."""
    field = SETTING_FIELDS[name]
    flags = flags or FLAG_ALIASES.get(name) or (f"--{name.replace('_', '-')}",)
    text = help_text if help_text is not None else field.description
    if help_text is None and field.default not in ("", None) and "default" not in text:
        # "stop after N (0: until stopped; default 0)", "campaign name (default: default)"
        text = (
            text[:-1] + f"; default {field.default})"
            if text.endswith(")")
            else f"{text} (default: {field.default})"
        )
    kwargs: dict[str, Any] = {"dest": name, "default": None, "help": text.replace("%", "%%")}
    if field.choices:
        kwargs["choices"] = list(field.choices)
    elif field.base in (int, float):
        kwargs.update(type=field.base, metavar="N")
    elif field.base is not str:
        raise TypeError(f"setting {name!r} of type {field.base!r} has no flag form")
    return parser.add_argument(*flags, **kwargs)


def add_setting_flags(parser: argparse.ArgumentParser, command: str) -> None:
    for name in COMMAND_SETTINGS[command]:
        setting_flag(parser, name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nightshift", description="Autonomous ML research on a fleet of GPUs."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run everything here (private nats-server, four services)")
    add_setting_flags(up, "up")

    for name, text in (
        ("status", "campaigns and their progress"),
        ("best", "the best train.py of a campaign"),
        ("results", "results.tsv of a campaign"),
    ):
        p = sub.add_parser(name, help=text)
        setting_flag(
            p, "campaign", "--campaign", help_text="campaign name (default: the only/first one)"
        )
        p.add_argument("--url", help="ledger HTTP address (default: the ledger on disk)")
        setting_flag(p, "home")
        if name == "best":
            p.add_argument("-o", "--output", help="write the source to this file")

    camp = sub.add_parser("campaign", help="start or stop a campaign on a running deployment")
    camp_sub = camp.add_subparsers(dest="action", required=True)
    start = camp_sub.add_parser("start", help="start (or resume) a campaign")
    add_setting_flags(start, "campaign start")
    stop = camp_sub.add_parser("stop", help="stop a campaign: no new proposals, runs cancelled")
    stop.add_argument("name")

    down = sub.add_parser("down", help="skypilot: tear down every cluster of the configured tiers")
    down.add_argument("--yes", action="store_true", help="do not ask")

    _bench_parser(sub)
    return parser


def _bench_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`bench fleet`: its flags describe the benchmark, not settings of a deployment."""
    bench = sub.add_parser("bench", help="measure the system")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    _bench_fleet_parser(bench_sub)
    chaos = bench_sub.add_parser(
        "chaos", help="a sim campaign while every service and nats-server are SIGKILLed"
    )
    chaos.add_argument("--experiments", type=int, default=150, help="experiments (default 150)")
    chaos.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    chaos.add_argument("--json", action="store_true", help="print one JSON object")
    sky = bench_sub.add_parser(
        "skypilot", help="the skypilot backend's per-run overhead, on the fake pool"
    )
    sky.add_argument("--runs-per-cluster", type=int, default=4)
    sky.add_argument(
        "--presubmit-s", type=float, default=15.0, help="the pre-submission lead to compare"
    )
    sky.add_argument(
        "--time-scale", type=float, default=0.05, help="wall seconds per simulated second"
    )
    sky.add_argument("--json", action="store_true", help="print the reports as one JSON list")
    decisions = bench_sub.add_parser(
        "decisions", help="keep decisions against the sim's known truth, at equal GPU budget"
    )
    decisions.add_argument("--seeds", type=int, default=3, help="campaigns per configuration")
    decisions.add_argument("--budget", type=int, default=96, help="runs per campaign")
    decisions.add_argument("--noise", type=float, default=0.003, help="the sim's spread")
    decisions.add_argument(
        "--run-seconds", type=float, default=0.25, help="wall seconds one simulated run takes"
    )
    decisions.add_argument("--json", action="store_true", help="print one JSON object")
    _bench_search_parser(bench_sub)


def _bench_fleet_parser(bench_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`bench fleet`: the whole system on the sim backend."""
    fleet = bench_sub.add_parser("fleet", help="the whole system on the sim backend")
    fleet.add_argument("--slots", type=int, default=16)
    fleet.add_argument(
        "--experiments",
        type=int,
        default=0,
        help="experiments to run (default: 6 waves of the slots up to 256, then 3)",
    )
    fleet.add_argument(
        "--run-seconds",
        type=float,
        default=0.0,
        help="wall seconds one simulated run takes (default: by slots)",
    )
    fleet.add_argument(
        "--in-process",
        action="store_true",
        help="run the services in this process (as `up` does), not one each",
    )
    fleet.add_argument(
        "--proposers",
        type=int,
        default=1,
        help="proposer processes (more than one needs the proposers' campaign lease)",
    )
    fleet.add_argument(
        "--launchers", type=int, default=1, help="launcher processes; they split the slots"
    )
    fleet.add_argument(
        "--keep-rule",
        choices=["noise-aware", "strict"],
        default="noise-aware",
        help="the campaign's keep rule (strict: one run per variant, no replicates' tail)",
    )
    fleet.add_argument(
        "--profile-dir",
        default="",
        help="write each service process's cProfile statistics (<name>-<pid>.prof) here",
    )
    fleet.add_argument(
        "--keep-dir",
        default="",
        help="keep the ledger, the services' logs and the stream in this (new) folder",
    )
    fleet.add_argument("--json", action="store_true", help="print one JSON object")


def _bench_search_parser(bench_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`bench search`: strategies side by side on the sim landscape, in this process."""
    search = bench_sub.add_parser(
        "search", help="grid vs random, Optuna TPE and CMA-ES on the sim landscape"
    )
    search.add_argument("--seeds", default="1-5", help="landscape seeds, e.g. 1-10 or 1,4,7")
    search.add_argument("--experiments", type=int, default=400)
    search.add_argument("--slots", type=int, default=16)
    search.add_argument("--profile", default="cpu", help="the campaign's profile (default: cpu)")
    search.add_argument(
        "--strategies",
        default="grid,random,tpe,cmaes",
        help="comma-separated, of grid, random, tpe, cmaes (tpe and cmaes need Optuna)",
    )
    search.add_argument("--json", action="store_true", help="print one JSON object")


def command_key(args: argparse.Namespace) -> str:
    """The key of COMMAND_SETTINGS for parsed arguments: `up`, `campaign start`, ..."""
    if args.command == "campaign":
        return f"campaign {args.action}"
    if args.command == "bench":
        return f"bench {args.bench}"
    return str(args.command)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the command line gives: the command's flags that were used."""
    names = COMMAND_SETTINGS.get(command_key(args), ())
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(_overrides(args))
    except SettingsError as exc:
        print(f"nightshift: {exc}", file=sys.stderr)
        return 2
    configure_logging(
        f"cli-{args.command}",
        settings.log_format,
        "warning" if args.command in ("up", "bench") else settings.log_level,
    )
    configure_tracing("cli")
    configure_metrics("cli")
    try:
        return _dispatch(args, settings)
    except KeyboardInterrupt:
        return 130
    except (ValueError, LookupError, ConnectionError, FileNotFoundError) as exc:
        print(f"nightshift: {exc}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "up":
        from services.supervisor import up

        return asyncio.run(up(settings))
    if args.command in ("status", "best", "results"):
        from services.ledger_client import show

        return show(args.command, settings, args)
    if args.command == "campaign":
        return asyncio.run(_campaign(args, settings))
    if args.command == "bench" and args.bench == "chaos":
        from services.bench_chaos import chaos_bench, print_chaos

        chaos = asyncio.run(chaos_bench(args.experiments, args.seed))
        print_chaos(chaos, as_json=args.json)
        return 0 if chaos.completed and not (chaos.lost or chaos.forged_counted) else 1
    if args.command == "down":
        from services.launcher.skypilot_teardown import down

        return asyncio.run(down(settings, confirm=args.yes))
    if args.command == "bench" and args.bench == "skypilot":
        return _bench_skypilot(args)
    if args.command == "bench" and args.bench == "search":
        return _bench_search(args)
    if args.command == "bench" and args.bench == "decisions":
        from services.bench_decisions import decisions_bench, print_decisions

        found = asyncio.run(decisions_bench(args.seeds, args.budget, args.noise, args.run_seconds))
        print_decisions(found, as_json=args.json)
        return 0
    if args.command == "bench":
        return _bench_fleet(args)
    return 2


def _bench_skypilot(args: argparse.Namespace) -> int:
    from services.launcher.skypilot_bench import format_report, skypilot_bench

    runs, scale = args.runs_per_cluster, args.time_scale
    reports = [  # clusters without pre-submission, with it, then pool mode
        asyncio.run(skypilot_bench(runs_per_cluster=runs, time_scale=scale, **kw))
        for kw in ({"presubmit_s": 0.0}, {"presubmit_s": args.presubmit_s}, {"mode": "pool"})
    ]
    if args.json:
        print(json.dumps([vars(r) for r in reports]))
    else:
        print("\n".join(format_report(r) for r in reports))
    return 0


def _bench_fleet(args: argparse.Namespace) -> int:
    from services.bench import fleet_bench, print_report
    from services.bench_processes import Topology

    topology = Topology(
        args.proposers,
        args.launchers,
        os.path.abspath(args.profile_dir) if args.profile_dir else "",
        os.path.abspath(args.keep_dir) if args.keep_dir else "",
        args.keep_rule,
    )
    report = asyncio.run(
        fleet_bench(
            args.slots,
            args.experiments,
            args.run_seconds,
            processes=not args.in_process,
            topology=topology,
        )
    )
    print_report(report, as_json=args.json)
    return 0


def _bench_search(args: argparse.Namespace) -> int:
    from services.bench_search import STRATEGIES, parse_seeds, print_search_report, search_bench

    strategies = [name.strip() for name in args.strategies.split(",") if name.strip()]
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown or not strategies:
        print(
            f"nightshift: --strategies takes {', '.join(STRATEGIES)}, not {unknown}",
            file=sys.stderr,
        )
        return 2
    report = search_bench(
        seeds=parse_seeds(args.seeds),
        strategies=strategies,
        experiments=args.experiments,
        slots=args.slots,
        profile=args.profile,
    )
    print_search_report(report, as_json=args.json)
    return 0


async def _campaign(args: argparse.Namespace, settings: Settings) -> int:
    from services.bus import Bus
    from services.campaign import start_campaign, stop_campaign

    if not settings.nats_url:
        print("nightshift: set NATS_URL to the deployment's NATS server", file=sys.stderr)
        return 2
    # The deployment's credentials (nats_creds / nats_user / nats_token) come with settings.
    bus = await Bus.from_settings(settings, "cli")
    try:
        if args.action == "start":
            event, resumed = await start_campaign(bus, settings)
            print(
                json.dumps(
                    {
                        "campaign": event.campaign,
                        "resumed": resumed,
                        "seed_digest": event.seed_digest,
                        "strategy": event.proposer.strategy,
                        "max_experiments": event.max_experiments,
                    }
                )
            )
        else:
            stopped = await stop_campaign(bus, args.name)
            print(f"campaign {args.name} {'stopped' if stopped else 'was already stopped'}")
    finally:
        await bus.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
