"""Run by torchrun from tests/test_distributed.py: `dbrx train CONFIG.yaml`, except that rank 1 is SIGKILLed
in the middle of the checkpoint at step KILL_STEP (after writing its shards, before the checkpoint is renamed
into place), as a preempted or crashed node would be.

    torchrun --standalone --nproc_per_node 2 tests/distributed_kill_worker.py CONFIG.yaml KILL_STEP"""

import os
import signal
import sys

import torch.distributed as dist

import dbrx.train.trainer as trainer
from dbrx.cli import main

real_save = trainer.save_sharded


def save_then_die(model, optimizer, path):
    real_save(model, optimizer, path)
    if dist.get_rank() == 1 and path.name == f".ba{int(sys.argv[2]):08d}.tmp":
        os.kill(os.getpid(), signal.SIGKILL)


trainer.save_sharded = save_then_die
sys.exit(main(["train", sys.argv[1]]))
