"""The device mesh of a pipeline × data-parallel job: which ranks form each pipeline and each
stage's data-parallel group.

Ranks are laid out pipeline-major, as Megatron does: global rank = pipeline rank × D + replica, so
the D replicas of a stage are neighbours (one node under PACK placement: the gradient all-reduce,
the larger traffic, stays inside it) and a pipeline's p2p hops cross nodes. Every rank creates
every group in the same order (torch's ``new_group`` is collective over the whole job), each with
an explicit timeout: a group without one would wait torch's default of 30 minutes.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

import torch.distributed as dist


def mesh_groups(stages: int, replicas: int) -> tuple[list[list[int]], list[list[int]]]:
    """(pipelines, data groups): pipelines[d] are the global ranks of replica d's pipeline in stage
    order; data_groups[s] the global ranks holding pipeline rank s."""
    if stages < 1 or replicas < 1:
        raise ValueError(f"stages={stages} and replicas={replicas} must both be >= 1")
    pipelines = [[s * replicas + d for s in range(stages)] for d in range(replicas)]
    data = [[s * replicas + d for d in range(replicas)] for s in range(stages)]
    return pipelines, data


@dataclass
class PipelineMesh:
    """This rank's place in a ``stages`` × ``replicas`` mesh and its two process groups.

    ``pipeline_group`` carries the executor's p2p, the loss broadcast and the clip norm;
    ``data_group`` the gradient all-reduce of this rank's stages (None when replicas = 1).
    """

    stages: int
    replicas: int
    rank: int
    pipeline_rank: int
    replica: int
    pipeline_ranks: list[int]
    data_ranks: list[int]
    pipeline_group: dist.ProcessGroup | None
    data_group: dist.ProcessGroup | None

    @staticmethod
    def build(stages: int, replicas: int, *, timeout_s: float) -> "PipelineMesh":
        """Collective over the default group: every rank calls it with the same arguments."""
        world, rank = dist.get_world_size(), dist.get_rank()
        if stages * replicas != world:
            raise ValueError(f"stages={stages} x replicas={replicas} = {stages * replicas} ranks, but the "
                             f"process group has {world}")
        pipelines, data = mesh_groups(stages, replicas)
        timeout = _dt.timedelta(seconds=timeout_s)
        pipeline_group = data_group = None
        if replicas > 1:  # with one replica the pipeline is the whole job: the default group serves
            pipeline_group, _ = dist.new_subgroups_by_enumeration(pipelines, timeout=timeout)
            data_group, _ = dist.new_subgroups_by_enumeration(data, timeout=timeout)
        return PipelineMesh(stages=stages, replicas=replicas, rank=rank, pipeline_rank=rank // replicas,
                            replica=rank % replicas, pipeline_ranks=pipelines[rank % replicas],
                            data_ranks=data[rank // replicas], pipeline_group=pipeline_group, data_group=data_group)

    @property
    def stage_leader(self) -> int:
        """The lowest global rank holding this rank's stages (it saves their state)."""
        return self.data_ranks[0]

    def global_rank(self, pipeline_rank: int) -> int:
        """Global rank of pipeline rank ``pipeline_rank`` in this rank's pipeline."""
        return self.pipeline_ranks[pipeline_rank]


__all__ = ["PipelineMesh", "mesh_groups"]
