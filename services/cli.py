"""The `nightshift` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from services.settings import Settings, SettingsError, load_settings
from services.telemetry import configure_logging, configure_tracing


def _campaign_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--campaign", "--name", dest="campaign", help="campaign name (default: default)")
    p.add_argument("--trainer", dest="trainer_dir", help="trainer directory (default: trainer/)")
    p.add_argument("--edit-file", dest="edit_file", help="the file the researcher edits")
    p.add_argument("--metric", help="metric key in the summary block (default: val_bpb)")
    p.add_argument("--direction", choices=["minimize", "maximize"])
    p.add_argument("--profile", help="NIGHTSHIFT_PROFILE passed to runs (cpu | gpu)")
    p.add_argument("--strategy", choices=["auto", "grid", "claude"],
                   help="auto (default): claude when an Anthropic API key is configured")
    p.add_argument("--max-experiments", dest="max_experiments", type=int,
                   help="stop after N finished experiments (0: until stopped)")
    p.add_argument("--run-timeout", dest="run_timeout_s", type=float,
                   help="seconds before a run is killed and recorded as timeout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nightshift", description="Autonomous ML research on a fleet of GPUs."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run everything here (private nats-server, four services)")
    _campaign_flags(up)
    up.add_argument("--backend", choices=["local", "sim"])
    up.add_argument("--slots", type=int, help="concurrent runs (default 1; one per GPU)")
    up.add_argument("--http-port", dest="http_port", type=int, help="ledger HTTP port")
    up.add_argument("--home", help="state directory (default .nightshift)")

    for name, text in (("status", "campaigns and their progress"),
                       ("best", "the best train.py of a campaign"),
                       ("results", "results.tsv of a campaign")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--campaign", help="campaign name (default: the only/first one)")
        p.add_argument("--url", help="ledger HTTP address (default: the ledger on disk)")
        p.add_argument("--home", help="state directory (default .nightshift)")
        if name == "best":
            p.add_argument("-o", "--output", help="write the source to this file")

    camp = sub.add_parser("campaign", help="start or stop a campaign on a running deployment")
    camp_sub = camp.add_subparsers(dest="action", required=True)
    start = camp_sub.add_parser("start", help="start (or resume) a campaign")
    _campaign_flags(start)
    stop = camp_sub.add_parser("stop", help="stop a campaign: no new proposals, runs cancelled")
    stop.add_argument("name")

    bench = sub.add_parser("bench", help="measure the system")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    fleet = bench_sub.add_parser("fleet", help="the whole system on the sim backend")
    fleet.add_argument("--slots", type=int, default=16)
    fleet.add_argument("--experiments", type=int, default=0,
                       help="experiments to run (default: 6 waves of the slots)")
    fleet.add_argument("--run-seconds", type=float, default=0.0,
                       help="wall seconds one simulated run takes (default: by slots)")
    fleet.add_argument("--in-process", action="store_true",
                       help="run the services in this process (as `up` does), not one each")
    fleet.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("campaign", "trainer_dir", "edit_file", "metric", "direction", "profile", "strategy",
            "max_experiments", "run_timeout_s", "backend", "slots", "http_port", "home")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(_overrides(args))
    except SettingsError as exc:
        print(f"nightshift: {exc}", file=sys.stderr)
        return 2
    configure_logging(f"cli-{args.command}", settings.log_format, "warning"
                      if args.command in ("up", "bench") else settings.log_level)
    configure_tracing("cli")
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
    if args.command == "bench":
        from services.bench import fleet_bench, print_report

        report = asyncio.run(fleet_bench(args.slots, args.experiments, args.run_seconds,
                                         processes=not args.in_process))
        print_report(report, as_json=args.json)
        return 0
    return 2


async def _campaign(args: argparse.Namespace, settings: Settings) -> int:
    from services.bus import Bus
    from services.campaign import start_campaign, stop_campaign

    if not settings.nats_url:
        print("nightshift: set NATS_URL to the deployment's NATS server", file=sys.stderr)
        return 2
    bus = await Bus.connect(settings.nats_url, prefix=settings.subject_prefix,
                            name="nightshift-cli", creds=settings.nats_creds)
    try:
        if args.action == "start":
            event, resumed = await start_campaign(bus, settings)
            print(json.dumps({"campaign": event.campaign, "resumed": resumed,
                              "seed_digest": event.seed_digest,
                              "strategy": event.proposer.strategy,
                              "max_experiments": event.max_experiments}))
        else:
            await stop_campaign(bus, args.name)
            print(f"campaign {args.name} stopped")
    finally:
        await bus.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

