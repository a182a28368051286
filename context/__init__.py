"""The context pipeline: chunking, ranking, prompt templates, post-processing.

Pure functions over frozen dataclasses: no I/O, no protobuf, no engine types.
"""
