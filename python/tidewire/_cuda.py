"""The current CUDA stream as the native layer takes it."""

from __future__ import annotations

import torch


def raw_stream(device: int) -> int:
    """The current stream of `device` as its `cudaStream_t` value (a C call: building a torch
    stream object costs several µs, most of a small call's host time). Only for launching:
    the default stream's value is 0, and a stream object made from 0 is another stream."""
    return int(torch._C._cuda_getCurrentRawStream(device))
