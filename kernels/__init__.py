"""Tensor math for adapters. Never imports `server`.

`lora` holds the per-adapter factor layout and the torch reference ops (the spec, the CPU path and
the test oracle); `batch` turns one step's token grouping into the object every AdaptedLinear calls.
"""
