"""Which steps run on one thread fewer (services/executor/step_threads.py)."""
import torch

from llmesh.services.executor.step_threads import StepThreads


def test_small_by_tokens_or_by_work():
    cpu = torch.device("cpu")
    by_tokens = StepThreads(cpu)  # no model size: the token count alone
    assert by_tokens.is_small(8) and not by_tokens.is_small(9)
    # a tiny model (0.6 MFLOP a token): a 512-token prefill chunk is still small
    tiny = StepThreads(cpu, flops_per_token=6e5)
    assert tiny.is_small(512) and tiny.small_by_work == 833
    assert not tiny.is_small(834)
    # a bench-sized one (68 MFLOP a token): the token rule decides
    bench = StepThreads(cpu, flops_per_token=6.8e7)
    assert bench.is_small(8) and not bench.is_small(9)


def test_a_small_step_runs_on_one_thread_fewer_and_puts_the_count_back():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threads = StepThreads(torch.device("cpu"), flops_per_token=6e5)
        with threads.step(300):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with threads.step(5000):
            assert torch.get_num_threads() == 2
        with StepThreads(torch.device("cuda")).step(1):  # (a GPU's host threads: unchanged)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
