"""Make Triton's CPU interpreter (``TRITON_INTERPRET=1``) accept runtime loop bounds under numpy 2.

The interpreter holds every scalar as a one-element numpy array and converts it
with ``int(array)`` when a scalar is used as a ``range`` bound. numpy 2 refuses
``int()`` of an array with ``ndim > 0``, so any kernel whose loop runs to a
value loaded at run time (a sequence length) fails under the interpreter
(Triton 3.6 with numpy 2.4). :func:`enable` re-registers that conversion with
``.item()``. Compiled kernels on a GPU are unaffected.
"""

from __future__ import annotations

from typing import Any

_enabled = False


def enable() -> None:
    """Patch the interpreter's scalar ``__index__`` (idempotent; needs triton importable)."""
    global _enabled
    if _enabled:
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    _enabled = True
