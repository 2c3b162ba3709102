"""`nightshift down`: tear down the clusters of the configured skypilot tiers.

Clusters stop by themselves when idle (each tier's `autostop_minutes`); a stopped cluster
still holds its disk. `down` deletes them: every cluster SkyPilot knows whose name is
`<skypilot_cluster_prefix>-<tier>-<k>` for a configured tier, and the pool
`<skypilot_cluster_prefix>-<tier>` of a tier in pool mode (`sky.jobs.pool_down`: its
workers are SkyPilot's to tear down, and its running jobs are cancelled).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import TextIO

from services.launcher.skypilot_adapter import PoolAdapter, SkyAdapter, SkyError
from services.settings import Settings


async def pool_clusters(adapter: SkyAdapter, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(n for n in await adapter.clusters() if n.startswith(prefixes))


async def down_clusters(adapter: SkyAdapter, names: list[str]) -> dict[str, str]:
    """`sky.down` each cluster at once; the ones that failed, with why."""
    return await _each(names, adapter.down)


async def down_pools(pools: PoolAdapter, names: list[str]) -> dict[str, str]:
    """`sky.jobs.pool_down` each pool at once; the ones that failed (or do not exist)."""
    return await _each(names, pools.pool_down)


async def _each(names: list[str], call: Callable[[str], Awaitable[None]]) -> dict[str, str]:
    results = await asyncio.gather(*(call(n) for n in names), return_exceptions=True)
    failed: dict[str, str] = {}
    for name, result in zip(names, results, strict=True):
        if isinstance(result, SkyError):
            failed[name] = str(result)
        elif isinstance(result, BaseException):
            raise result
    return failed


async def down(
    settings: Settings,
    *,
    confirm: bool,
    adapter: SkyAdapter | None = None,
    pools: PoolAdapter | None = None,
    out: TextIO = sys.stdout,
    ask: Callable[[str], str] = input,
) -> int:
    """Tear the pool down; the exit status (0 done or nothing to do, 1 some failed)."""
    if not settings.skypilot_tiers:
        print("nightshift: no skypilot_tiers configured: nothing to tear down", file=out)
        return 2
    if adapter is None or pools is None:
        from services.launcher.factory import pool_adapter, sky_adapter

        adapter, pools = adapter or sky_adapter(), pools or pool_adapter()
    prefix = settings.skypilot_cluster_prefix
    pooled = [f"{prefix}-{t.name}" for t in settings.skypilot_tiers if t.mode == "pool"]
    if pooled and (confirm or ask(f"tear down the pools {', '.join(pooled)}? [y/N] ") == "y"):
        failed = await down_pools(pools, pooled)
        for name, why in failed.items():
            print(f"nightshift: pool {name} was not torn down: {why}", file=out)
        print(f"pools torn down: {len(pooled) - len(failed)} of {len(pooled)}", file=out)
    tiers = [t for t in settings.skypilot_tiers if t.mode != "pool"]
    try:
        names = await pool_clusters(adapter, tuple(f"{prefix}-{t.name}-" for t in tiers))
    except SkyError as exc:
        print(f"nightshift: cannot list the clusters: {exc}", file=out)
        return 1
    if not names:
        print("no clusters of the configured tiers are up", file=out)
        return 0
    print(f"clusters: {', '.join(names)}", file=out)
    if not confirm and ask(f"tear down {len(names)} clusters? [y/N] ").strip().lower() != "y":
        print("nothing torn down", file=out)
        return 0
    failed = await down_clusters(adapter, names)
    for name, why in failed.items():
        print(f"nightshift: {name} was not torn down: {why}", file=out)
    print(f"torn down: {len(names) - len(failed)} of {len(names)}", file=out)
    return 1 if failed else 0
