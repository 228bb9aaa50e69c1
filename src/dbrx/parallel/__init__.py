"""Scale-out training on torch.distributed, applied to the single-device model from outside (torchtitan's
`parallelize` pattern): the process group and mesh (`init_distributed`), the YAML's parallelism keys
(`parallel_config`), and FSDP2 over the data-parallel mesh (`parallelize`).

Launch with torchrun (`torchrun --nproc_per_node 2 -m dbrx train CONFIG.yaml`, or `dbrx train --nproc 2`):
ranks come from the usual environment variables, gloo on CPU and nccl on CUDA. World size 1 is today's
single-process path, untouched."""

from dbrx.parallel.config import ParallelConfig, parallel_config
from dbrx.parallel.runtime import Dist, init_distributed, single_process
from dbrx.parallel.fsdp import parallelize

__all__ = ["Dist", "ParallelConfig", "init_distributed", "parallel_config", "parallelize", "single_process"]
