"""Requests fed to an in-process engine as they arrive, every output recorded: what
the engine property tests (pipelining, speculative decoding) compare run to run."""
from __future__ import annotations


def run_arrivals(engine, reqs: list[dict], prompt, params, before_step=None) -> dict:
    """Request i (`reqs[i]`) is added at step `reqs[i]["arrive"]` (`prompt(i, r)`,
    `params(i, r)`, id `r{i}`, its `priority` if it has one); `before_step(step, out)`
    runs before each step. Returns per (request, index) [tokens, text, finish reason,
    logprobs as (token, logprob, top ids)], once the engine is idle, after checking
    that nothing leaked; the engine is closed."""
    out: dict[tuple[int, int], list] = {}
    step = 0
    while step < 8 or engine.has_unfinished():
        step += 1
        assert step < 3000, "no progress"
        for i, r in enumerate(reqs):
            if r["arrive"] == step - 1:
                engine.add_request(prompt(i, r), params(i, r), request_id=f"r{i}",
                                   priority=r.get("priority", "standard"))
        if before_step is not None:
            before_step(step, out)
        for o in engine.step():
            rec = out.setdefault((int(o.request_id[1:]), o.index), [[], "", None, []])
            rec[0].extend(o.new_token_ids)
            rec[1] += o.text
            rec[3].extend((lp.token_id, lp.logprob, lp.top_ids) for lp in o.logprobs)
            if o.finish_reason is not None:
                rec[2] = o.finish_reason
    assert engine.kv.pool.num_used == 0
    assert not engine.scheduler.seqs and not engine.runner.seqs
    engine.kv.pool.check_invariants()
    engine.close()
    return out
