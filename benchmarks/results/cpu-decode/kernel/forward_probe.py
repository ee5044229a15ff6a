# Forward-level probe: one decode step of B rows at context C, the eager bfloat16 forward (oneDNN prepacked
# projections, the compiled/eager CPU attention) against the CPU decode kernel, on random cache contents;
# timings are medians of 50 calls per thread count. Usage: [MODEL=bench|smollm2] [BLOCKS=N] forward_probe.py B C
import os, sys, time, statistics, torch
import llmesh.services.executor.projection as P
from llmesh.mesh.default_model import resolve_model
from llmesh.services.executor.weights import load_model
from llmesh.services.executor.runner import ModelRunner
from llmesh.services.executor.attention import metadata_from_arrays
from llmesh.kernels.cpu_decode import DecodeKernel, ModelDims, LayerWeights, pack_rows
import numpy as np

name = os.environ.get("MODEL", "bench")
path = resolve_model(name) if name in ("bench", "tiny", "smollm2") else name
eager_m = load_model(path, "bfloat16")            # prepacked (what runs today)
orig = P.onednn_bfloat16; P.onednn_bfloat16 = lambda: False
plain_m = load_model(path, "bfloat16"); P.onednn_bfloat16 = orig
r = ModelRunner(eager_m, int(os.environ.get("BLOCKS", 512)), 16)
c = plain_m.config
kv = r.kv_caches
def kernel_of(m):
    L = []
    for layer, (k, v) in zip(m.model.layers, kv):
        a = layer.self_attn
        L.append(LayerWeights(layer.input_layernorm.weight, pack_rows(a.qkv_proj.weight), a.qkv_proj.bias, pack_rows(a.o_proj.weight),
                              layer.post_attention_layernorm.weight, pack_rows(layer.mlp.gate_up_proj.weight),
                              pack_rows(layer.mlp.down_proj.weight), k, v))
    dims = ModelDims(c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim, c.num_layers, 16, c.rms_norm_eps)
    return DecodeKernel(dims, m.model.embed_tokens.weight, m.model.norm.weight, m.rope_cos, m.rope_sin, L)
kern = kernel_of(plain_m)
B = int(sys.argv[1]) if len(sys.argv) > 1 else 1
ctx = int(sys.argv[2]) if len(sys.argv) > 2 else 200
nblk = -(-(ctx + 1) // 16)
table = np.array([list(range(b * nblk + 1, b * nblk + 1 + nblk)) for b in range(B)], np.int64)
# fill cache with random values for the context
g = torch.Generator().manual_seed(0)
for k, v in kv:
    k.copy_(torch.randn(k.shape, generator=g).to(k.dtype) * 0.5); v.copy_(torch.randn(v.shape, generator=g).to(v.dtype))
starts = np.full(B, ctx, np.int64); counts = np.ones(B, np.int64)
meta = metadata_from_arrays(starts, counts, table, 16, None, torch.device("cpu"), with_block_tables=True)
ids = torch.randint(3, c.vocab_size - 1, (B,), generator=g)
snap = [(k.clone(), v.clone()) for k, v in kv]
def restore():
    for (k, v), (k0, v0) in zip(kv, snap): k.copy_(k0); v.copy_(v0)
def eager():
    with torch.inference_mode():
        return eager_m(ids, meta.positions, kv, meta, r.backend)
def native(nt):
    return kern.run(ids, meta.positions, meta.slot_mapping, meta.single_block_tables, meta.single_context_lens, nt)
restore(); he = eager(); kve = [(k.clone(), v.clone()) for k, v in kv]
restore(); hn = native(torch.get_num_threads()); kvn = [(k.clone(), v.clone()) for k, v in kv]
d = (he.float() - hn.float()).abs()
print(f"B={B} ctx={ctx} hidden max|diff| {d.max():.4g} mean {d.mean():.4g}  max|h| {he.float().abs().max():.3g}; kv diff {max((a.float()-b.float()).abs().max().item() for (a,_),(b,_) in zip(kve,kvn)):.4g}")
with torch.inference_mode():
    le = eager_m.compute_logits(he); ln = eager_m.compute_logits(hn)
print("argmax equal", (le.argmax(-1) == ln.argmax(-1)).float().mean().item(), "logit max diff", (le-ln).abs().max().item())
def t(f, n=50):
    for _ in range(5): f()
    ts = []
    for _ in range(n):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    return 1e3 * statistics.median(ts)
for nt in (1, 2):
    torch.set_num_threads(nt)
    print(f"threads {nt}: eager {t(eager):.2f} ms  native {t(lambda: native(nt)):.2f} ms")
if os.environ.get("SHOW"):
    print(he[0, :6], hn[0, :6], torch.isnan(he).any(), torch.isnan(hn).any())
