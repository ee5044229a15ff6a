import sys, torch, numpy as np
sys.path.insert(0, "tests")
from unit.test_cpu_decode_kernel import *
for shape in SHAPES:
    model = random_model(**SHAPES[shape]).float()
    model.init_rope(torch.device("cpu"))
    contexts = [1, 16, 17, 40, 203]
    ids, starts, counts, table, blocks = step_inputs(contexts)
    kv_e = caches(model, blocks, torch.float32); kv_n = caches(model, blocks, torch.float32)
    he = eager(model, ids, starts, counts, table, kv_e)
    step = kernel_for(model, kv_n)
    hn = native(step, ids, starts, counts, table)
    print(shape, hn.dtype, (hn - he).abs().max().item(), he.abs().max().item(),
          max((a - b).abs().max().item() for (k1, v1), (k2, v2) in zip(kv_e, kv_n) for a, b in ((k1, k2), (v1, v2))))
    with torch.inference_mode():
        le = model.compute_logits(he); ln = step.logits(hn)
    print("  logits", (le - ln).abs().max().item(), le.abs().max().item(), torch.equal(le.argmax(-1), ln.argmax(-1)))
    # batch invariance
    for i in range(len(contexts)):
        kv1 = caches(model, blocks, torch.float32)
        s1 = kernel_for(model, kv1)
        one = native(s1, ids[i:i+1], starts[i:i+1], counts[i:i+1], table[i:i+1])
        assert torch.equal(one[0], hn[i]), i
    print("  batch-invariant")
