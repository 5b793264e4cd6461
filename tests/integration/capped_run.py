"""Run `python -m ptqkit ARGS...` under a memory cap: RLIMIT_DATA set to this process's VmData,
once ptqkit's dependencies are imported and torch's threads started, plus ROOM MiB.

    python -m tests.integration.capped_run ROOM_MIB quantize ...

Run it with MALLOC_MMAP_THRESHOLD_=131072 so that glibc returns freed large blocks (otherwise
untouched heap growth counts against RLIMIT_DATA without being resident).
"""
from __future__ import annotations

import resource
import runpy
import sys

import torch
import transformers  # noqa: F401  (imported by the command anyway: not part of the room)
from transformers.models.llama import modeling_llama  # noqa: F401

import ptqkit.algorithms.blockwise  # noqa: F401
import ptqkit.cli  # noqa: F401
import ptqkit.engine.onloading  # noqa: F401
from ptqkit.engine.memory_plan import proc_status

if __name__ == "__main__":
    torch.ones(256, 256) @ torch.ones(256, 256)  # start the thread pool
    room = int(sys.argv[1]) << 20
    resource.setrlimit(resource.RLIMIT_DATA, (proc_status()["VmData"] + room, resource.RLIM_INFINITY))
    sys.argv = ["ptqkit", *sys.argv[2:]]
    runpy.run_module("ptqkit", run_name="__main__")
