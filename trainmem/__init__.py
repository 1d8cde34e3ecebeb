"""trainmem: a distributed training-memory runtime.

The subpackages live in the repository's top-level folders (runtime/, offload/, checkpoint/,
parallel/, memory_services/, launch/) and import as ``trainmem.<folder>``.
"""

__version__ = "0.1.0"
