"""Consolidation: the job (plan, distil, one atomic commit), its cluster-wide lease, the cron scheduler."""

from .cron import CronScheduler
from .job import ConsolidationJob, ConsolidationResult, sources_of
from .lease import Lease, LeaseHeld, LeaseLost

__all__ = ["ConsolidationJob", "ConsolidationResult", "CronScheduler", "Lease", "LeaseHeld", "LeaseLost", "sources_of"]
