"""Block tables for kernel tests: each sequence's blocks drawn at random from one
pool, as a running engine leaves them."""
import random

import torch


def random_block_tables(lengths: list[int], block_size: int, seed: int,
                        spare: int = 3) -> tuple[torch.Tensor, int]:
    """(int32 [len(lengths), max blocks] tables, pool size) for sequences of `lengths`
    tokens; the pool has `spare` blocks no table uses."""
    need = [-(-n // block_size) for n in lengths]
    num_blocks = sum(need) + spare
    perm = list(range(num_blocks))
    random.Random(seed).shuffle(perm)
    tables = torch.zeros(len(lengths), max(need), dtype=torch.int32)
    at = 0
    for i, n in enumerate(need):
        tables[i, :n] = torch.tensor(perm[at:at + n])
        at += n
    return tables, num_blocks
