"""Model runner: executes StepPlans against the model and the paged KV cache.

Keeps per-sequence state (tokens, block table, sampling params) keyed by
sequence id, so after a sequence's first step the plan carries only diffs.
One `execute` = block copies, one forward over the flat batch, one sampling
pass over the rows that produce a token. It comes in two halves, `prepare` (the
plan's diffs applied, the step's inputs built and on the device) and `finish`
(the forward, sampling, the sampled tokens appended), so that a caller holding
the next plan can prepare it before it hands back this step's result (`StepLane`
below): the host work of step N+1 then happens before the loop that reads step
N's result wakes, not against it for the GIL, and the next forward starts at once.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import secrets
import threading
from dataclasses import dataclass

import numpy as np
import torch

from llmesh.services.common.step_plan import NewSequence, StepPlan, StepResult, sequence_id
from llmesh.services.executor.attention import TorchPagedAttention, metadata_from_arrays
from llmesh.services.executor.batch_state import BatchState
from llmesh.services.executor.kv_memory import kv_zeros
from llmesh.services.executor.model import CausalLM
from llmesh.services.executor.projection import Projection
from llmesh.services.executor.sampler import SampleRow, SamplingBatch, sample
from llmesh.services.executor.staging import Staged, Staging
from llmesh.services.executor.step_threads import StepThreads
from llmesh.services.executor.step_timer import StepTimer


log = logging.getLogger("llmesh.executor")

@dataclass
class SeqState:
    """A live sequence: its whole token list and what samples it; its step state
    (tokens computed, block table, last token) is in the batch arrays at `slot`."""

    seq_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: object  # (seeded)
    index: int
    slot: int
    grammar: object = None  # structured output: its SequenceGrammar (on the sampling rank)


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int,
                 device: torch.device | str = "cpu", backend=None,
                 test_corrupt_after_steps: int = 0, tokenizer_dir: str | None = None,
                 cuda_graph_batch: int = 0, max_model_len: int | None = None):
        """`tokenizer_dir`: the model directory whose tokenizer.json structured output
        compiles grammars against (None: requests with a grammar fail).
        `cuda_graph_batch` > 0 (on CUDA, with the kernel backend, without tensor
        parallelism): decode steps of up to that many sequences replay CUDA graphs,
        captured here for sequences of up to `max_model_len` tokens.
        `test_corrupt_after_steps` (tests only): after that many sampling steps every
        sampled token is off by one, a silently broken replica for the known-answer
        probe to catch."""
        self.model = model
        self.config = model.config
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = torch.device(device)
        dtype = model.model.embed_tokens.weight.dtype
        self.tp = getattr(model, "tp_group", None)  # None: the whole model is here
        self.max_model_len = max_model_len or self.config.max_position_embeddings
        # (a model may name its own: the benchmarks' SleepModel takes the GPU kernels' inputs)
        self.backend = backend or getattr(model, "attention_backend", None) \
            or self._pick_backend(dtype)
        # this rank's KV heads (all of them without tensor parallelism)
        num_kv_heads = model.model.layers[0].self_attn.num_kv_heads
        shape = (num_blocks, block_size, num_kv_heads, self.config.head_dim)
        # per layer: (K, V), each [num_blocks, block_size, num_kv_heads, head_dim]
        self.kv_caches = [(kv_zeros(shape, dtype, self.device), kv_zeros(shape, dtype, self.device))
                          for _ in range(self.config.num_layers)]
        if hasattr(self.backend, "warm_up"):  # (a compiled backend compiles now, not mid-step)
            self.backend.warm_up(*self.kv_caches[0], model.model.layers[0].self_attn.num_heads,
                                 model.model.layers[0].self_attn.scale)
        from llmesh.services.executor.cpu_decode_step import CpuDecodeStep
        # small decode steps of a bfloat16 or float32 model on a CPU: one kernel call
        # (None: eager)
        self.cpu_decode = CpuDecodeStep.for_runner(model, self.kv_caches, block_size,
                                                   self.tp is not None, self.max_model_len)
        self.seqs: dict[str, SeqState] = {}
        self.batch = BatchState()  # the live sequences' step state, by slot
        self.threads = StepThreads(self.device, flops_per_token=2.0 * sum(
            m.in_features * m.out_features for m in model.modules()
            if isinstance(m, Projection)))
        self.tokenizer_dir = tokenizer_dir
        self._grammar_compiler = None  # made on the first request with a grammar
        self.test_corrupt_after_steps = test_corrupt_after_steps
        self._num_sampling_steps = 0
        # drawn with the KV memory: a scheduler that sees it change knows the blocks are new
        self.kv_epoch = secrets.randbits(63) or 1
        # one step at a time: a step whose stream was cancelled may still be running
        # in its thread when the next scheduler's first plan arrives
        self._step_lock = threading.Lock()
        self.staging = Staging(self.device)  # the step's inputs, one host-to-device copy
        self.graphs = None
        self._eager = False  # set inside `eager()`: graphs are not replayed
        if (cuda_graph_batch > 0 and self.device.type == "cuda" and self.tp is None
                and getattr(self.backend, "wants_block_tables", False)):
            from llmesh.services.executor.cuda_graphs import DecodeGraphs
            self.graphs = DecodeGraphs(model, self.kv_caches, self.backend, cuda_graph_batch,
                                       self.max_model_len, block_size, self.device)
            with torch.inference_mode():
                self.graphs.capture_all()

    @contextlib.contextmanager
    def eager(self):
        """Steps prepared inside run eagerly, graphs and the CPU decode kernel or not
        (benchmarks and tests compare; a step prepared before, for the kernel, still runs
        on it)."""
        with self._step_lock:
            self._eager = True
        try:
            yield self
        finally:
            with self._step_lock:
                self._eager = False

    def reset(self) -> None:
        """Forget every sequence (a new scheduler drives this rank), once any step
        still running has finished."""
        with self._step_lock:
            self.seqs.clear()
            self.batch = BatchState()

    def _pick_backend(self, dtype: torch.dtype):
        from llmesh.services.executor.attention_cuda import CudaPagedAttention, kernels_support
        c = self.config
        if self.device.type == "cuda" and kernels_support(
                dtype, c.head_dim, self.block_size, c.num_heads, c.num_kv_heads, c.sliding_window):
            return CudaPagedAttention(context_bound=self.max_model_len)
        from llmesh.services.executor.attention_cpu import CompiledCpuAttention, wants_compiled
        if wants_compiled(self.device, dtype, c.sliding_window):
            return CompiledCpuAttention()
        return TorchPagedAttention()

    @staticmethod
    def reference_backend():
        return TorchPagedAttention()

    @staticmethod
    def kv_bytes_per_block(config, block_size: int, dtype: torch.dtype,
                           num_kv_heads: int | None = None) -> int:
        """Bytes of K and V per block, all layers (`num_kv_heads`: this rank's)."""
        elem = torch.tensor([], dtype=dtype).element_size()
        heads = num_kv_heads or config.num_kv_heads
        return 2 * config.num_layers * block_size * heads * config.head_dim * elem

    def execute(self, plan: StepPlan) -> StepResult:
        return self.finish(self.prepare(plan))

    def prepare(self, plan: StepPlan) -> "_Prepared":
        """The plan's diffs applied and its inputs staged (on the device): everything
        of the step before its forward. `finish` must follow, before the next prepare."""
        with self._step_lock:
            return self._prepare(plan)

    def finish(self, prepared: "_Prepared") -> StepResult:
        """The step's forward and sampling; its result."""
        with self._step_lock:
            return self._finish(prepared)

    @torch.inference_mode()
    def _prepare(self, plan: StepPlan) -> "_Prepared":
        b = self.batch
        for seq_id in plan.finished_seq_ids:
            seq = self.seqs.pop(seq_id, None)
            if seq is not None:
                b.free(seq.slot)
        for new in plan.new:
            self._add(new)
        # (copy-on-write block copies: staged with the step's inputs, made before its forward)
        copies = self.staging.put(np.asarray(plan.block_copies, np.int64).reshape(-1, 2)) \
            if plan.block_copies else None
        result = StepResult(step_id=plan.step_id, num_kv_blocks=self.num_blocks,
                            kv_epoch=self.kv_epoch)
        if not plan.scheduled:
            self.staging.flush()
            self._copy_blocks(copies)
            return _Prepared(result)
        sched = plan.scheduled
        n = len(sched)
        seqs = [self.seqs[s.seq_id] for s in sched]
        slots = np.fromiter((q.slot for q in seqs), np.int64, n)
        counts = np.fromiter((s.num_new_tokens for s in sched), np.int64, n)
        # the plan's block diffs (a decode step: the few sequences that start a block)
        kept = np.fromiter((s.num_kept_blocks for s in sched), np.int64, n)
        grows = np.fromiter((bool(s.new_block_ids) for s in sched), bool, n)
        for i in np.flatnonzero(grows | (kept != b.num_blocks[slots])).tolist():
            b.set_blocks(int(slots[i]), int(kept[i]), sched[i].new_block_ids)
        # speculative decoding: drafts go in as tokens, to be verified once sampled
        spec = {s.seq_id: self._put_drafts(q, s.draft_token_ids)
                for s, q in zip(sched, seqs) if s.draft_token_ids}
        starts = b.num_computed[slots]
        single = counts == 1
        if not (single.all() and self.backend.wants_block_tables):
            # single-query sequences first, longest context first (the CPU backend
            # batches them in groups of similar length), then prefill chunks
            order = np.lexsort((-starts, ~single))
            slots, counts, starts, single = slots[order], counts[order], starts[order], \
                single[order]
            seqs = [seqs[i] for i in order.tolist()]
        ends = starts + counts
        num_tokens_now = b.num_tokens[slots]
        assert (ends <= num_tokens_now).all(), "a step past a sequence's tokens"
        b.num_computed[slots] = ends
        num_tokens = int(counts.sum())
        if single.all():  # (a decode step: each sequence's last token)
            ids = b.last_token[slots]
            for i in np.flatnonzero(starts != num_tokens_now - 1).tolist():
                ids[i] = seqs[i].token_ids[int(starts[i])]  # (a one-token prefill chunk)
        else:
            ids = np.fromiter(itertools.chain.from_iterable(
                q.token_ids[lo:hi] for q, lo, hi in zip(seqs, starts.tolist(), ends.tolist())),
                np.int64, num_tokens)
        timer = StepTimer(self.device)
        comm0 = self.tp.comm_s if self.tp else 0.0
        # (decided here: its metadata carries the block table the kernel reads)
        kernel = self.cpu_decode is not None and not self._eager and bool(single.all()) \
            and self.cpu_decode.takes(n)
        input_ids = self.staging.put(ids)
        samples = np.flatnonzero(ends == num_tokens_now)
        draws = self._draws(seqs, slots, samples, np.cumsum(counts) - 1, spec) \
            if samples.size else None
        # (the token ids, the metadata's arrays and the sampling inputs reach the
        # device in one copy, made by metadata_from_arrays)
        meta = metadata_from_arrays(starts, counts, b.table[slots], self.block_size,
                                    self.config.sliding_window, self.device,
                                    with_block_tables=self.backend.wants_block_tables or kernel,
                                    with_prefill_tables=getattr(self.backend,
                                                                "wants_prefill_tables", False),
                                    staging=self.staging)
        self._copy_blocks(copies)
        return _Prepared(result, input_ids, meta, num_tokens, draws, timer, comm0, kernel)

    @torch.inference_mode()
    def _finish(self, p: "_Prepared") -> StepResult:
        result = p.result
        if p.meta is None:  # (nothing scheduled: the plan only told what to forget)
            return result
        meta, timer = p.meta, p.timer
        timer.start()
        # (the sampler's LM head too: a small step's one thread fewer holds for it)
        with self.threads.step(p.num_tokens):
            head = self.model.compute_logits
            if self.graphs is not None and not self._eager \
                    and self.graphs.fits(meta, p.num_tokens):
                hidden = self.graphs.run(p.input_ids.tensor, meta)
            elif p.kernel:
                hidden = self.cpu_decode.run(p.input_ids.tensor, meta)
                head = self.cpu_decode.logits
            else:
                hidden = self.model(p.input_ids.tensor, meta.positions, self.kv_caches, meta,
                                    self.backend)
            timer.mark()
            if p.draws is not None:
                self._sample(hidden, p.draws, result, head)
        result.forward_s, result.sample_s = timer.finish()
        if self.tp:
            result.comm_s = self.tp.comm_s - p.comm0
        return result

    def _add(self, new: NewSequence) -> None:
        grammar = None
        if new.params.grammar is not None and (self.tp is None or self.tp.rank == 0):
            # (a recomputed sequence replays the output it has so far)
            grammar = self.grammars().sequence(new.params.grammar,
                                               new.token_ids[new.num_prompt_tokens:])
        slot = self.batch.add(new.token_ids, new.num_computed, new.block_ids, new.params,
                              new.index, new.params.grammar is not None)
        self.seqs[new.seq_id] = SeqState(
            seq_id=new.seq_id, token_ids=list(new.token_ids),
            num_prompt_tokens=new.num_prompt_tokens, params=new.params,
            index=new.index, slot=slot, grammar=grammar,
        )

    def grammars(self):
        """The grammar compiler for this model's vocabulary (xgrammar; made once)."""
        if self._grammar_compiler is None:
            from llmesh.services.executor.grammar import GrammarCompiler
            if self.tokenizer_dir is None:
                raise RuntimeError("structured output needs the model's tokenizer directory")
            self._grammar_compiler = GrammarCompiler(self.tokenizer_dir, self.config.vocab_size,
                                                     self.config.eos_token_ids)
        return self._grammar_compiler

    def _copy_blocks(self, copies: Staged | None) -> None:
        """Copy blocks (src, dst) in every layer's K and V cache."""
        if copies is None:
            return
        pairs = copies.tensor
        if self.device.type == "cuda":
            from llmesh.kernels import ops
            for k_cache, v_cache in self.kv_caches:
                ops.copy_blocks(k_cache, pairs)
                ops.copy_blocks(v_cache, pairs)
            return
        src, dst = pairs[:, 0], pairs[:, 1]
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    def _put_drafts(self, seq: SeqState, drafts: list[int]) -> int:
        """The drafts appended to the sequence's tokens for this step (`_keep` takes
        back those its samples do not confirm); how many."""
        seq.token_ids.extend(drafts)
        self.batch.num_tokens[seq.slot] = len(seq.token_ids)
        return len(drafts)

    def _draws(self, seqs: list[SeqState], slots: np.ndarray, samples: np.ndarray,
               last_rows: np.ndarray, spec: dict[str, int]) -> "_Draws":
        """The step's sampling rows (the sequences at `samples`, whose last token is
        row `last_rows[i]` of the batch), their inputs staged with the step's. Plain
        ones come straight from the batch arrays; a grammar, penalties, logprobs,
        n > 1 or drafts (`spec`: a row per draft too) among them take the per-row path."""
        b, samples_here = self.batch, self.tp is None or self.tp.rank == 0
        sample_slots = slots[samples]
        owners = [seqs[i] for i in samples.tolist()]
        if spec:
            rows = [(seq, row - back, back) for seq, row in zip(owners, last_rows[samples].tolist())
                    for back in range(spec.get(seq.seq_id, 0), -1, -1)]
            draws = self._sample_rows(rows)
            draws.spec = spec
            if draws.grammars is not None:
                _draft_grammars(draws)
            return draws
        row_hidden = self.staging.put(last_rows[samples])
        if b.plain[sample_slots].all():
            batch = SamplingBatch.plain(
                self.staging, b.temperature[sample_slots], b.top_k[sample_slots],
                b.top_p[sample_slots], b.min_p[sample_slots], b.seed[sample_slots],
                b.index[sample_slots], b.num_tokens[sample_slots]) if samples_here else None
            return _Draws([], owners, row_hidden, None, batch, sample_slots)
        return self._sample_rows([(seq, row, 0) for seq, row in
                                  zip(owners, last_rows[samples].tolist())])

    def _sample_rows(self, sample_seqs) -> "_Draws":
        """The step's sampling rows one by one, and their inputs staged with the step's:
        (sequence, its row in the batch, `back`: how many of its tokens come after
        that row's position; > 0 for a draft's row)."""
        rows, row_hidden, owners, grammars = [], [], [], []
        for seq, row, back in sample_seqs:
            # a sequence that still has to fork draws n tokens from the same logits
            is_unforked = seq.index == 0 and len(seq.token_ids) == seq.num_prompt_tokens
            fan_out = seq.params.n if is_unforked else 1
            position = len(seq.token_ids) - back
            for index in range(seq.index, seq.index + fan_out):
                rows.append(SampleRow(
                    params=seq.params, index=index, position=position,
                    token_ids=seq.token_ids[:position] if back else seq.token_ids,
                    num_prompt_tokens=seq.num_prompt_tokens,
                ))
                row_hidden.append(row)
                owners.append(seq)
                grammars.append(seq.grammar)  # (a fan-out's rows share the parent's state)
        samples_here = self.tp is None or self.tp.rank == 0
        return _Draws(rows, owners, self.staging.put(np.asarray(row_hidden, np.int64)),
                      grammars if any(g is not None for g in grammars) else None,
                      SamplingBatch(rows, self.staging) if samples_here else None)

    def _sample(self, hidden, draws: "_Draws", result: StepResult, head) -> None:
        """`head`: the LM head for these hidden states (the CPU kernel's for its steps)."""
        rows, grammars, num_rows = draws.rows, draws.grammars, len(draws.owners)
        logits = head(hidden[draws.row_hidden.tensor])
        if self.tp is None:
            tokens, logprobs = sample(logits, rows, grammars, draws.batch)
        else:  # rank 0 holds the full logits and samples; every rank appends its tokens
            tokens, logprobs = (sample(logits, rows, grammars, draws.batch) if self.tp.rank == 0
                                else (None, [None] * num_rows))
            tokens = self.tp.broadcast_tokens(tokens, num_rows, self.device)
        self._num_sampling_steps += 1
        if 0 < self.test_corrupt_after_steps < self._num_sampling_steps:
            tokens = [(t + 1) % self.config.vocab_size for t in tokens]
        if draws.slots is not None:  # plain rows: one token per sequence, no logprobs
            b = self.batch
            b.last_token[draws.slots] = tokens
            b.num_tokens[draws.slots] += 1
            for seq, token in zip(draws.owners, tokens):
                seq.token_ids.append(token)
            result.sampled = {seq.seq_id: [token] for seq, token in zip(draws.owners, tokens)}
            return
        for seq, token, lp in zip(draws.owners, tokens, logprobs):
            result.sampled.setdefault(seq.seq_id, []).append(token)
            if lp is not None:
                result.logprobs.setdefault(seq.seq_id, []).append(lp)
        for seq_id, toks in result.sampled.items():
            k = draws.spec.get(seq_id) if draws.spec else None
            if k:
                kept = self._keep(self.seqs[seq_id], k, toks)
                result.sampled[seq_id] = toks[:kept + 1]
                if seq_id in result.logprobs:
                    result.logprobs[seq_id] = result.logprobs[seq_id][:kept + 1]
            else:
                self._append(self.seqs[seq_id], toks)

    def _keep(self, seq: SeqState, k: int, samples: list[int]) -> int:
        """Verify a sequence's `k` drafts against its k + 1 samples (each the token
        plain decoding would take after the drafts before it): the drafts up to the
        first that differs from its sample stay, then that sample. Returns how many
        drafts stay; the sequence's tokens and KV count end after them."""
        first = len(seq.token_ids) - k
        drafts = seq.token_ids[first:]
        kept = 0
        while kept < k and samples[kept] == drafts[kept]:
            kept += 1
        del seq.token_ids[first + kept:]
        seq.token_ids.append(samples[kept])
        for token in samples[:kept + 1]:
            _advance(seq.grammar, token)
        b = self.batch
        b.num_tokens[seq.slot] = len(seq.token_ids)
        b.last_token[seq.slot] = samples[kept]
        b.num_computed[seq.slot] = first + kept  # (the step wrote k + 1 positions' KV)
        return kept

    def _append(self, seq: SeqState, tokens: list[int]) -> None:
        """Append the sampled token; a parent with n > 1 forks into n sequences here."""
        b = self.batch
        base_tokens = list(seq.token_ids) if len(tokens) > 1 else []
        # children's grammars fork from the parent's state before it takes its token
        forks = [seq.grammar.fork() if seq.grammar is not None else None for _ in tokens[1:]]
        seq.token_ids.append(tokens[0])
        b.last_token[seq.slot], b.num_tokens[seq.slot] = tokens[0], len(seq.token_ids)
        _advance(seq.grammar, tokens[0])
        for i, (token, grammar) in enumerate(zip(tokens[1:], forks), start=1):
            child_id = sequence_id(seq.seq_id, i)
            _advance(grammar, token)
            slot = b.copy(seq.slot, i)  # (its blocks and tokens computed: the parent's)
            b.last_token[slot], b.num_tokens[slot] = token, len(base_tokens) + 1
            self.seqs[child_id] = SeqState(
                seq_id=child_id, token_ids=base_tokens + [token],
                num_prompt_tokens=seq.num_prompt_tokens, params=seq.params,
                index=i, slot=slot, grammar=grammar,
            )


def _draft_grammars(draws: "_Draws") -> None:
    """Structured output with drafts: the row after draft j is masked by the grammar
    as it stands after drafts 1..j (forks of the sequence's matcher). From the first
    draft the grammar refuses on, nothing can be kept, and those rows stay as they are."""
    i = 0
    while i < len(draws.owners):
        seq = draws.owners[i]
        k = draws.spec.get(seq.seq_id, 0)
        state = seq.grammar
        if k and state is not None:
            for j, draft in enumerate(seq.token_ids[len(seq.token_ids) - k:], start=1):
                state = state.fork()
                if not state.accept(draft):
                    break
                draws.grammars[i + j] = state
        i += k + 1


def _advance(grammar, token: int) -> None:
    """The grammar takes the sampled token (its mask allowed only valid ones)."""
    if grammar is not None and not grammar.accept(token):
        log.warning("structured output: the grammar rejected sampled token %d", token)


@dataclass
class _Prepared:
    """A step between `prepare` and `finish` (`meta` None: nothing to compute)."""

    result: StepResult
    input_ids: Staged | None = None
    meta: object = None
    num_tokens: int = 0
    draws: "_Draws | None" = None
    timer: "StepTimer | None" = None
    comm0: float = 0.0
    kernel: bool = False  # a decode step the CPU decode kernel runs


@dataclass
class _Draws:
    """A step's sampling rows (a parent that forks has n), prepared before its forward."""

    rows: list[SampleRow]  # ([] for plain rows, read from the batch arrays)
    owners: list[SeqState]  # the sequence each row's token goes to
    row_hidden: Staged  # each row's hidden state in the step's batch
    grammars: list | None
    batch: SamplingBatch | None  # None on a rank that does not sample
    slots: np.ndarray | None = None  # plain rows: each owner's batch slot
    spec: dict[str, int] | None = None  # drafts to verify, per sequence
