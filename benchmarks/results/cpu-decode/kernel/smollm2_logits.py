# SmolLM2: prefill a real prompt eagerly (bf16), then one decode step by eager and by the kernel,
# against a float32 model doing the same (its own f32 cache): logits error of each
import torch, numpy as np
from llmesh.mesh.default_model import resolve_model
from llmesh.services.executor.weights import load_model
from llmesh.services.executor.attention import TorchPagedAttention, metadata_from_arrays
from llmesh.services.executor.cpu_decode_step import CpuDecodeStep
from llmesh.services.common.tokenizer import TextTokenizer
path = resolve_model("smollm2")
tok = TextTokenizer(str(path))
m16 = load_model(path, "bfloat16"); m32 = load_model(path, "float32", cpu_decode_kernel=False)
c = m16.config
prompts = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,", "Water boils at a temperature of"]
def caches(dt): return [(torch.zeros(64, 16, c.num_kv_heads, c.head_dim, dtype=dt), torch.zeros(64, 16, c.num_kv_heads, c.head_dim, dtype=dt)) for _ in range(c.num_layers)]
for text in prompts:
    ids = tok.encode(text)
    n = len(ids); need = -(-(n + 1) // 16); table = np.arange(1, 1 + need)[None, :].astype(np.int64)
    kv16, kv32 = caches(torch.bfloat16), caches(torch.float32)
    pre = metadata_from_arrays(np.array([0]), np.array([n]), table, 16, None, torch.device("cpu"))
    with torch.inference_mode():
        m16(torch.tensor(ids), pre.positions, kv16, pre, TorchPagedAttention())
        m32(torch.tensor(ids), pre.positions, kv32, pre, TorchPagedAttention())
    nxt = torch.tensor([tok.encode(text + " the")[-1]])
    st, cn = np.array([n]), np.array([1])
    meta = metadata_from_arrays(st, cn, table, 16, None, torch.device("cpu"))
    metak = metadata_from_arrays(st, cn, table, 16, None, torch.device("cpu"), with_block_tables=True)
    kvk = [(k.clone(), v.clone()) for k, v in kv16]
    with torch.inference_mode():
        he = m16(nxt, meta.positions, kv16, meta, TorchPagedAttention())
        ht = m32(nxt, meta.positions, kv32, meta, TorchPagedAttention())
        step = CpuDecodeStep(m16, kvk, 16)
        hk = step.run(nxt, metak)
        le, lk, lt = m16.compute_logits(he), m16.compute_logits(hk), m32.compute_logits(ht)
    print(f"{text[:20]!r}: |logit err| eager {(le-lt).abs().max():.3f} kernel {(lk-lt).abs().max():.3f}; eager-kernel {(le-lk).abs().max():.3f}; argmax t/e/k {lt.argmax().item()} {le.argmax().item()} {lk.argmax().item()}")
