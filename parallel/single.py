"""One process, one device: the reference every other plan is tested against."""
from __future__ import annotations

from parallel.base import Plan


class SingleDevice(Plan):
    name = "none"

    @classmethod
    def refuse(cls, cfg, world_size: int) -> str | None:
        if world_size > 1:
            return (
                f"parallel=none runs one process, but {world_size} were requested; "
                f"use parallel=ddp, fsdp2 or a zero* plan for several processes."
            )
        return None
