"""One GPU per queued experiment: the claim rule of `src.core.gpus`, without GPUs (real processes
and real file locks stand in for concurrent queue workers)."""
import subprocess
import sys

from src.core.gpus import choose

from conftest import REPO

CLAIM = """
import sys, time
from src.core.gpus import choose
print(choose([("gpu-a", int(sys.argv[1])), ("gpu-b", int(sys.argv[2]))], folder=sys.argv[3]), flush=True)
time.sleep(float(sys.argv[4]))
"""


def claimant(tmp_path, free_a, free_b, hold=3.0):
    return subprocess.Popen([sys.executable, "-c", CLAIM, str(free_a), str(free_b), str(tmp_path), str(hold)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)


def test_concurrent_workers_each_get_their_own_gpu_most_free_first_then_share_the_freest(tmp_path):
    first = claimant(tmp_path, 10, 20)
    assert first.stdout.readline().strip() == "1"  # gpu-b has more free memory
    second = claimant(tmp_path, 10, 20)
    assert second.stdout.readline().strip() == "0"  # gpu-b is claimed: gpu-a, although it has less
    third = claimant(tmp_path, 10, 20, hold=0)
    assert third.stdout.readline().strip() == "1"  # all claimed: the freest, shared
    first.kill()
    first.wait()
    fourth = claimant(tmp_path, 10, 20, hold=0)  # a finished experiment's GPU is free again
    assert fourth.stdout.readline().strip() == "1"
    for p in (second, third, fourth):
        p.kill()
        p.wait()


def test_torchrun_ranks_keep_their_local_gpu_and_a_single_gpu_needs_no_claim(tmp_path):
    gpus = [("gpu-a", 10), ("gpu-b", 20), ("gpu-c", 30)]
    assert [choose(gpus, local_rank=r, folder=tmp_path) for r in range(3)] == [0, 1, 2]
    assert list(tmp_path.iterdir()) == []  # ranks claim nothing
    assert choose([("gpu-a", 5)], folder=tmp_path) == 0
    assert list(tmp_path.iterdir()) == []
    assert choose(gpus, folder=tmp_path) == 2 and choose(gpus, folder=tmp_path) == 2  # a process keeps its claim
