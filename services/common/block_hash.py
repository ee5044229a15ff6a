"""The chained block hash of the prefix cache: the contract between the block pool
(which caches blocks under it) and the kvcache index (which answers prefix
queries with it). Both must hash the same tokens the same way."""
from __future__ import annotations

import hashlib
from array import array


def hash_block(parent: bytes, token_ids: list[int], salt: str) -> bytes:
    """Hash of a full block: its tokens, chained to the previous block's hash,
    salted per tenant so tenants never share cached KV."""
    data = parent + salt.encode() + b"|" + array("q", token_ids).tobytes()
    return hashlib.blake2b(data, digest_size=16).digest()


def prefix_hashes(token_ids: list[int], block_size: int, salt: str,
                  limit: int | None = None) -> list[bytes]:
    """Chained hashes of the full blocks of `token_ids` (at most `limit`)."""
    num = len(token_ids) // block_size if limit is None else min(limit, len(token_ids) // block_size)
    hashes, parent = [], b""
    for i in range(num):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size], salt)
        hashes.append(parent)
    return hashes
