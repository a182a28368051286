"""The flywheel's data and models: what may be learnt from, and what it becomes."""
