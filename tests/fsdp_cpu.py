"""`python -m tests.fsdp_cpu ARGS` runs `flantune ARGS` with Accelerate's FSDP on CPU processes.

Accelerate turns FSDP on only for GPU-like processes: on the CPU, `accelerate launch --use_fsdp`
runs plain DDP (gloo) and no parameter is ever sharded. torch's FSDP2 (`fully_shard`) itself runs
on CPU processes, so this shim makes Accelerate take its FSDP path there too, and the tests launch
`accelerate launch --use_fsdp --fsdp_version 2 ... -m tests.fsdp_cpu train RECIPE`: the parameters
and optimizer state become DTensor shards, as on GPUs, and flantune's own code runs unchanged.
"""

import os
import runpy
import sys


def take_fsdp_on_cpu() -> None:
    """After Accelerate sets its process state up, an FSDP launch on CPU processes becomes FSDP
    (what it does for GPUs: accelerate/state.py, where MULTI_CPU is left out)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    init = AcceleratorState.__init__

    def fsdp_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        launched = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if launched and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()

    AcceleratorState.__init__ = fsdp_init


if __name__ == "__main__":
    take_fsdp_on_cpu()
    sys.argv[0] = "flantune"
    runpy.run_module("flantune.cli", run_name="__main__", alter_sys=True)
