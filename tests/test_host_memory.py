"""train.host_memory: `compact` gives freed host blocks back to the system at once, `fast`
(glibc's own policy) keeps them for reuse. Measured in a fresh process, as a worker sets it."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

# Allocate, touch and free an 8 MiB tensor twice. Under glibc's dynamic policy the first
# free raises the mmap threshold to 8 MiB, so the second block comes from the heap and
# stays there after its free; under `compact` both are mmaps, unmapped when freed.
PROBE = """
import json, sys, torch
from launch.worker import set_host_allocator

def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

set_host_allocator(sys.argv[1])
torch.ones(1)
before = rss_kib()
for _ in range(2):
    t = torch.ones(2 << 20)  # 8 MiB of float32, every page touched
    del t
print(json.dumps({"kept_kib": rss_kib() - before}))
"""


def kept_after_free(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["kept_kib"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_compact_returns_freed_blocks_and_fast_keeps_them_for_reuse():
    compact, fast = kept_after_free("compact"), kept_after_free("fast")
    assert compact < 2 * 1024, f"compact kept {compact} KiB after the free"
    assert fast >= 6 * 1024, f"fast kept only {fast} KiB: glibc's dynamic threshold did not keep the block"
