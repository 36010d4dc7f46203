"""world_from_env: which process this is, read from the launcher's environment (a pure function)."""
import pytest
import torch

from open_clip_train.distributed import (World, all_gather_rows, all_reduce_mean, backend_for, expand_nodelist,
                                         export_rendezvous, world_from_env)
from open_clip_train.errors import UserError

TORCHRUN_2 = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_nothing_set_is_a_single_process():
    # an salloc shell: job variables, but no task (no SLURM_PROCID / SLURM_LOCALID from srun)
    world = world_from_env({"PATH": "/usr/bin", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_NNODES": "2"})
    assert world == World(rank=0, local_rank=0, world_size=1, source="single process", num_nodes=1)
    assert not world.distributed and world.is_master and world.rendezvous == "none"


def test_torchrun_environment():
    world = world_from_env(TORCHRUN_2)
    assert (world.rank, world.local_rank, world.world_size, world.num_nodes) == (1, 1, 2, 1)
    assert world.source == "torchrun" and world.distributed and not world.is_master
    assert (world.master_addr, world.master_port, world.rendezvous) == ("127.0.0.1", 29500, "127.0.0.1:29500")


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
        ({"MASTER_PORT": "http"}, "MASTER_PORT='http' in the environment is not an integer"),
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


# ---------------------------------------------------------------- SLURM: srun, one task per GPU
SRUN_8 = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_NNODES": "2",
          "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4212345"}


def test_srun_task_environment():
    world = world_from_env(SRUN_8)
    assert (world.rank, world.local_rank, world.world_size, world.num_nodes) == (5, 1, 8, 2)
    assert world.source == "SLURM (srun)" and world.distributed and not world.is_master
    # first host of the node list, port 15000 + job id % 10000
    assert (world.master_addr, world.master_port) == ("gpu07", 15000 + 2345)


def test_srun_rendezvous_overrides_and_step_values():
    env = dict(SRUN_8, MASTER_ADDR="10.0.0.5", MASTER_PORT="23456")
    assert world_from_env(env).rendezvous == "10.0.0.5:23456"
    # a step on part of the allocation: its own node list and node count come first
    env = dict(SRUN_8, SLURM_STEP_NODELIST="gpu08,gpu09", SLURM_STEP_NUM_NODES="2", SLURM_JOB_NUM_NODES="3")
    assert world_from_env(env).master_addr == "gpu08"
    # only the old names, no job id: the fallbacks
    env = {k: v for k, v in SRUN_8.items() if k not in ("SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_JOB_ID")}
    env["SLURM_NODELIST"] = "a,b,c"
    world = world_from_env(env)
    assert (world.master_addr, world.master_port, world.num_nodes) == ("a", 29500, 2)
    del env["SLURM_JOB_NUM_NODES"]
    assert world_from_env(env).num_nodes == 3  # counted from the node list


def test_srun_single_task_needs_no_rendezvous():
    world = world_from_env({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1"})
    assert world == World(0, 0, 1, "SLURM (srun)", 1)
    assert not world.distributed


def test_torchrun_wins_over_slurm():
    """srun starting torchrun once per node: the workers see both; torchrun's are per worker."""
    env = dict(SRUN_8, SLURM_PROCID="1", SLURM_LOCALID="0", SLURM_NTASKS="2", **TORCHRUN_2)
    world = world_from_env(env)
    assert world.source == "torchrun" and (world.rank, world.world_size) == (1, 2)
    assert world.rendezvous == "127.0.0.1:29500"
    # even a half-set SLURM task environment does not matter under torchrun
    assert world_from_env(dict(TORCHRUN_2, SLURM_PROCID="0")).source == "torchrun"


@pytest.mark.parametrize("keep", [("SLURM_PROCID",), ("SLURM_PROCID", "SLURM_LOCALID"), ("SLURM_LOCALID", "SLURM_NTASKS"),
                                  ("SLURM_PROCID", "SLURM_NTASKS")])
def test_half_set_slurm_environment_is_one_user_error(keep):
    env = {k: v for k, v in SRUN_8.items() if not k.startswith(("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"))}
    env.update({k: SRUN_8[k] for k in keep})
    with pytest.raises(UserError) as info:
        world_from_env(env)
    message = str(info.value)
    assert message.startswith("half-set SLURM environment: " + ", ".join(keep) + " set but")
    for key in {"SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"} - set(keep):
        assert key in message.split("set but")[1]
    assert "srun" in message


@pytest.mark.parametrize(
    "override, message",
    [
        ({"SLURM_PROCID": "x"}, "SLURM_PROCID='x' in the environment is not an integer"),
        ({"SLURM_PROCID": "8"}, "SLURM_PROCID=8 is outside SLURM_NTASKS=8"),
        ({"SLURM_LOCALID": "6"}, "SLURM_LOCALID=6 is larger than SLURM_PROCID=5"),
        ({"SLURM_NTASKS": "0"}, "SLURM_NTASKS=0 in the environment must be >= 1"),
        ({"SLURM_NNODES": "9", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, "SLURM_NNODES=9 nodes for SLURM_NTASKS=8"),
        ({"SLURM_JOB_ID": "12x"}, "SLURM_JOB_ID='12x' in the environment is not an integer"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000 in the environment is not a port"),
        ({"SLURM_JOB_NODELIST": "gpu[07-08"}, "host list 'gpu[07-08': unbalanced brackets"),
        ({"SLURM_JOB_NODELIST": ""}, "SLURM_NTASKS=8 but neither SLURM_JOB_NODELIST nor MASTER_ADDR is set"),
    ],
)
def test_bad_slurm_values_are_user_errors(override, message):
    with pytest.raises(UserError) as info:
        world_from_env(dict(SRUN_8, **override))
    assert str(info.value).startswith(message)


def test_init_exports_the_rendezvous_it_derived():
    """world_from_env only reads; init (via export_rendezvous) writes MASTER_* for env://."""
    env = dict(SRUN_8)
    world = world_from_env(env)
    assert "MASTER_ADDR" not in env and "MASTER_PORT" not in env
    export_rendezvous(world, env)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu07", "17345")
    single = {}
    export_rendezvous(World(), single)
    assert single == {}


@pytest.mark.parametrize(
    "text, hosts",
    [
        ("localhost", ["localhost"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("gpu-a[1,3],gpu-b2", ["gpu-a1", "gpu-a3", "gpu-b2"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),  # width of the first number: no padding here
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("a,b[2-3],c", ["a", "b2", "b3", "c"]),
        ("r[1-2]n[1,3]", ["r1n1", "r1n3", "r2n1", "r2n3"]),  # several groups: a product, last fastest
        ("x[5]-ib", ["x5-ib"]),
        ("node[1- 2, 4]", ["node1", "node2", "node4"]),
    ],
)
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("text, why", [("node[1-3", "unbalanced"), ("node1-3]", "unbalanced"), ("a[[1]]", "unbalanced"),
                                       ("a,,b", "empty host name"), ("a[3-1]", "runs backwards"),
                                       ("a[x-2]", "bad range"), ("a[]", "bad range"), ("a[1-]", "bad range")])
def test_malformed_nodelists_are_user_errors(text, why):
    with pytest.raises(UserError, match=why):
        expand_nodelist(text)
