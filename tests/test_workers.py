"""Starting a job's ranks on this machine: the master port is held for the job, and addresses
come from psutil. Real processes. (What Azure ML's processes inherit: test_azureml_emulate.py.)"""
from __future__ import annotations

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
