"""world_from_env: which process this is, read from the launcher's environment (a pure function)."""
import pytest
import torch

from open_clip_train.distributed import World, all_gather_rows, all_reduce_mean, backend_for, world_from_env
from open_clip_train.errors import UserError

TORCHRUN_2 = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_nothing_set_is_a_single_process():
    world = world_from_env({"PATH": "/usr/bin", "SLURM_PROCID": "3"})
    assert world == World(rank=0, local_rank=0, world_size=1, source="single process", num_nodes=1)
    assert not world.distributed and world.is_master


def test_torchrun_environment():
    world = world_from_env(TORCHRUN_2)
    assert (world.rank, world.local_rank, world.world_size, world.num_nodes) == (1, 1, 2, 1)
    assert world.source == "torchrun" and world.distributed and not world.is_master


def test_two_nodes_of_four():
    env = dict(TORCHRUN_2, RANK="6", LOCAL_RANK="2", WORLD_SIZE="8", LOCAL_WORLD_SIZE="4")
    world = world_from_env(env)
    assert (world.rank, world.local_rank, world.world_size, world.num_nodes) == (6, 2, 8, 2)


def test_local_world_size_defaults_to_one_node():
    env = {k: v for k, v in TORCHRUN_2.items() if k != "LOCAL_WORLD_SIZE"}
    assert world_from_env(env).num_nodes == 1


def test_torchrun_with_one_process_runs_without_a_process_group():
    world = world_from_env({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})  # no MASTER_* needed
    assert world.world_size == 1 and world.source == "torchrun"
    assert not world.distributed and world.is_master


@pytest.mark.parametrize("drop", [("RANK",), ("WORLD_SIZE",), ("LOCAL_RANK",), ("RANK", "LOCAL_RANK")])
def test_half_set_environment_is_a_user_error(drop):
    env = {k: v for k, v in TORCHRUN_2.items() if k not in drop}
    with pytest.raises(UserError, match="half-set") as info:
        world_from_env(env)
    for key in drop:
        assert key in str(info.value)  # names what is missing


@pytest.mark.parametrize(
    "override, message",
    [
        ({"RANK": "one"}, "RANK='one' in the environment is not an integer"),
        ({"WORLD_SIZE": ""}, "WORLD_SIZE='' in the environment is not an integer"),
        ({"RANK": "-1"}, "RANK=-1 in the environment must be >= 0"),
        ({"WORLD_SIZE": "0", "RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE=0 in the environment must be >= 1"),
        ({"RANK": "2"}, "RANK=2 is outside WORLD_SIZE=2"),
        ({"LOCAL_RANK": "2"}, "LOCAL_RANK=2 is outside LOCAL_WORLD_SIZE=2"),
        ({"LOCAL_WORLD_SIZE": "x"}, "LOCAL_WORLD_SIZE='x' in the environment is not an integer"),
        ({"LOCAL_WORLD_SIZE": "3"}, "LOCAL_WORLD_SIZE=3 does not divide WORLD_SIZE=2"),
        ({"MASTER_ADDR": ""}, "WORLD_SIZE=2 but MASTER_ADDR not set"),
    ],
)
def test_bad_values_are_user_errors(override, message):
    with pytest.raises(UserError) as info:
        world_from_env(dict(TORCHRUN_2, **override))
    assert str(info.value).startswith(message)


def test_missing_rendezvous_names_both_variables():
    env = {k: v for k, v in TORCHRUN_2.items() if not k.startswith("MASTER_")}
    with pytest.raises(UserError, match="MASTER_ADDR, MASTER_PORT not set"):
        world_from_env(env)


def test_reads_only_the_mapping_it_is_given(monkeypatch):
    monkeypatch.setenv("RANK", "0")  # half-set in the real environment: irrelevant to an explicit mapping
    assert world_from_env({}) == World()
    with pytest.raises(UserError, match="half-set"):
        world_from_env()  # the default is os.environ


def test_backend_follows_the_device():
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 0)) == "nccl"
    assert backend_for(torch.device("cpu"), "nccl") == "gloo"  # nccl cannot drive a CPU module
    assert backend_for(torch.device("cuda", 0), "gloo") == "gloo"


def test_collectives_are_identities_without_a_process_group():
    x = torch.arange(6.0).reshape(3, 2)
    assert all_gather_rows(x) is x
    assert torch.equal(all_reduce_mean(x), x)
