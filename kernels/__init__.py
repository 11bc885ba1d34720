"""Tensor math for adapters. Never imports `server`.

`lora` and `shared_bases` hold each kind's slot layouts and its torch reference op (the spec, the CPU
path and the test oracle); `batch` holds the step plan's torch parts, which carry every tensor they
read, and `batch_triton` their Triton twins; `segments` and `slot_store` are the Triton layouts.
"""
