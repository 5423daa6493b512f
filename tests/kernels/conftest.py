"""Kernel tests run on CUDA when present, else under Triton's CPU interpreter.

``TRITON_INTERPRET`` is read when triton is imported, so it is set here, before
any test module imports a kernel (a session that imported triton earlier keeps
its mode: run this directory in its own process). ``TANDEM_KERNEL_TEST_DEVICE=cuda``
forces the GPU (the benchmark run uses it).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

if os.environ.get("TANDEM_KERNEL_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="kernel tests need triton")

import kernels.interpreter_compat  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    kernels.interpreter_compat.enable()


@pytest.fixture
def device() -> str:
    """``"cuda"`` for compiled kernels, ``"cpu"`` under the interpreter."""
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.fixture
def half_dtype(device: str) -> torch.dtype:
    """The 16-bit dtype under test: bfloat16 on the GPU; float16 under the interpreter,
    which emulates bfloat16 without numpy support (its ``tl.dot`` misreads bfloat16
    operands and its float32 -> bfloat16 casts truncate instead of rounding)."""
    return torch.bfloat16 if device == "cuda" else torch.float16


def tolerance(dtype: torch.dtype) -> dict[str, Any]:
    """``torch.testing.assert_close`` tolerances for a kernel output of ``dtype``."""
    if dtype == torch.float32:
        return {"atol": 2e-5, "rtol": 2e-5}
    return {"atol": 2e-2, "rtol": 2e-2}
