"""heap.release_freed_memory: with it, a freed large tensor leaves the resident set at once; without it, glibc's
rising mmap threshold puts the second such tensor in the heap, where it stays resident after it is freed."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")

PROBE = """
import sys, torch
from lorakit.runtime.heap import release_freed_memory
def rss():
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS:"))) * 1024
if sys.argv[1] == "on":
    assert release_freed_memory()
a = torch.ones(4 << 20); del a  # 16 MiB: mapped either way; freeing it raises glibc's dynamic threshold
b = torch.ones(4 << 20)
before = rss()
del b
print(before - rss())
"""


@pytest.mark.parametrize("mode", ["on", "off"])
def test_a_freed_large_tensor_leaves_the_resident_set(mode):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True)
    returned = int(out.stdout.strip().splitlines()[-1])
    if mode == "on":
        assert returned >= 12 << 20
    else:  # the control: shows that the test sees the difference
        assert returned < 4 << 20


REUSE = """
import sys, torch
from lorakit.runtime.heap import release_freed_memory, reusing_freed_memory
def rss():
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS:"))) * 1024
if sys.argv[1] == "on":
    assert release_freed_memory()
with reusing_freed_memory(torch.device(sys.argv[2])):
    a = torch.ones(3 << 20)  # 12 MiB: from the heap inside (under 32 MiB), mapped outside (over 1 MiB)
    pin = torch.ones(3 << 19)  # above it in the heap: a's block is freed below the top, as in a backward pass
    before = rss()
    del a
    kept = before - rss()
    inside = rss()
left = inside - rss()
b = torch.ones(5 << 20)  # 20 MiB: more than the heap's free block holds, so mapped again outside (over 1 MiB)
pin2 = torch.ones(3 << 19)
before = rss()
del b
print(kept, left, before - rss())
"""


@pytest.mark.parametrize("mode,device", [("on", "cpu"), ("off", "cpu"), ("on", "meta")])
def test_backward_reuses_freed_blocks_and_returns_them_after(mode, device):
    # on: freed inside the context, a 12 MiB tensor stays in the heap for reuse (no fresh zero-filled pages); on
    # leaving, those pages go back; afterwards the 1 MiB threshold holds again. off, or a backward on another device
    # than the CPU: the context changes nothing.
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", REUSE, mode, device], capture_output=True, text=True, env=env,
                         check=True)
    kept, left, after = map(int, out.stdout.split())
    if (mode, device) == ("on", "cpu"):
        assert (kept < 1 << 20, left >= 10 << 20, after >= 18 << 20) == (True, True, True), (kept, left, after)
    else:
        assert kept >= 10 << 20, kept
