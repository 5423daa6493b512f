"""Layer-wise KV streaming: hand each layer group of a prompt's final chunk to the sender as soon as it is computed.

Threads: the engine thread runs the forward; the KV senders run on the asyncio
event loop. Lifecycle of one streamed prompt:

1. The servicer calls :meth:`LayerStreamer.watch` (event loop) before it queues the
   request, and reads :class:`LayerGroupReady` items from the returned queue.
2. Before every step, the engine thread calls :meth:`LayerStreamer.before_execute`
   with the step's inputs. When a watched request's *final* prompt chunk is in the
   step (its input samples the first token), the model's per-layer hook
   (``on_layer_done``) is set for that step.
3. After the last layer of each group (``layers_per_message`` layers; the last
   group may be shorter) the hook records a CUDA event on the compute stream (on
   CUDA; ``None`` on CPU, where the layer is done when the hook runs) and posts a
   :class:`LayerGroupReady` to the loop (``call_soon_threadsafe``) with the
   request's block table.
4. The servicer waits for the group's event and sends its layers for *all* the
   prompt's blocks, so the transfer of group *g* overlaps the compute of later groups.

Why only the final chunk streams: a layer's KV for the whole prompt is complete
once that layer of the final chunk ran (earlier chunks finished in earlier steps,
prefix-cache hits were complete before), so each group message carries every
prompt block and the decode worker's coverage check sees each block × layer
exactly once. Earlier chunks are therefore sent with the final chunk's groups, not
on their own. The engine posts every group of a step before that step's output, so
once the servicer has the first token, a group that never came (no forward ran,
e.g. a model without the hook) is known to be missing and is sent as one message.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from engine.batch import SequenceInput


@dataclass(frozen=True)
class LayerGroupReady:
    """Layers ``[layer_start, layer_end)`` of a request's prompt are computed (or enqueued before ``event``).

    Attributes:
        layer_start: first layer of the group.
        layer_end: end of the group (exclusive).
        block_table: the request's block ids at that step (covers the whole prompt).
        event: CUDA event recorded after the group's last layer; ``None`` on CPU.
    """

    layer_start: int
    layer_end: int
    block_table: tuple[int, ...]
    event: torch.cuda.Event | None


def group_bounds(num_layers: int, layers_per_message: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` layer groups of a model of ``num_layers`` layers, in order.

    Raises:
        ValueError: ``layers_per_message`` < 1.
    """
    if layers_per_message < 1:
        raise ValueError(f"layers_per_message must be >= 1, got {layers_per_message}")
    return [(s, min(s + layers_per_message, num_layers)) for s in range(0, num_layers, layers_per_message)]


class LayerStreamer:
    """Connects the model's per-layer hook (engine thread) to the servicer's queues (event loop).

    Args:
        model: the model; its ``on_layer_done`` attribute is set per step.
        device: the model's device (events are recorded on CUDA only).
        num_layers: the model's decoder layers.
        layers_per_message: layers per streamed message (>= 1).
        loop: the event loop the queues belong to.

    Raises:
        ValueError: ``layers_per_message`` < 1.
    """

    def __init__(
        self,
        model: Any,
        device: torch.device,
        num_layers: int,
        layers_per_message: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._model = model
        self._cuda = device.type == "cuda"
        self._ends = {end - 1: (start, end) for start, end in group_bounds(num_layers, layers_per_message)}
        self._loop = loop
        self._lock = threading.Lock()
        self._watched: dict[str, asyncio.Queue[LayerGroupReady | None]] = {}
        self._targets: list[tuple[asyncio.Queue[LayerGroupReady | None], tuple[int, ...]]] = []

    # -- event loop ----------------------------------------------------------

    def watch(self, req_id: str) -> asyncio.Queue[LayerGroupReady | None]:
        """Start watching ``req_id`` (engine request id); returns its queue of groups."""
        queue: asyncio.Queue[LayerGroupReady | None] = asyncio.Queue()
        with self._lock:
            self._watched[req_id] = queue
        return queue

    def unwatch(self, req_id: str) -> None:
        """Stop watching ``req_id`` (groups already posted stay in its queue)."""
        with self._lock:
            self._watched.pop(req_id, None)

    # -- engine thread -------------------------------------------------------

    def before_execute(self, seqs: Sequence[SequenceInput]) -> None:
        """Arm the model's hook for this step if a watched request's final chunk is in it."""
        with self._lock:
            self._targets = [
                (self._watched[s.req_id], tuple(s.block_table))
                for s in seqs
                if s.sample and s.req_id in self._watched
            ]
        self._model.on_layer_done = self._layer_done if self._targets else None

    def _layer_done(self, layer_idx: int) -> None:
        bounds = self._ends.get(layer_idx)
        if bounds is None:
            return
        event = None
        if self._cuda:
            import torch

            event = torch.cuda.Event()
            event.record()
        for queue, table in self._targets:
            ready = LayerGroupReady(bounds[0], bounds[1], table, event)
            self._loop.call_soon_threadsafe(queue.put_nowait, ready)
