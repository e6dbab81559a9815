"""generate's choice of device per process and what it hands to NCCL, checked on the CPU with
torch.cuda and torch.distributed faked (the NCCL paths have no other test without GPUs): each
torchrun process takes cuda:LOCAL_RANK, an explicit cuda:N is refused when processes would share a
GPU, a LOCAL_RANK beyond the visible GPUs is named, NCCL starts with the rank's device and an
explicit timeout, its start-up failure is a clear error, and NCCL only ever gets CUDA tensors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from autoguide_fast.distributed import generation as G


@pytest.fixture
def gpus(monkeypatch):
    """A process that sees ``n`` GPUs (set the count with gpus(n))."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def see(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    see(8)
    return see


def test_each_torchrun_process_takes_its_local_rank_gpu(gpus):
    for text in ("auto", "cuda"):
        assert G._pick_device(text, 3, 8, 8) == torch.device("cuda", 3)
    gpus(1)  # A launcher that narrows CUDA_VISIBLE_DEVICES to each process's own GPU.
    assert G._pick_device("auto", 5, 8, 8) == torch.device("cuda", 0)


def test_an_explicit_gpu_is_refused_when_processes_would_share_it(gpus):
    with pytest.raises(ValueError, match=r"^--device cuda:0: 8 processes on this machine would share one GPU"):
        G._pick_device("cuda:0", 3, 8, 8)
    # One process per machine (multi-node, one GPU each): an explicit GPU is fine.
    assert G._pick_device("cuda:1", 0, 4, 1) == torch.device("cuda", 1)
    assert G._pick_device("cuda:1", 0, 1, 1) == torch.device("cuda", 1)


def test_a_gpu_that_does_not_exist_is_named(gpus):
    gpus(2)
    with pytest.raises(ValueError, match=r"^--device auto: LOCAL_RANK=3 but this process sees 2 GPU\(s\)"):
        G._pick_device("auto", 3, 4, 4)
    with pytest.raises(ValueError, match=r"^--device cuda:5: this process sees 2 GPU\(s\)"):
        G._pick_device("cuda:5", 0, 1, 1)


def _fake_torchrun(monkeypatch, calls, init=None):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(dist, "is_initialized", lambda: any(c[0] == "init" for c in calls))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: next(
        (c[1].index for c in reversed(calls) if c[0] == "set_device"), 0))
    monkeypatch.setattr(dist, "init_process_group", init or (lambda **kw: calls.append(("init", kw))))
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cuda:nccl")
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 5)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 8)


def test_nccl_starts_on_the_ranks_gpu_with_an_explicit_timeout(gpus, monkeypatch):
    calls: list = []
    _fake_torchrun(monkeypatch, calls)
    job = G._Job(G.GenerateOptions(net="x", outdir="unused"))
    assert calls[0] == ("set_device", torch.device("cuda", 3))
    assert calls[1][0] == "init" and calls[1][1]["backend"] == "nccl"
    assert calls[1][1]["device_id"] == torch.device("cuda", 3)
    assert calls[1][1]["timeout"] == G.PROCESS_GROUP_TIMEOUT  # torch's NCCL default: 10 minutes.
    assert job.device == job.comm_device == torch.device("cuda", 3) and job.owned


def test_nccl_failing_to_start_is_a_clear_error(gpus, monkeypatch):
    calls: list = []

    def init(**kwargs):
        raise dist.DistBackendError("NCCL error in: init.cc, invalid usage, Duplicate GPU detected")

    _fake_torchrun(monkeypatch, calls, init)
    with pytest.raises(ValueError, match=r"^--device: NCCL could not start on cuda:3 \(each process needs a GPU"):
        G._Job(G.GenerateOptions(net="x", outdir="unused"))


def test_a_callers_nccl_group_gets_cuda_tensors_even_with_device_cpu(gpus, monkeypatch):
    """NCCL carries CUDA tensors only: the control messages are made on this process's GPU, whatever
    --device the sampling uses (here: the device each one is asked for; made on the CPU, no GPU)."""
    calls: list = []
    _fake_torchrun(monkeypatch, calls)
    calls.append(("init", {}))  # The caller's group exists.
    asked = []
    real_zeros, real_tensor = torch.zeros, torch.tensor

    def on_cpu(make):
        def made(*args, device=None, **kwargs):
            asked.append(torch.device(device) if device is not None else None)
            return make(*args, **kwargs)
        return made

    monkeypatch.setattr(torch, "zeros", on_cpu(real_zeros))
    monkeypatch.setattr(torch, "tensor", on_cpu(real_tensor))
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: None)
    monkeypatch.setattr(dist, "broadcast", lambda t, *a, **k: None)
    job = G._Job(G.GenerateOptions(net="x", outdir="unused", device="cpu"))
    assert job.device == torch.device("cpu") and job.comm_device == torch.device("cuda", 0)
    asked.clear()
    job.agree(None, "testing")
    job.most(3)
    job.broadcast_flags(None, 2)
    assert asked == [torch.device("cuda", 0)] * 3, asked


@pytest.mark.parametrize("config, data, control", [
    ("cuda:nccl", "cuda", "cuda"),                 # init_process_group("nccl"), or no backend on a GPU machine
    ("cpu:gloo,cuda:nccl", "cuda", "cpu"),         # data on NCCL, control messages on gloo
    ("cpu:gloo,cuda:gloo", "cpu", "cpu"),          # init_process_group("gloo")
    ("cpu:gloo", "cpu", "cpu"),                    # no backend on a CPU machine
])
def test_messages_go_where_the_groups_backends_carry_them(monkeypatch, config, data, control):
    """get_backend says "undefined" for a group made without a backend (NCCL only, on a GPU machine)
    and "cpu:gloo,cuda:nccl" for a mixed one: comparing it with "nccl" sent CPU tensors to NCCL, or
    the guide's data through the host. The backend configuration decides."""
    from autoguide_fast.distributed import routes

    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: config)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "undefined")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    expected = {"cuda": torch.device("cuda", 2), "cpu": torch.device("cpu")}
    assert routes.message_device() == expected[data]
    assert routes.message_device(prefer_cpu=True) == expected[control]


def test_a_group_that_carries_neither_is_named(monkeypatch):
    from autoguide_fast.distributed import routes

    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cuda:ucc")
    with pytest.raises(ValueError, match=r"^group: its backends \(cuda:ucc\) carry neither"):
        routes.message_device()


def test_the_backend_configuration_of_a_real_group_is_read(tmp_path):
    from autoguide_fast.distributed import routes

    dist.init_process_group("cpu:gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'pg'}")
    try:
        assert routes.device_backends() == {"cpu": "gloo"}
        assert routes.message_device() == torch.device("cpu")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("config, expected", [("cuda:nccl", "cuda"), ("cpu:gloo,cuda:nccl", "cpu")])
def test_generate_and_guide_parallel_read_the_backend_configuration(gpus, monkeypatch, config, expected):
    """A caller's group made without a backend reports "undefined": generate's control messages and
    guide-parallel's messages still go where its backends carry them."""
    from autoguide_fast.distributed import guide_parallel as GP

    calls: list = []
    _fake_torchrun(monkeypatch, calls)
    calls.append(("init", {}))  # The caller's group exists.
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "undefined")
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: config)
    job = G._Job(G.GenerateOptions(net="x", outdir="unused", device="cpu"))
    assert job.comm_device.type == expected
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_global_rank", lambda group, rank: rank)
    assert GP._Link(None).device == torch.device("cuda", 0)  # NCCL carries the data in both.
