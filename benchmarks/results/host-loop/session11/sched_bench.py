"""Scheduler alone: schedule + update per decode step at a batch, pipelined (depth 2)."""
import random, sys, time, cProfile, pstats
from llmesh.services.scheduler.scheduler import Scheduler, SchedulerConfig
from llmesh.services.scheduler.kv_manager import KVCacheManager
from llmesh.services.scheduler.sequence import Sequence
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.common.step_plan import StepResult

def run(batch, prompt=256, output=128, profile=False):
    kv = KVCacheManager(batch * ((prompt + output) // 16 + 2), 16)
    s = Scheduler(SchedulerConfig(max_model_len=4096, max_num_batched_tokens=max(8192, prompt),
                                  max_num_seqs=batch), kv)
    rng = random.Random(0)
    params = SamplingParams(max_tokens=output, ignore_eos=True).with_seed()
    for i in range(batch):
        s.add(Sequence(seq_id=f"r{i}", request_id=f"r{i}", index=0,
                       prompt_token_ids=[1] + rng.choices(range(3, 3000), k=prompt - 1),
                       params=params, arrival_s=0.0))
    inflight = []
    t_sched = t_upd = 0.0; steps = 0; dec = 0
    pr = cProfile.Profile() if profile else None
    while s.num_unfinished or inflight:
        t0 = time.perf_counter()
        if pr: pr.enable()
        plan = s.schedule() if s.num_unfinished else None
        if pr: pr.disable()
        t1 = time.perf_counter()
        if plan is not None and plan.scheduled:
            inflight.append(plan)
        if len(inflight) >= 2 or (plan is None or not plan.scheduled) and inflight:
            p = inflight.pop(0)
            res = StepResult(step_id=p.step_id, sampled={x.seq_id: [rng.randrange(3, 3000)] for x in p.scheduled})
            t2 = time.perf_counter()
            if pr: pr.enable()
            s.update(p, res)
            if pr: pr.disable()
            t3 = time.perf_counter()
            if all(x.num_new_tokens == 1 for x in p.scheduled) and len(p.scheduled) == batch:
                t_upd += t3 - t2; t_sched += t1 - t0; dec += 1
        steps += 1
    print(f"batch {batch}: steps {steps}, full decode steps {dec}: schedule {1e3*t_sched/dec:.3f} ms, update {1e3*t_upd/dec:.3f} ms per step; {1e6*(t_sched+t_upd)/dec/batch:.2f} us/seq")
    if pr:
        pstats.Stats(pr).sort_stats("tottime").print_stats(18)

for b in (64, 256):
    run(b)
    run(b)
if "--profile" in sys.argv:
    run(256, profile=True)
