import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from engine.hashing import HASH_SIZE, hash_block_tokens, hash_prompt_blocks, root_hash

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_full_blocks_only_and_chained():
    hashes = hash_prompt_blocks(list(range(10)), 4)
    assert len(hashes) == 2
    assert all(len(h) == HASH_SIZE == 32 for h in hashes)
    first = hash_block_tokens(root_hash(), [0, 1, 2, 3])
    assert hashes == [first, hash_block_tokens(first, [4, 5, 6, 7])]
    assert hash_prompt_blocks([1, 2, 3], 4) == []


def test_none_parent_is_default_root():
    assert hash_block_tokens(None, [7, 8]) == hash_block_tokens(root_hash(), [7, 8])


def test_same_block_different_prefix_differs():
    a = hash_prompt_blocks([1, 2, 3, 4, 5, 6], 3)
    b = hash_prompt_blocks([9, 2, 3, 4, 5, 6], 3)
    assert a[0] != b[0] and a[1] != b[1]
    assert hash_prompt_blocks([1, 2, 3, 4, 5, 6, 7], 3) == a


def test_model_id_and_salt_isolate():
    tokens = list(range(8))
    base = hash_prompt_blocks(tokens, 4)
    assert hash_prompt_blocks(tokens, 4, model_id="m") != base
    assert hash_prompt_blocks(tokens, 4, cache_salt="tenant-a") != base
    # The length prefix keeps (model_id, salt) pairs apart even when they concatenate alike.
    assert hash_prompt_blocks(tokens, 4, model_id="ab", cache_salt="c") != hash_prompt_blocks(
        tokens, 4, model_id="a", cache_salt="bc"
    )


def test_extra_keys_and_token_encoding_are_unambiguous():
    assert hash_block_tokens(None, [1], ("lora",)) != hash_block_tokens(None, [1])
    assert hash_block_tokens(None, [1], (1,)) != hash_block_tokens(None, [1], ("1",))
    assert hash_block_tokens(None, [1], (b"1",)) != hash_block_tokens(None, [1], ("1",))
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [258])
    assert hash_block_tokens(None, [2**32 - 1]) != hash_block_tokens(None, [0])


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        hash_block_tokens(None, [-1])
    with pytest.raises(ValueError):
        hash_block_tokens(None, [2**32])
    with pytest.raises(ValueError):
        hash_block_tokens(b"short", [1])
    with pytest.raises(TypeError):
        hash_block_tokens(None, [1], (True,))
    with pytest.raises(ValueError):
        hash_prompt_blocks([1], 0)


def test_canonical_encoding():
    # The documented byte encoding, spelled out: changing it would split every shared cache.
    root = hashlib.sha256(
        b"tandem.root.v1" + b"m" + struct.pack("<I", 4) + b"tiny" + b"c" + struct.pack("<I", 0)
    ).digest()
    block = b"tandem.block.v1" + root + struct.pack("<5I", 4, 1, 2, 3, 4) + struct.pack("<I", 0)
    expected = hashlib.sha256(block).digest()
    assert hash_prompt_blocks([1, 2, 3, 4], 4, model_id="tiny") == [expected]
    assert expected.hex() == "62032d95960b925753173f2a50684d5cd8c4b8bd671fc3460063466c1e2270e9"


def test_deterministic_across_processes():
    code = (
        "from engine.hashing import hash_prompt_blocks;"
        "print(','.join(h.hex() for h in hash_prompt_blocks(list(range(50)), 16, model_id='m', cache_salt='s')))"
    )
    expected = ",".join(
        h.hex() for h in hash_prompt_blocks(list(range(50)), 16, model_id="m", cache_salt="s")
    )
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == expected


def test_hashing_does_not_import_torch():
    code = "import sys, engine.hashing; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
