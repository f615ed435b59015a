"""WorldInfo from the torchrun environment, and collectives that make ranks decide together."""

from __future__ import annotations

import pytest

from shoal.dist import WorldInfo, ranks_env_from_counts
from shoal.errors import ConfigError

from _ranks import spawn_ranks


def test_plain_process_is_rank_zero_of_one():
    w = WorldInfo.from_env({})
    assert (w.rank, w.world_size, w.local_rank, w.local_world_size, w.node_rank) == (0, 1, 0, 1, 0)


def test_torchrun_variables_are_read():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "1234",
    }
    w = WorldInfo.from_env(env)
    assert (w.rank, w.world_size, w.local_rank, w.node_rank, w.master_addr, w.master_port) == (3, 4, 1, 1, "h", 1234)
    assert WorldInfo.from_env(w.to_env()) == w


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK=2 must be < WORLD_SIZE=2"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "needs MASTER_ADDR and MASTER_PORT"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
    ],
)
def test_bad_environment_is_named(env, needle):
    with pytest.raises(ConfigError, match=needle):
        WorldInfo.from_env(env)


def test_ranks_from_node_counts_match_torchrun_numbering():
    worlds = ranks_env_from_counts([2, 1], "10.0.0.1", 29500)
    assert [(w.rank, w.local_rank, w.local_world_size, w.node_rank) for w in worlds] == [
        (0, 0, 2, 0),
        (1, 1, 2, 0),
        (2, 0, 1, 1),
    ]


def _collectives() -> dict:
    import torch

    from shoal import dist

    world = WorldInfo.from_env()
    dist.init_process_group(world, "gloo", 30, torch.device("cpu"))
    total = dist.all_sum(torch.tensor([float(world.rank + 1)])).item()
    pulse = dist.Pulse(torch.device("cpu"))
    pulses = [pulse.exchange(dist.Flags(stop=world.rank == 1 and i == 1)) for i in range(3)] + [pulse.drain()]
    # after warm-up, exchanges follow the slowest rank's step time: rank 1 takes 20 ms a step
    import time

    sparse = dist.Pulse(torch.device("cpu"), period_s=0.1)
    seen_at, exchanges = None, 0
    for step in range(1, 61):
        time.sleep(0.02 if world.rank == 1 else 0.001)
        flag = sparse.exchange(dist.Flags(save=world.rank == 1 and step >= 30)).save  # raised and held from step 30
        exchanges += sparse.next_at == step + sparse.interval  # this step started an exchange
        if flag and seen_at is None:
            seen_at = step
    sparse.drain()
    return {
        "total": total,
        "pulses": [[f.stop, f.save, f.out_of_time] for f in pulses],
        "gathered": dist.all_gather_object(world.rank * 10),
        "seen_at": seen_at,
        "interval": sparse.interval,
        "exchanges": exchanges,
    }


def test_collectives_make_ranks_decide_together():
    ranks = spawn_ranks(_collectives, 2)
    assert ranks[0] == ranks[1]
    assert ranks[0]["total"] == 3.0
    # a flag raised on rank 1 at step 1 is seen by both ranks, at the same later step (true everywhere if true anywhere)
    assert ranks[0]["pulses"] == [[False] * 3, [False] * 3, [True, False, False], [False] * 3]
    assert ranks[0]["gathered"] == [0, 10]
    # sparse exchanges: about every 0.1 s of the slow rank (5 steps), the same steps on both ranks
    assert 3 <= ranks[0]["interval"] <= 5
    assert 30 < ranks[0]["seen_at"] <= 30 + 2 * ranks[0]["interval"]
    assert ranks[0]["exchanges"] < 25
