"""The SkyPilot SDK calls the skypilot backend makes, behind one narrow interface.

`SkyAdapter` is all the backend sees: seven calls, each async, each raising only the
`SkyError`s below; `PoolAdapter` is the six managed-jobs calls of the pool mode
(`skypilot_pool`). `SdkAdapter` makes them with the SkyPilot Python SDK (0.14: every call
returns a request id, resolved here with `sky.get`; the SDK blocks, so each call runs in a
thread). `skypilot_fake.FakeSky` makes the same calls against local directories, for the
tests and the benchmark. A task is passed as its YAML mapping (`TaskConfig`), which the real
adapter turns into a `sky.Task` with `sky.Task.from_yaml_config`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import typing
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Literal, NamedTuple, Protocol, TypeVar

TaskConfig = dict[str, Any]  # a SkyPilot task as the mapping its YAML file holds

JobStatus = Literal[
    "INIT",
    "PENDING",
    "SETTING_UP",
    "RUNNING",
    "SUCCEEDED",
    "FAILED",
    "FAILED_SETUP",
    "FAILED_DRIVER",
    "CANCELLED",
]
TERMINAL: frozenset[str] = frozenset(
    {"SUCCEEDED", "FAILED", "FAILED_SETUP", "FAILED_DRIVER", "CANCELLED"}
)

# A managed job's status (sky.jobs.ManagedJobStatus, SkyPilot 0.14).
ManagedStatus = Literal[
    "PENDING",
    "SUBMITTED",
    "STARTING",
    "RUNNING",
    "RECOVERING",
    "CANCELLING",
    "WINDING_DOWN",
    "SUCCEEDED",
    "CANCELLED",
    "FAILED",
    "FAILED_SETUP",
    "FAILED_PRECHECKS",
    "FAILED_NO_RESOURCE",
    "FAILED_CONTROLLER",
]
# The terminal ones: those the Literal lists from SUCCEEDED on.
MANAGED_TERMINAL: frozenset[str] = frozenset(
    typing.get_args(ManagedStatus)[typing.get_args(ManagedStatus).index("SUCCEEDED") :]
)


class ManagedJob(NamedTuple):
    status: ManagedStatus
    recovery_count: int = 0  # times SkyPilot recovered it (a preempted worker, ...)
    failure_reason: str = ""


class SkyError(Exception):
    """A SkyPilot call that failed for a reason outside the variant's code."""


class ClusterGone(SkyError):
    """The cluster does not exist or is not up (preempted, torn down, autostopped)."""


class ApiUnreachable(SkyError):
    """The SkyPilot API server does not answer."""


class LaunchFailed(SkyError):
    """The cluster could not be provisioned or its setup failed."""


class SkyCallFailed(SkyError):
    """Any other error a SkyPilot call raised."""


class SkyAdapter(Protocol):
    async def launch(self, task: TaskConfig, cluster: str, autostop_minutes: int) -> int | None:
        """Provision `cluster` (or reuse it) and submit the task's setup, which runs as a
        job (SkyPilot's default, detached setup): that job's id, None without one."""
        ...

    async def exec(self, task: TaskConfig, cluster: str) -> int:
        """Sync the task's workdir and queue its run command; the job id."""
        ...

    def tail_logs(self, cluster: str, job_id: int) -> AsyncIterator[str]:
        """The job's output, followed until the job ends."""
        ...

    async def job_status(self, cluster: str, job_id: int) -> JobStatus | None:
        """None: the cluster has no such job."""
        ...

    async def cancel(self, cluster: str, job_id: int) -> None: ...

    async def down(self, cluster: str) -> None: ...

    async def clusters(self) -> list[str]:
        """The names of every cluster the API server knows."""
        ...


class PoolAdapter(Protocol):
    """SkyPilot's managed jobs on a pool of workers."""

    async def pool_apply(self, task: TaskConfig, pool: str) -> None:
        """Create the pool, or update it to this task (its `pool: {workers: N}` section)."""
        ...

    async def jobs_launch(self, task: TaskConfig, pool: str, name: str) -> int:
        """Submit a managed job to the pool; its id."""
        ...

    async def jobs_status(self, job_id: int) -> ManagedJob | None:
        """None: the jobs controller knows no such job."""
        ...

    def jobs_tail_logs(self, job_id: int) -> AsyncIterator[str]:
        """The job's output from its beginning, followed (across recoveries) until it ends."""
        ...

    async def jobs_cancel(self, job_id: int) -> None: ...

    async def pool_down(self, pool: str) -> None: ...


T = TypeVar("T")


class SdkAdapter:
    """The real SDK. Imported on first use: `import sky` takes seconds."""

    def __init__(self) -> None:
        import sky

        self.sky: Any = sky

    def translate(self, exc: BaseException) -> SkyError:
        """A SkyPilot exception as the SkyError the backend acts on."""
        ex = self.sky.exceptions
        text = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ex.ClusterDoesNotExist | ex.ClusterNotUpError):
            return ClusterGone(text)
        if isinstance(exc, ex.ApiServerConnectionError | ex.ServerTemporarilyUnavailableError):
            return ApiUnreachable(text)
        if isinstance(
            exc,
            ex.ResourcesUnavailableError
            | ex.CommandError
            | ex.CloudError
            | ex.ClusterSetUpError
            | ex.ProvisionPrechecksError
            | ex.NoCloudAccessError,
        ):
            return LaunchFailed(text)
        return SkyCallFailed(text)

    async def call(self, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(fn)
        except SkyError:
            raise
        except Exception as exc:  # every SkyPilot failure becomes one of ours
            raise self.translate(exc) from exc

    def task(self, config: TaskConfig) -> Any:
        # from_yaml_config consumes the mapping: the caller's stays whole for a retry.
        return self.sky.Task.from_yaml_config(copy.deepcopy(config))

    async def launch(self, task: TaskConfig, cluster: str, autostop_minutes: int) -> int | None:
        sky = self.sky
        autostop = None if autostop_minutes < 0 else autostop_minutes
        job_id, _handle = await self.call(
            lambda: sky.stream_and_get(
                sky.launch(self.task(task), cluster_name=cluster, idle_minutes_to_autostop=autostop)
            )
        )
        return None if job_id is None else int(job_id)

    async def exec(self, task: TaskConfig, cluster: str) -> int:
        sky = self.sky
        job_id, _handle = await self.call(
            lambda: sky.get(sky.exec(self.task(task), cluster_name=cluster))
        )
        if job_id is None:
            raise SkyCallFailed(f"sky.exec on {cluster} returned no job id")
        return int(job_id)

    async def tail_logs(self, cluster: str, job_id: int) -> AsyncIterator[str]:
        sky = self.sky
        lines: Iterator[str | None] = await self.call(
            lambda: sky.tail_logs(cluster, job_id, follow=True, preload_content=False)
        )
        async for line in _iterate_in_thread(lines, self.translate):
            yield line

    async def job_status(self, cluster: str, job_id: int) -> JobStatus | None:
        sky = self.sky
        statuses = await self.call(lambda: sky.get(sky.job_status(cluster, [job_id])))
        status = statuses.get(job_id)
        return None if status is None else status.value

    async def cancel(self, cluster: str, job_id: int) -> None:
        sky = self.sky
        await self.call(lambda: sky.get(sky.cancel(cluster, job_ids=[job_id])))

    async def down(self, cluster: str) -> None:
        sky = self.sky
        await self.call(lambda: sky.get(sky.down(cluster)))

    async def clusters(self) -> list[str]:
        sky = self.sky
        records = await self.call(lambda: sky.get(sky.status()))
        return [str(getattr(r, "name", None) or r["name"]) for r in records]

    # --- managed jobs on a pool (PoolAdapter) --------------------------------------------

    async def pool_apply(self, task: TaskConfig, pool: str) -> None:
        sky = self.sky
        from sky.serve import serve_utils

        rolling = serve_utils.UpdateMode.ROLLING
        await self.call(
            lambda: sky.stream_and_get(sky.jobs.pool_apply(self.task(task), pool, rolling))
        )

    async def jobs_launch(self, task: TaskConfig, pool: str, name: str) -> int:
        sky = self.sky
        job_ids, _handle = await self.call(
            lambda: sky.get(sky.jobs.launch(self.task(task), name=name, pool=pool))
        )
        found = job_ids[0] if isinstance(job_ids, list) and job_ids else job_ids
        if found is None:
            raise SkyCallFailed(f"sky.jobs.launch to pool {pool} returned no job id")
        return int(found)

    async def jobs_status(self, job_id: int) -> ManagedJob | None:
        sky = self.sky
        fields = [*sky.jobs.constants.DEFAULT_MANAGED_JOB_FIELDS, "failure_reason"]
        records, *_ = await self.call(
            lambda: sky.get(sky.jobs.queue_v2(refresh=False, job_ids=[job_id], fields=fields))
        )
        for record in records:
            if _field(record, "job_id") == job_id:
                status = _field(record, "status")
                return ManagedJob(
                    getattr(status, "value", status),
                    int(_field(record, "recovery_count") or 0),
                    str(_field(record, "failure_reason") or ""),
                )
        return None

    async def jobs_tail_logs(self, job_id: int) -> AsyncIterator[str]:
        sky = self.sky
        lines: Iterator[str | None] = await self.call(
            lambda: sky.jobs.tail_logs(job_id=job_id, follow=True, preload_content=False)
        )
        async for line in _iterate_in_thread(lines, self.translate):
            yield line

    async def jobs_cancel(self, job_id: int) -> None:
        sky = self.sky
        await self.call(lambda: sky.get(sky.jobs.cancel(job_ids=[job_id])))

    async def pool_down(self, pool: str) -> None:
        sky = self.sky
        await self.call(lambda: sky.get(sky.jobs.pool_down(pool)))


def _field(record: Any, name: str) -> Any:
    """A queue record's field: a pydantic model (0.14) or a mapping (older servers)."""
    return record.get(name) if isinstance(record, dict) else getattr(record, name, None)


_DONE = object()


async def _iterate_in_thread(
    items: Iterator[str | None], translate: Callable[[BaseException], SkyError]
) -> AsyncIterator[str]:
    """Drain a blocking iterator in a thread; None (the SDK's end of stream) ends it."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    stop = threading.Event()

    def pump() -> None:
        try:
            for item in items:
                if item is None or stop.is_set():
                    break
                loop.call_soon_threadsafe(queue.put_nowait, item)
        except Exception as exc:  # handed to the reader, translated
            loop.call_soon_threadsafe(queue.put_nowait, translate(exc))
        finally:
            with contextlib.suppress(RuntimeError):  # the loop may be closed by now
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    thread = threading.Thread(target=pump, name="sky-tail-logs", daemon=True)
    thread.start()
    try:
        while (item := await queue.get()) is not _DONE:
            if isinstance(item, SkyError):
                raise item
            yield str(item)
    finally:
        stop.set()
