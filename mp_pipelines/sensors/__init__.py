"""Sensors of the code location: an inbox sensor per table workflow and a run-failure sensor.

`partitions.py` (which workflows take inbox batches, where their files are and their run config) is
imported by the factory, so this package's `__init__` imports nothing: import the submodules.
"""
