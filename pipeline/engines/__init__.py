"""Where the scheduler runs. The local engine is ``pipeline.run`` itself (one process); the Ray engine
(``ray_engine``) runs the same scheduler in tasks over partitions of the input (``partitions``), under one global
budget (``budget``), each task committing its answers to the output dataset (``commit``, ``task``)."""
