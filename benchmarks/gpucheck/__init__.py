"""The sections of ``benchmarks/gpu_check.py``: one prepared run that proves fxshear on a GPU."""
