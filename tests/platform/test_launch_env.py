import pytest

from megatron_onereason.platform.distributed import (
    detect_launch_env,
    first_slurm_host,
    job_port,
    local_device_index,
)


@pytest.mark.parametrize("nodelist, first", [("gpu[03-05,9],cpu1", "gpu03"), ("node7", "node7"),
                                             ("a-b[10,12]", "a-b10")])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_torchrun_wins_over_slurm():
    env = dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="h0", MASTER_PORT="1234",
               SLURM_PROCID="0", SLURM_NTASKS="2")
    launch = detect_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.master_port,
            launch.launcher) == (3, 8, 1, "h0", 1234, "torchrun")


def test_slurm_srun_layout():
    env = dict(SLURM_PROCID="5", SLURM_NTASKS="16", SLURM_LOCALID="5", SLURM_JOB_NODELIST="dgx[101-102]",
               SLURM_JOB_ID="123456")
    launch = detect_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.launcher) == (
        5, 16, 5, "dgx101", "slurm")
    assert launch.master_port == 20000 + 123456 % 10000


@pytest.mark.parametrize("job_id", [0, 9999, 12345, 10 ** 7 + 9999, 2 ** 31 - 1])
def test_job_ports_stay_below_the_ephemeral_range(job_id):
    assert 1024 <= job_port(job_id) < 32768


@pytest.mark.parametrize("local_rank, visible, device", [(5, 8, 5), (0, 8, 0), (5, 1, 0), (0, 1, 0)])
def test_device_is_the_local_rank_among_the_visible_devices(local_rank, visible, device):
    """torchrun / srun showing all 8 GPUs: device = local rank; SLURM binding one GPU per task: device 0."""
    assert local_device_index(local_rank, visible) == device


def test_more_local_ranks_than_visible_devices_is_refused():
    with pytest.raises(ValueError, match="local rank 5 but this process sees 2 CUDA devices"):
        local_device_index(5, 2)


@pytest.mark.parametrize("env, expected", [
    (dict(OMPI_COMM_WORLD_RANK="2", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_RANK="0"), (2, 4, 0, "openmpi")),
    (dict(PMI_RANK="1", PMI_SIZE="2", MPI_LOCALRANKID="1"), (1, 2, 1, "mpich")),
    ({}, (0, 1, 0, "single")),
    ({"MASTER_PORT": "29500"}, (0, 1, 0, "single")),  # a stray variable from a parent process
])
def test_mpi_and_single(env, expected):
    launch = detect_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == expected
    if launch.launcher == "single":
        assert launch.master_port != int(env.get("MASTER_PORT", 0))
