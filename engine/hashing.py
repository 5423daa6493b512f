"""Chained block hashes for prefix caching (torch-free; the router imports it).

A prompt is cut into full blocks of ``block_size`` tokens. Block ``i``'s hash
covers its own tokens *and* its parent's hash (block ``i - 1``), so equal hashes
mean equal whole prefixes, not just equal blocks. The chain starts at a root
hash that mixes in the model id and a per-tenant cache salt, so two models (or
two tenants) never share cache entries. A trailing partial block has no hash.

Digests are **32-byte SHA-256** over a fixed canonical byte encoding, so they are
identical across processes, machines and Python versions (Python's ``hash()``
is salted per process and must not be used). Encoding of one block:

    b"tandem.block.v1" | parent (32 bytes) | u32 count | count x u32 token id (LE)
    | u32 number of extra keys | each key: 1-byte tag + u32 length + payload

Extra keys are ``int`` (tag ``i``, signed 8-byte little-endian), ``str``
(tag ``s``, UTF-8) or ``bytes`` (tag ``b``). The design follows vLLM's
prefix-caching design (parent hash + tokens + extra keys per full block).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

#: Size of every hash returned by this module, in bytes (SHA-256).
HASH_SIZE = 32

_BLOCK_DOMAIN = b"tandem.block.v1"
_ROOT_DOMAIN = b"tandem.root.v1"
_MAX_TOKEN_ID = 2**32 - 1

ExtraKey = int | str | bytes


def _encode_field(tag: bytes, payload: bytes) -> bytes:
    return tag + struct.pack("<I", len(payload)) + payload


def _encode_extra_key(key: ExtraKey) -> bytes:
    if isinstance(key, bool):  # bool is an int subclass; refuse to guess its encoding
        raise TypeError("extra key must be int, str or bytes, got bool")
    if isinstance(key, int):
        return _encode_field(b"i", struct.pack("<q", key))
    if isinstance(key, str):
        return _encode_field(b"s", key.encode("utf-8"))
    if isinstance(key, bytes):
        return _encode_field(b"b", key)
    raise TypeError(f"extra key must be int, str or bytes, got {type(key).__name__}")


def root_hash(model_id: str = "", cache_salt: str = "") -> bytes:
    """Parent hash of a prompt's first block (32 bytes).

    Args:
        model_id: name of the model whose KV the blocks hold.
        cache_salt: per-tenant salt; different salts never share blocks.
    """
    data = _ROOT_DOMAIN + _encode_field(b"m", model_id.encode()) + _encode_field(b"c", cache_salt.encode())
    return hashlib.sha256(data).digest()


def hash_block_tokens(
    parent_hash: bytes | None, token_ids: Sequence[int], extra_keys: tuple[ExtraKey, ...] = ()
) -> bytes:
    """Hash of one block chained to its parent (32 bytes).

    Args:
        parent_hash: hash of the previous block; ``None`` for the first block,
            which chains to ``root_hash()`` (empty model id and salt).
        token_ids: the block's token ids, each in ``[0, 2**32)``.
        extra_keys: further ``int``/``str``/``bytes`` values that change the
            block's KV (e.g. a LoRA name); order matters.

    Raises:
        ValueError: a token id or the parent hash is out of range.
        TypeError: an extra key of another type.
    """
    parent = root_hash() if parent_hash is None else parent_hash
    if len(parent) != HASH_SIZE:
        raise ValueError(f"parent_hash must be {HASH_SIZE} bytes, got {len(parent)}")
    if any(not 0 <= t <= _MAX_TOKEN_ID for t in token_ids):
        raise ValueError("token ids must be in [0, 2**32)")
    h = hashlib.sha256(_BLOCK_DOMAIN)
    h.update(parent)
    h.update(struct.pack(f"<I{len(token_ids)}I", len(token_ids), *token_ids))
    h.update(struct.pack("<I", len(extra_keys)))
    for key in extra_keys:
        h.update(_encode_extra_key(key))
    return h.digest()


def hash_prompt_blocks(
    token_ids: Sequence[int], block_size: int, *, model_id: str = "", cache_salt: str = ""
) -> list[bytes]:
    """Chained hashes of every full block of ``token_ids``.

    Args:
        token_ids: the prompt.
        block_size: tokens per block (> 0).
        model_id, cache_salt: mixed into the chain's root (see :func:`root_hash`).

    Returns:
        ``len(token_ids) // block_size`` hashes of 32 bytes; hash ``i`` covers
        tokens ``[0, (i + 1) * block_size)``.

    Raises:
        ValueError: ``block_size`` < 1 or a token id out of range.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    parent = root_hash(model_id, cache_salt)
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
