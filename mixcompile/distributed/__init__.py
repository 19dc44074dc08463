"""Distributed training of models with sparse blocks.

- :func:`parallelize`: expert parallelism, each rank keeps a slice of every MoE block's experts.
- :func:`data_parallel` / :func:`rank_local_state`: DDP and FSDP2 over converted (and parallelized) models.
- :func:`all_reduce_stats`: routing statistics over all ranks' tokens (aux-loss-free balancing over ranks
  is :func:`mixcompile.update_routing_bias` with ``group=``).

MoT blocks need nothing here: their groups are formed within each rank's batch.
"""

from mixcompile.distributed.data_parallel import data_parallel, rank_local_state
from mixcompile.distributed.expert_parallel import ExpertParallel, parallelize
from mixcompile.distributed.stats import all_reduce_stats

__all__ = [
    "ExpertParallel",
    "all_reduce_stats",
    "data_parallel",
    "parallelize",
    "rank_local_state",
]
