"""The kernel wrappers check their arguments before anything reaches a GPU: a wrong
shape, dtype or device is a clear ValueError (here on CPU, where no kernel runs)."""
import pytest
import torch

from llmesh.kernels import ops

BF16 = torch.bfloat16


def _decode_args(**over):
    a = dict(q=torch.zeros(2, 8, 64, dtype=BF16), k=torch.zeros(10, 16, 2, 64, dtype=BF16),
             v=torch.zeros(10, 16, 2, 64, dtype=BF16),
             tables=torch.zeros(2, 4, dtype=torch.int32), lens=torch.ones(2, dtype=torch.int32))
    a.update(over)
    return a["q"], a["k"], a["v"], a["tables"], a["lens"]


@pytest.mark.parametrize("over,needle", [
    (dict(q=torch.zeros(2, 8, 64)), "fp16 or bf16"),
    (dict(v=torch.zeros(10, 16, 2, 64, dtype=torch.float16)), "share fp16 or bf16"),
    (dict(q=torch.zeros(2, 8, 96, dtype=BF16), k=torch.zeros(10, 16, 2, 96, dtype=BF16),
          v=torch.zeros(10, 16, 2, 96, dtype=BF16)), "head_dim 96"),
    (dict(k=torch.zeros(10, 8, 2, 64, dtype=BF16), v=torch.zeros(10, 8, 2, 64, dtype=BF16)),
     "block size 8"),
    (dict(q=torch.zeros(2, 18, 64, dtype=BF16)), "18 query heads over 2"),
    (dict(q=torch.zeros(2, 32, 64, dtype=BF16), k=torch.zeros(10, 16, 2, 64, dtype=BF16)),
     "at most 8"),
    (dict(tables=torch.zeros(2, 4, dtype=torch.int64)), "block_tables must be int32"),
    (dict(lens=torch.ones(3, dtype=torch.int32)), r"context_lens must be int32 \[2\]"),
    (dict(k=torch.zeros(10, 16, 2, 64, dtype=BF16).transpose(0, 1).contiguous().transpose(0, 1)),
     "contiguous"),
    (dict(), "same CUDA device"),  # right in every way but the device
], ids=["fp32", "mixed", "d96", "bs8", "uneven", "group16", "tables64", "lens", "strided", "cpu"])
def test_decode_arguments_are_checked(over, needle):
    with pytest.raises(ValueError, match=needle):
        ops.paged_decode_attention(*_decode_args(**over), scale=0.125)


def test_cache_ops_arguments_are_checked():
    k = torch.zeros(3, 2, 64, dtype=BF16)
    cache = torch.zeros(10, 16, 2, 64, dtype=BF16)
    with pytest.raises(ValueError, match="slot_mapping must be int64"):
        ops.reshape_and_cache(k, k, cache, cache, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="match the caches' rows"):
        ops.reshape_and_cache(torch.zeros(3, 4, 64, dtype=BF16), torch.zeros(3, 4, 64, dtype=BF16),
                              cache, cache, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="same CUDA device"):
        ops.reshape_and_cache(k, k, cache, cache, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="pairs must be int64"):
        ops.copy_blocks(cache, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="same CUDA device"):
        ops.copy_blocks(cache, torch.zeros(2, 2, dtype=torch.int64))
