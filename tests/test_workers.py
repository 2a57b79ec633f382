"""Starting a job's ranks on this machine: the master port is held for the job, addresses come
from psutil, and Azure ML's processes inherit nothing of this shell. Real processes."""
from __future__ import annotations

import json
import sys

from nlpwf.runtime import network, workers

_RANK = """
import datetime, errno, os, socket
import torch.distributed as dist
port = int(os.environ["MASTER_PORT"])
rank = int(os.environ["RANK"])
if rank == 0:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        print("PORT free for anyone")
    except OSError as e:
        print("PORT held", e.errno == errno.EADDRINUSE)
    s.close()
store = dist.TCPStore(os.environ["MASTER_ADDR"], port, 2, rank == 0, timeout=datetime.timedelta(seconds=60))
if rank == 0:
    store.set("greeting", "from rank 0")
else:
    print("STORE", store.get("greeting").decode())
store.wait(["greeting"])
"""


def test_the_master_port_is_held_for_the_job_and_rank_0s_store_binds_it(capfd):
    """Between picking MASTER_PORT and rank 0 binding it, nobody else can take it: a plain bind
    fails, and rank 0's store (torch's TCPStore, as init_process_group makes it) binds it all the same."""
    code = workers.run_workers([sys.executable, "-c", _RANK], 1, 2, threads=1)
    out = capfd.readouterr().out
    assert code == 0, out
    assert "[rank 0] PORT held True" in out and "[rank 1] STORE from rank 0" in out


def test_interface_addresses_come_from_psutil():
    assert network.interface_address("lo") == "127.0.0.1"
    assert network.interface_address("no-such-interface0") is None
    assert network.host_address("no-such-interface0") == network.host_address()


def test_azureml_processes_inherit_nothing_of_this_shell(monkeypatch, capfd):
    """An allow-list: the job's variables and Azure's contract; a variable of the launching shell
    (a canary, OMP_NUM_THREADS, LOCAL_WORLD_SIZE) does not reach them."""
    monkeypatch.setenv("NLPWF_SHELL_CANARY", "x")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    show = ("import json; raw = open('/proc/self/environ', 'rb').read().split(b'\\0'); "  # as the process started
            "print('ENV', json.dumps(sorted(i.split(b'=', 1)[0].decode() for i in raw if i)))")
    code = workers.run_workers([sys.executable, "-c", show], 1, 2, extra_env={"JOBVAR": "x", "PATH": "/usr/bin:/bin"},
                               azureml=True)
    assert code == 0
    seen = [json.loads(line.split("ENV ", 1)[1]) for line in capfd.readouterr().out.splitlines() if "ENV " in line]
    assert len(seen) == 2
    for names in seen:
        assert set(names) == {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "JOBVAR", "PATH"}
