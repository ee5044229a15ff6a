import torch, time, statistics
import torch.nn.functional as F
torch.manual_seed(0)
L, H, KVH, D = 512, 8, 4, 64
q = torch.randn(L, H, D).bfloat16(); k = torch.randn(L, KVH, D).bfloat16(); v = torch.randn(L, KVH, D).bfloat16()
def t(f, n=20):
    for _ in range(3): f()
    ts = []
    for _ in range(n):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    return 1e3 * statistics.median(ts)
qT, kT, vT = q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
with torch.inference_mode():
    print("as is (views, enable_gqa)", t(lambda: F.scaled_dot_product_attention(qT, kT, vT, is_causal=True, enable_gqa=True)))
    qc, kc, vc = qT.contiguous(), kT.contiguous(), vT.contiguous()
    print("contiguous, enable_gqa", t(lambda: F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, enable_gqa=True)))
    kr, vr = kc.repeat_interleave(H // KVH, 1), vc.repeat_interleave(H // KVH, 1)
    print("contiguous, repeated kv", t(lambda: F.scaled_dot_product_attention(qc, kr, vr, is_causal=True)))
    print("views, repeated kv (incl repeat)", t(lambda: F.scaled_dot_product_attention(qT, kT.repeat_interleave(2, 1), vT.repeat_interleave(2, 1), is_causal=True)))
    print("float32 contiguous repeated", t(lambda: F.scaled_dot_product_attention(qc.float(), kr.float(), vr.float(), is_causal=True)))
    # grouped as batch: q [KVH, group*L, D]? not causal-compatible; skip
    a = F.scaled_dot_product_attention(qT, kT, vT, is_causal=True, enable_gqa=True)
    b = F.scaled_dot_product_attention(qc, kr, vr, is_causal=True)
    print("max diff", (a.float() - b.float()).abs().max().item(), "threads", torch.get_num_threads())
    scale = D ** -0.5
    mask = torch.ones(L, L, dtype=torch.bool).tril()
    def manual32():
        qf, kf, vf = qc.float(), kc.float(), vc.float()
        qg = qf.view(1, KVH, H // KVH, L, D).reshape(KVH, (H // KVH) * L, D)   # heads of a group stacked
        s = torch.baddbmm(torch.zeros(()), qg, kf[0].transpose(-1, -2), alpha=scale) if False else torch.bmm(qg, kf[0].transpose(-1, -2)) * scale
        s = s.view(KVH, H // KVH, L, L).masked_fill_(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1).view(KVH, (H // KVH) * L, L)
        return torch.bmm(p, vf[0]).view(1, H, L, D)
    print("manual float32 (grouped bmm)", t(manual32))
    m = manual32()
    print("manual vs flash max diff", (m - a.float()).abs().max().item())
    def manual_bf16():
        qg = qc.view(1, KVH, H // KVH, L, D).reshape(KVH, (H // KVH) * L, D)
        s = torch.bmm(qg, kc[0].transpose(-1, -2)).float() * scale
        s = s.view(KVH, H // KVH, L, L).masked_fill_(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1).view(KVH, (H // KVH) * L, L)
        return torch.bmm(p.bfloat16(), vc[0]).view(1, H, L, D)
    print("manual bf16 GEMMs", t(manual_bf16))
    print("manual bf16 vs flash max diff", (manual_bf16().float() - a.float()).abs().max().item())
    torch.set_num_threads(1)
    print("1 thread: flash", t(lambda: F.scaled_dot_product_attention(qT, kT, vT, is_causal=True, enable_gqa=True)), "manual32", t(manual32))
