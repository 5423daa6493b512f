"""A decode-side KV receiver in its own process, for the two-process backend tests.

``python -m tests.kvtransfer.peer TRANSPORT DEVICE DTYPE OUT [STAGING_BYTES]``: starts a
receiver of ``TRANSPORT`` on a zeroed cache (the tiny test layout, 6 blocks) on
``DEVICE``, prints its address on stdout, expects reservation ``res-1`` of request
``req-1`` on :data:`DST_BLOCKS`, waits for it and writes the cache's raw bytes to
``OUT``, then prints ``done <messages> <bytes>`` (or ``failed <error>``) and exits.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from kvtransfer import get_backend
from kvtransfer.blocks import to_cpu_bytes
from tests.kvtransfer import DST_BLOCKS, EPOCH, make_layout, zero_cache


async def main(transport: str, device: str, dtype: str, out: Path, staging: int | None) -> None:
    if staging is not None:
        import kvtransfer.nccl

        kvtransfer.nccl.STAGING_BYTES = staging
    layout = make_layout(dtype)
    cache = zero_cache(layout, 6).to(device)
    _, receiver_cls = get_backend(transport)
    receiver = receiver_cls(cache, layout, "decode-0", EPOCH)
    print(await receiver.start(), flush=True)
    receiver.expect("res-1", "req-1", EPOCH, DST_BLOCKS)
    try:
        received = await receiver.wait_complete("res-1", timeout_s=60)
    except Exception as exc:
        print(f"failed {type(exc).__name__}: {exc}", flush=True)
        await receiver.close()
        return
    out.write_bytes(bytes(to_cpu_bytes(cache)))
    print(f"done {received.num_messages} {received.num_bytes}", flush=True)
    await asyncio.sleep(0.2)  # let the last ack leave
    await receiver.close()


if __name__ == "__main__":
    staging_arg = int(sys.argv[5]) if len(sys.argv) > 5 else None
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]), staging_arg))
