"""Which device nodes and which CUDA_VISIBLE_DEVICES give a sandboxed run its GPUs only.

A slot's GPU id (the `gpus` setting) is an nvidia-smi index: the driver's GPUs ordered by
PCI bus id. Its device node is `/dev/nvidia<minor>`, and the minor number need not equal
the index; the driver tells both, and the GPU's UUID, in
`/proc/driver/nvidia/gpus/<bus id>/information`. Inside the sandbox only that node exists,
so CUDA numbers the one GPU it can open 0: the run gets `CUDA_VISIBLE_DEVICES=<UUID>`,
which names the same GPU however CUDA numbers what it sees. Where the driver's table is
missing, the index is taken as the minor number and CUDA_VISIBLE_DEVICES stays the index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DRIVER_TABLE = Path("/proc/driver/nvidia/gpus")
DEV = Path("/dev")


@dataclass(frozen=True)
class Gpu:
    index: int  # nvidia-smi's
    minor: int  # /dev/nvidia<minor>
    uuid: str


def driver_gpus(table: Path = DRIVER_TABLE) -> list[Gpu]:
    """The driver's GPUs in nvidia-smi order; [] without an NVIDIA driver."""
    if not table.is_dir():
        return []
    gpus = []
    for index, entry in enumerate(sorted(table.iterdir(), key=lambda p: p.name.lower())):
        try:
            text = (entry / "information").read_text()
        except OSError:
            continue
        info = {
            key.strip(): value.strip()
            for key, sep, value in (line.partition(":") for line in text.splitlines())
            if sep
        }
        minor = info.get("Device Minor", "")
        if minor.isdigit():
            gpus.append(Gpu(index, int(minor), info.get("GPU UUID", "")))
    return gpus


@dataclass(frozen=True)
class GpuAccess:
    devices: list[str]  # device nodes to bind into the sandbox
    visible: str | None  # CUDA_VISIBLE_DEVICES inside it; None: leave it as it is


def gpu_access(
    ids: Sequence[str], all_gpus: bool, table: Sequence[Gpu], dev: Path = DEV
) -> GpuAccess:
    """The nodes and CUDA_VISIBLE_DEVICES of a run given the GPUs `ids` (or all of them)."""
    nodes = list(dev.glob("nvidia*"))
    shared = [p for p in nodes if not p.name.removeprefix("nvidia").isdigit()]
    if all_gpus:
        own = [p for p in nodes if p not in shared]
        return GpuAccess(sorted(str(p) for p in [*shared, *own]), None)
    by_index = {str(g.index): g for g in table}
    chosen = [by_index.get(i) for i in ids]
    minors = [str(g.minor) if g else i for g, i in zip(chosen, ids, strict=True)]
    own = [dev / f"nvidia{m}" for m in minors if m.isdigit()]
    uuids = [g.uuid for g in chosen if g and g.uuid]
    visible = ",".join(uuids) if uuids and len(uuids) == len(ids) else None
    return GpuAccess(sorted(str(p) for p in [*shared, *own] if p.exists()), visible)
