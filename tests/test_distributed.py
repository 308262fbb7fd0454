"""torchrun set-up (utils/distributed.py) as a unit: the process's place read from torchrun's environment, and
the few collectives the stages use, in one process (every collective a no-op) and in two real gloo processes
started the way torchrun starts them (environment variables only)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from utils.distributed import from_env
from utils.errors import SuiteError


def test_outside_torchrun_one_process_and_collectives_do_nothing(monkeypatch, capsys):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    dist = from_env("generate")
    assert (dist.rank, dist.world_size, dist.local_rank, dist.main, dist.active) == (0, 1, 0, True, False)
    assert dist.broadcast({"a": 1}) == {"a": 1} and dist.most(7) == 7
    assert dist.on_main(lambda x: x * 2, 21) == 42
    with pytest.raises(SuiteError, match="boom"):
        dist.on_main(lambda: (_ for _ in ()).throw(SuiteError("boom")))
    dist.barrier()
    dist.close()
    assert capsys.readouterr().err == ""  # nothing to report for one process


WORKER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from utils.distributed import from_env
    from utils.errors import SuiteError

    dist = from_env("finetune")
    out = {"rank": dist.rank, "world": dist.world_size, "main": dist.main}
    out["sum"] = dist.all_reduce_(torch.tensor([float(dist.rank + 1)])).item()
    out["most"] = dist.most(10 * dist.rank + 3)
    out["token"] = dist.broadcast(f"token-of-{dist.rank}")
    out["on_main"] = dist.on_main(lambda: f"ran on {dist.rank}")

    def fail():
        raise SuiteError("rank 0 refused the input")

    try:
        dist.on_main(fail)
    except SuiteError as exc:
        out["error"] = str(exc)
    dist.barrier()
    dist.close()
    print(json.dumps(out))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_gloo_processes_started_as_torchrun_starts_them(tmp_path):
    """Two real processes (a process group cannot be faked); a few seconds, most of it importing torch."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, str(script), str(REPO)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append((json.loads(out.strip().splitlines()[-1]), err))
    (zero, err0), (one, err1) = results
    assert (zero["rank"], one["rank"], zero["main"], one["main"]) == (0, 1, True, False)
    assert zero["world"] == one["world"] == 2
    assert zero["sum"] == one["sum"] == 3.0  # 1 + 2
    assert zero["most"] == one["most"] == 13
    assert zero["token"] == one["token"] == "token-of-0"
    assert zero["on_main"] == one["on_main"] == "ran on 0"
    # rank 0's refusal reaches rank 1 with the same message, instead of leaving it waiting
    assert zero["error"] == one["error"] == "rank 0 refused the input"
    assert "finetune: data parallel over 2 processes (gloo)" in err0 and "data parallel" not in err1
