"""Decode steps of a bfloat16 or float32 model on a CPU in one kernel call.

The eager forward of a decode step runs about 20 torch ops a layer; at a few
sequences on a small model that is most of a token's time (the bench model at
batch 1: 4.2 ms a forward on 2 threads, of which the projections' bytes take
about 1.5 at the machine's bandwidth). `kernels/cpu_decode.cpp` runs the whole
forward (embedding to final norm, K/V written to the paged cache) in one call
and one OpenMP region: 1.4-1.5 ms there. It reads its own copy of the
projections' and the LM head's weights, packed once at load (`pack_model`,
before oneDNN's reorder drops the plain weight): the bfloat16 weights take twice
their size. A float32 model's kernel reads the weights the eager forward reads
(row-major, no copy). Its steps' logits come from its own product over the head
(`logits`).

Used for decode-only steps of at most `max_rows_for(dtype)` sequences: 8 in
bfloat16 (above that the eager forward with oneDNN's prepacked projections is
as fast or faster on the bench box), 256 in float32 (the kernel took 0.55-0.67x
the eager forward's time at 8 to 256 rows on 2 threads, bench model and
SmolLM2, `benchmarks/results/cpu-decode/session10/probes.log`), on a CPU with AVX512-BF16 and a C++ compiler, for Llama-family
models without per-head norms or a sliding window, without tensor parallelism
(the runner gives its steps a block table whatever the attention backend).
`engine.cpu_decode_kernel: false` in mesh.yaml (`load_model(...,
cpu_decode_kernel=False)` in code) turns it off. The kernel and the eager
forward differ only in the order of float32 sums: in bfloat16 (activations
rounded where the eager forward rounds them) about one bfloat16 step in a
hidden state, so a sequence's tokens can differ from the eager forward's at
near-ties, as they do between any two bfloat16 kernels; in float32 a few float32
rounding steps (as between oneDNN's products at two batch sizes). With the
kernel off, the eager float32 forward is the exactness reference.
"""
from __future__ import annotations

import logging

import torch

from llmesh.kernels import cpu_decode
from llmesh.services.executor.attention import AttentionMetadata
from llmesh.services.executor.model import CausalLM
from llmesh.services.executor.model_config import ModelConfig
from llmesh.services.executor.projection import Projection

log = logging.getLogger("llmesh.executor")
MAX_ROWS = 8  # bfloat16
FLOAT32_MAX_ROWS = 256


def why_not(config: ModelConfig, device: torch.device | str, dtype: torch.dtype,
            tensor_parallel: bool = False) -> str | None:
    """Why a model loaded like this would not use the kernel (None: it would)."""
    if torch.device(device).type != "cpu" or dtype not in cpu_decode.DTYPES:
        return "not a bfloat16 or float32 model on a CPU"
    if tensor_parallel:
        return "tensor parallelism"
    if config.qk_norm or config.sliding_window is not None:
        return "per-head norms or a sliding window"
    try:
        cpu_decode.check_supported(_dims(config, 16))
    except ValueError as e:
        return str(e)
    return cpu_decode.unavailable()


def max_rows_for(dtype: torch.dtype) -> int:
    """The most sequences a decode step of a model in `dtype` runs through the kernel."""
    return FLOAT32_MAX_ROWS if dtype == torch.float32 else MAX_ROWS


def pack_model(model: CausalLM) -> None:
    """Give each decoder projection and the LM head its weight in the kernel's layout
    (`decode_rows`; once: a projection that has it keeps it; a float32 weight is its
    own layout, shared, not copied)."""
    for proj in [p for layer in model.model.layers for p in _projections(layer)] + [model.lm_head]:
        if proj.decode_rows is None:
            proj.decode_rows = cpu_decode.pack_rows(proj.weight)


def is_packed(model) -> bool:
    """Whether `pack_model` gave this model's decoder projections their kernel layout
    (a model of another kind, such as the benchmarks' SleepModel, has none)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return bool(layers) and all(
        isinstance(proj, Projection) and proj.decode_rows is not None
        for proj in [p for layer in layers for p in _projections(layer)]
        + [getattr(model, "lm_head", None)])


def _projections(layer) -> tuple:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    return (getattr(attn, "qkv_proj", None), getattr(attn, "o_proj", None),
            getattr(mlp, "gate_up_proj", None), getattr(mlp, "down_proj", None))


def _dims(config: ModelConfig, block_size: int) -> cpu_decode.ModelDims:
    return cpu_decode.ModelDims(config.hidden_size, config.intermediate_size, config.num_heads,
                                config.num_kv_heads, config.head_dim, config.num_layers,
                                block_size, config.rms_norm_eps)


class CpuDecodeStep:
    def __init__(self, model: CausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 block_size: int):
        layers = []
        for layer, (k_cache, v_cache) in zip(model.model.layers, kv_caches):
            attn, mlp = layer.self_attn, layer.mlp
            layers.append(cpu_decode.LayerWeights(
                layer.input_layernorm.weight, attn.qkv_proj.decode_rows, attn.qkv_proj.bias,
                attn.o_proj.decode_rows, layer.post_attention_layernorm.weight,
                mlp.gate_up_proj.decode_rows, mlp.down_proj.decode_rows, k_cache, v_cache))
        self.num_steps = 0  # steps it ran (tests, benchmarks)
        self.max_rows = max_rows_for(model.model.embed_tokens.weight.dtype)
        head = model.lm_head
        self.head, self.head_bias, self.vocab = head.decode_rows, head.bias, head.out_features
        self.kernel = cpu_decode.DecodeKernel(
            _dims(model.config, block_size), model.model.embed_tokens.weight,
            model.model.norm.weight, model.rope_cos, model.rope_sin, layers, self.max_rows)

    @classmethod
    def for_runner(cls, model: CausalLM, kv_caches, block_size: int, tensor_parallel: bool,
                   max_model_len: int) -> "CpuDecodeStep | None":
        """The kernel for a runner's model, if it was packed for it; else None (and the
        start-up log says why). The kernel reads RoPE rows unchecked: positions must
        stay below the table's length."""
        if not is_packed(model):
            return None
        why = ("tensor parallelism" if tensor_parallel else None) or (
            None if max_model_len <= model.rope_cos.shape[0]
            else f"max_model_len {max_model_len} beyond the RoPE table's {model.rope_cos.shape[0]}")
        if why is None:
            try:
                step = cls(model, kv_caches, block_size)
            except (RuntimeError, ValueError) as e:  # (a failed build: eager, said once)
                why = str(e)[:300]
        log.info("decode steps of up to %d sequences: %s",
                 max_rows_for(model.model.embed_tokens.weight.dtype),
                 "one CPU kernel call" if why is None else f"eager ({why})")
        return step if why is None else None

    def takes(self, num_rows: int) -> bool:
        """Whether a decode-only step (one token per sequence) of this many sequences
        runs here (its metadata must then carry the block table)."""
        return 1 <= num_rows <= self.max_rows

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head over hidden states of a step it ran: [rows, vocab] float32, from
        its layout of the head (as the eager head, rounded to the model's dtype; on one
        thread it read SmolLM2's 56 MB bfloat16 head from memory at 41 GB/s, oneDNN's at
        34)."""
        return cpu_decode.product(self.head, self.head_bias, self.vocab, hidden,
                                  torch.get_num_threads())

    def run(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The step's hidden states after the final norm, [rows, hidden] in the model's
        dtype."""
        self.num_steps += 1
        return self.kernel.run(input_ids, meta.positions, meta.slot_mapping,
                               meta.single_block_tables, meta.single_context_lens,
                               torch.get_num_threads())
