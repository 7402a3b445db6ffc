"""`llmkern plan --layout`: the 3D layout of a Hugging Face config (tp x pp x dp, ZeRO over dp) planned
without a GPU or a cluster: per-rank bytes of each pipeline stage and the bytes each rank sends per
step, from the real tensor-parallel code run on the `meta` device with torch's fake process group.

    llmkern plan --layout --config path/to/config.json --tp 8 --pp 8 --dp 16 --zero-stage 1 \\
        --seq 4096 --micro-batch 1 --microbatches 16

How it is measured. apply_tensor_parallel converts meta models of the config with 1 and with 2
decoder layers on rank 0 of a fake world of tp * pp * dp ranks; their difference is one layer's
per-rank parameters and, over a forward and backward of one micro-batch (backward from the
vocab-split logits; the loss's per-token scalar all-reduces are left out), one layer's tp collectives (calls and bytes sent, counted by llmkern.parallel.collectives as
for a real run); the 1-layer model less one layer is the embedding, final norm and head and their
collectives. Stages hold the pipeline's uniform partition of the layers (llmkern.parallel.pipeline
partition="uniform"): the first stage adds the embedding, the last the norm and head (both, with
tied embeddings, hold a copy when pp > 1). Model states per rank are llmkern.parallel.estimate_memory
over dp for the stage's parameters (zero stage 0: plain data parallelism, whole AdamW state on every
rank; 16-bit weights keep fp32 masters). Communication per step: tp collectives of the stage's layers
for m micro-batches; dp: the gradient all-reduce (stage 0) or ZeRO's reduce-scatter and all-gathers;
pp: one (B, T, hidden) activation per micro-batch forward and its gradient backward per stage boundary.
With pp > 1 the pipeline schedule's timeline (llmkern plan --pipeline) follows, in unit costs.

Activation memory (Llama; llama_layer_activation_bytes) is the bytes one decoder layer keeps for its
backward per micro-batch on one rank, counted tensor by tensor as transformers' LlamaDecoderLayer
(sdpa attention: flash on GPUs and on the CPU, no (T, T) matrix) and llmkern's tp layers save them.
It is Megatron's per-layer accounting (Korthikanti et al., "Reducing Activation Recomputation in
Large Transformer Models": a GPT layer keeps s·b·h·(34 + 5·a·s/h) bytes in 16-bit, s·b·h·(10 + 24/t
+ 5·a·s/(h·t)) under tp, s·b·h/t·(34 + 5·a·s/h) with sequence parallelism, 2·s·b·h with full
recomputation) redone for Llama's layer: RMSNorm, rotary q/k, grouped key/value heads, SwiGLU, no
dropout, and flash attention's (B, heads, T) fp32 log-sum-exp instead of the 5·a·s/h softmax terms.
tests/parallel/test_tensor_parallel_plan.py checks it byte for byte against the tensors autograd
saves in a real layer. A stage's peak holds the schedule's in-flight micro-batches: 1F1B stage s
min(m, pp - s), GPipe m, without a pipeline 1.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys

import torch
import torch.distributed as dist

__all__ = ["LayoutPlan", "StagePlan", "format_layout_plan", "layout_plan", "llama_layer_activation_bytes", "main"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StagePlan:
    """One pipeline stage as one of its tp x dp ranks holds it."""

    layers: int
    """Decoder layers of the stage."""
    parameters: int
    """Parameters this rank holds (its tp slices, padding included, and the replicated ones)."""
    parameter_bytes: int
    """Model states per rank: weights at rest (ZeRO-3: this rank's dp shard)."""
    gradient_bytes: int
    """Gradients at rest between steps (ZeRO 2 and 3: the dp shard)."""
    optimizer_bytes: int
    """fp32 masters (16-bit weights) and AdamW moments (ZeRO: the dp shard)."""
    tp_calls: int
    """tp collectives per step (all m micro-batches, forward and backward)."""
    tp_bytes: int
    """Bytes this rank sends in them per step."""
    dp_bytes: int
    """Bytes this rank sends per step in the data-parallel gradient reduction and parameter gathers."""
    pp_bytes: int
    """Bytes this rank sends per step to its pipeline neighbours (activations and their gradients)."""
    in_flight: int
    """Micro-batches whose activations the stage holds at its peak (1F1B: min(m, pp - s); GPipe: m)."""
    activation_bytes: int | None
    """Peak activation bytes of the stage's decoder layers on this rank: in_flight x layers x the
    per-layer bytes without re-materialization (None: no formula for the architecture)."""
    activation_bytes_rematerialized: int | None
    """The same with every layer re-materialized (each keeps its input; the layer being recomputed adds
    one layer's activations of one micro-batch while its backward runs)."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LayoutPlan:
    """What `llmkern plan --layout` prints."""

    architecture: str
    """The model type of the config (llama, gpt2)."""
    dense_parameters: int
    """Parameters of the whole dense model."""
    tp: int
    """Tensor-parallel degree."""
    pp: int
    """Pipeline stages."""
    dp: int
    """Data-parallel replicas."""
    zero_stage: int
    """ZeRO stage over dp (0: plain data parallelism)."""
    tokens: tuple[int, int, int]
    """(micro-batch rows B, sequence length T, micro-batches m per step)."""
    stages: list[StagePlan]
    """The first, (a) middle and last stage (one entry when pp == 1, two when pp == 2)."""
    padded: dict[str, tuple[int, int]]
    """Dimensions tp does not divide: module -> (dense, padded) size."""
    per_layer_tp: tuple[int, int]
    """tp collectives (calls, bytes sent) of one layer per micro-batch, forward and backward."""
    per_layer_activations: tuple[int, int] | None
    """Bytes one decoder layer keeps for backward per micro-batch on one rank: (stored, re-materialized);
    None where no formula covers the architecture (only Llama has one)."""
    sequence_parallel: bool
    """Whether the activations between tp regions are split along the sequence."""


def llama_layer_activation_bytes(*, micro_batch: int, seq: int, hidden: int, heads: int, kv_heads: int, ffn: int,
                                 tp: int = 1, sequence_parallel: bool = False, element_size: int = 2,
                                 rematerialize: bool = False) -> int:
    """Bytes one Llama decoder layer keeps for its backward, per micro-batch (micro_batch x seq tokens) on
    one tp rank, weights in `element_size`-byte floats (see the module docstring). Term by term, with
    e = element_size, n = micro_batch * seq tokens, d = hidden / heads and F = ceil(ffn / tp) (the
    padded MLP width of a rank):

    - each RMSNorm (two): its input in fp32 (4·n·h: the upcast copy, or the input itself in fp32), the
      fp32 1/rms (4·n) and the normalized input cast back, which the weight's multiply keeps (e·n·h); the
      norms see n/tp tokens with sequence parallelism;
    - each norm's output, kept once by the projections that read it (q, k, v; gate, up): e·n·h, whole
      even with sequence parallelism (the column-parallel layers keep the all-gathered input);
    - attention: q and k after rotary and v (sdpa's inputs), its output (o_proj's input, a view) and
      its fp32 log-sum-exp: e·n·d·(2·heads + 2·kv_heads)/tp + 4·n·heads/tp;
    - SwiGLU: gate (SiLU's input), SiLU(gate) and up (the product's inputs) and the product (down_proj's
      input): 4·e·n·F.

    Residual adds, the row-parallel all-reduces and reduce-scatters keep nothing; the rotary cos/sin
    are the model's, shared by every layer. In 16-bit (e = 2) without sequence parallelism that is
    n·h·(16 + (4 + 4·kv_heads/heads)/tp + 8·F/h) + 8·n + 4·n·heads/tp bytes: where Megatron's GPT
    layer keeps 10 + 24/t per token and hidden unit, a Llama layer (F = 8h/3, kv_heads = heads/8) keeps
    16 + 26/t. rematerialize=True: the layer keeps its input only, e·n·h (n/tp tokens with sequence
    parallelism).
    """
    for name, v in (("micro_batch", micro_batch), ("seq", seq), ("hidden", hidden), ("heads", heads),
                    ("kv_heads", kv_heads), ("ffn", ffn), ("tp", tp), ("element_size", element_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"llama_layer_activation_bytes: {name} must be an int >= 1, got {v!r}")
    if heads % tp or kv_heads % tp or hidden % heads:
        raise ValueError(f"llama_layer_activation_bytes: tp={tp} must divide heads={heads} and kv_heads={kv_heads}, "
                         f"and heads must divide hidden={hidden}")
    e, n, h = element_size, micro_batch * seq, hidden
    n_norm = -(-n // tp) if sequence_parallel else n  # sequence parallelism: this rank's tokens
    if rematerialize:
        return e * n_norm * h
    d, f = h // heads, -(-ffn // tp)
    norms = 2 * (4 * n_norm * h + 4 * n_norm + e * n_norm * h)
    projection_inputs = 2 * e * n * h
    attention = e * n * d * (2 * heads + 2 * kv_heads) // tp + 4 * n * heads // tp
    mlp = 4 * e * n * f
    return norms + projection_inputs + attention + mlp


@contextlib.contextmanager
def _fake_world(world: int, tp: int):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("llmkern plan --layout runs on torch's fake process group and needs a process without a "
                           "default process group (torch.distributed is already initialized here)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield dist.new_group(ranks=list(range(tp)))  # rank 0's tp group: the adjacent ranks 0..tp-1
    finally:
        dist.destroy_process_group()


def _load_config(config):
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    return AutoConfig.from_pretrained(str(config))


def _meta_model(cfg, layers: int, dtype: torch.dtype):
    import copy

    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(cfg)
    for name in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, name):
            setattr(cfg, name, layers)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(dtype)


def _unique(module) -> list[torch.nn.Parameter]:
    return list({id(p): p for p in module.parameters()}.values())


def _count(fn) -> tuple[int, int]:
    """(calls, bytes sent) of the collectives `fn` runs."""
    from llmkern.parallel import counting

    with counting() as c:
        fn()
    snap = list(c.snapshot().values())
    return sum(v.calls for v in snap), sum(v.bytes_sent for v in snap)


def _converted(cfg, layers: int, group, tp: int, dtype, sequence_parallel: bool):
    from llmkern.parallel.tensor_parallel import TPComm, apply_tensor_parallel

    model = _meta_model(cfg, layers, dtype)
    report = None
    if tp > 1:
        report = apply_tensor_parallel(model, group, sequence_parallel=sequence_parallel, comm=TPComm(check=False))
    return model, report


def _step(model, ids):
    # backward from the (vocab-split) logits: the vocab-parallel loss's own all-reduces of per-token
    # scalars are left out (its meta run would need torch.nonzero's data-dependent size)
    def run():
        logits = model(input_ids=ids).logits
        logits.backward(torch.ones_like(logits))
    return run


def _embed_step(model, ids):
    def run():
        out = model.get_input_embeddings()(ids)
        out.backward(torch.ones_like(out))
    return run


def _kind(name: str) -> str:
    if ".layers." in name or ".h." in name:
        return "layer"
    if name.startswith("lm_head"):
        return "head"
    if name.startswith(("model.norm", "transformer.ln_f")):
        return "final"
    return "embed"


def _activations(cfg, tp: int, seq: int, micro_batch: int, sequence_parallel: bool, e: int) -> tuple[int, int] | None:
    """(stored, re-materialized) bytes per layer per micro-batch; None for an architecture without a formula."""
    if getattr(cfg, "model_type", None) != "llama":
        return None
    heads = cfg.num_attention_heads
    kw = {"micro_batch": micro_batch, "seq": seq, "hidden": cfg.hidden_size, "heads": heads,
          "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads, "ffn": cfg.intermediate_size, "tp": tp,
          "sequence_parallel": sequence_parallel, "element_size": e}
    return llama_layer_activation_bytes(**kw), llama_layer_activation_bytes(**kw, rematerialize=True)


def layout_plan(config, *, tp: int = 1, pp: int = 1, dp: int = 1, zero_stage: int = 0, seq: int = 4096,
                micro_batch: int = 1, microbatches: int | None = None, sequence_parallel: bool = False,
                dtype: torch.dtype = torch.bfloat16, schedule: str = "1f1b") -> LayoutPlan:
    """The plan of a transformers config (a PretrainedConfig, a directory or a config.json) at tp x pp x
    dp; see the module docstring. Raises what parallelize's check_degrees raises for a bad layout.
    schedule ("gpipe" or "1f1b") sets the micro-batches a stage holds at its activation peak."""
    from llmkern.parallel.memory import estimate_memory
    from llmkern.parallel.parallelize import ParallelizeConfig, check_degrees
    from llmkern.parallel.zero import ZeroConfig

    for name, v in (("tp", tp), ("pp", pp), ("dp", dp), ("seq", seq), ("micro_batch", micro_batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"layout_plan: {name} must be an int >= 1, got {v!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"layout_plan: zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if schedule not in ("gpipe", "1f1b"):
        raise ValueError(f"layout_plan: the activation peak is planned for the 'gpipe' and '1f1b' schedules, got "
                         f"{schedule!r}")
    m = microbatches if microbatches is not None else pp
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"layout_plan: microbatches must be an int >= 1, got {microbatches!r}")
    cfg = _load_config(config)
    total_layers = getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", None))
    full = _meta_model(cfg, 1, dtype)
    full.config.num_hidden_layers = total_layers  # check_degrees reads the counts from the config only
    check_degrees(ParallelizeConfig(tp=tp, pp=pp, dp=dp, sequence_parallel=sequence_parallel), tp * pp * dp, full)
    one_layer_dense = sum(p.numel() for p in _unique(_meta_model(cfg, 2, dtype))) - sum(p.numel() for p in _unique(full))
    dense = sum(p.numel() for p in _unique(full)) + (total_layers - 1) * one_layer_dense
    hidden = getattr(cfg, "hidden_size", getattr(cfg, "n_embd", None))
    with _fake_world(tp * pp * dp, tp) as group:
        ids = torch.zeros(micro_batch, seq, dtype=torch.long, device="meta")
        one, report = _converted(cfg, 1, group, tp, dtype, sequence_parallel)
        two, _ = _converted(cfg, 2, group, tp, dtype, sequence_parallel)
        c1, b1 = _count(_step(one, ids))
        c2, b2 = _count(_step(two, ids))
        ce, be = _count(_embed_step(one, ids))
    size = {"layer": 0, "head": 0, "final": 0, "embed": 0}
    for name, p in one.named_parameters():  # a tied head is the embedding's parameter: listed once
        size[_kind(name)] += p.numel()
    tied_head = one.get_output_embeddings().weight.numel() if not size["head"] else 0
    layer_calls, layer_bytes = c2 - c1, b2 - b1
    base, extra = divmod(total_layers, pp)
    counts = [base + (1 if s < extra else 0) for s in range(pp)]
    shown = sorted({0, pp // 2, pp - 1})
    e = torch.tensor([], dtype=dtype).element_size()
    act_bytes = micro_batch * seq * hidden * e
    per_layer_act = _activations(cfg, tp, seq, micro_batch, sequence_parallel, e)
    stages = []
    for s in shown:
        n, calls, sent = counts[s] * size["layer"], counts[s] * layer_calls, counts[s] * layer_bytes
        if s == 0:
            n, calls, sent = n + size["embed"], calls + ce, sent + be
        if s == pp - 1:  # the final norm, the head (a tied one a copy when the embedding is on another stage)
            n += size["final"] + size["head"] + (tied_head if pp > 1 else 0)
            calls, sent = calls + (c1 - layer_calls - ce), sent + (b1 - layer_bytes - be)
        if zero_stage:
            mem = estimate_memory(n, ZeroConfig(stage=zero_stage), dp, param_dtype=dtype)
            dp_sent = mem.communicated
        else:
            mem = estimate_memory(n, ZeroConfig(stage=1), 1, param_dtype=dtype)
            dp_sent = 2 * (dp - 1) * (-(-n // dp)) * e  # the ring all-reduce of the gradients
        neighbours = (s > 0) + (s < pp - 1)
        in_flight = 1 if pp == 1 else (m if schedule == "gpipe" else min(m, pp - s))
        stored = remat = None
        if per_layer_act is not None:
            stored = in_flight * counts[s] * per_layer_act[0]
            remat = in_flight * counts[s] * per_layer_act[1] + per_layer_act[0]  # + the layer being recomputed
        stages.append(StagePlan(layers=counts[s], parameters=n, parameter_bytes=mem.parameters,
                                gradient_bytes=mem.gradients, optimizer_bytes=mem.optimizer_states,
                                tp_calls=m * calls, tp_bytes=m * sent, dp_bytes=dp_sent,
                                pp_bytes=m * act_bytes * neighbours, in_flight=in_flight, activation_bytes=stored,
                                activation_bytes_rematerialized=remat))
    return LayoutPlan(architecture=str(getattr(cfg, "model_type", "?")), dense_parameters=dense, tp=tp, pp=pp, dp=dp,
                      zero_stage=zero_stage, tokens=(micro_batch, seq, m), stages=stages,
                      padded=dict(report.padded) if report is not None else {},
                      per_layer_tp=(layer_calls, layer_bytes), per_layer_activations=per_layer_act,
                      sequence_parallel=sequence_parallel)


def format_layout_plan(plan: LayoutPlan, schedule: str = "1f1b") -> str:
    """The text `llmkern plan --layout` prints; with pp > 1 the pipeline schedule's plan follows."""
    gib, mib = 2.0 ** 30, 2.0 ** 20
    B, T, m = plan.tokens
    zero = f"ZeRO-{plan.zero_stage}" if plan.zero_stage else "DDP"
    lines = [f"layout plan: {plan.architecture}, {plan.dense_parameters / 1e9:.3f} B parameters, tp{plan.tp} x "
             f"pp{plan.pp} x dp{plan.dp} ({plan.tp * plan.pp * plan.dp} ranks), {zero} over dp; "
             f"micro-batch {B} x {T} tokens, {m} micro-batches per step "
             f"(global batch {B * m * plan.dp} sequences)"]
    if plan.padded:
        lines.append("padded for tp: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in sorted(plan.padded.items())))
    names = {0: "first"} if plan.pp > 1 else {0: "every"}
    if plan.pp > 2:
        names[plan.pp // 2] = "middle"
    if plan.pp > 1:
        names[plan.pp - 1] = "last"
    header = (f"{'stage':>8} {'layers':>6} {'params/rank':>12} {'weights':>9} {'grads':>9} {'optim':>9} "
              f"{'total GiB':>9} | {'tp MiB/step':>11} {'(calls)':>8} {'dp MiB/step':>11} {'pp MiB/step':>11}")
    lines += ["", "per rank, model states in GiB (activations not included); bytes sent per step:", header]
    for (idx, label), st in zip(sorted(names.items()), plan.stages):
        total = st.parameter_bytes + st.gradient_bytes + st.optimizer_bytes
        lines.append(f"{label:>8} {st.layers:>6} {st.parameters / 1e9:>10.3f} B {st.parameter_bytes / gib:>9.2f} "
                     f"{st.gradient_bytes / gib:>9.2f} {st.optimizer_bytes / gib:>9.2f} {total / gib:>9.2f} | "
                     f"{st.tp_bytes / mib:>11.1f} {st.tp_calls:>8} {st.dp_bytes / mib:>11.1f} {st.pp_bytes / mib:>11.1f}")
    if plan.per_layer_activations is None:
        lines.append(f"activations: no formula for {plan.architecture} (llama_layer_activation_bytes covers Llama)")
    else:
        stored, remat = plan.per_layer_activations
        sp = ", sequence-parallel" if plan.sequence_parallel else ""
        lines += ["", f"activations per rank (decoder layers{sp}): {stored / mib:.1f} MiB per layer per micro-batch, "
                      f"{remat / mib:.1f} MiB re-materialized (the layer's input)",
                  f"{'stage':>8} {'in flight':>9} {'stored GiB':>10} {'re-materialized GiB':>19}"
                  + ("" if schedule in ("gpipe", "1f1b") or plan.pp == 1 else f"   (in flight: 1f1b's, not {schedule}'s)")]
        for (idx, label), st in zip(sorted(names.items()), plan.stages):
            lines.append(f"{label:>8} {st.in_flight:>9} {st.activation_bytes / gib:>10.2f} "
                         f"{st.activation_bytes_rematerialized / gib:>19.2f}")
    calls, sent = plan.per_layer_tp
    if plan.tp > 1:
        lines.append(f"tp per layer per micro-batch: {calls} collectives, {sent / mib:.1f} MiB sent per rank "
                     f"(forward and backward)")
    if plan.pp > 1:
        from llmkern.parallel.plan import pipeline_report

        v = 2 if schedule == "interleaved_1f1b" else 1
        lines += ["", pipeline_report(schedule, plan.pp, m, v)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`llmkern plan --layout --config DIR_OR_JSON --tp N --pp N --dp N [...]`."""
    from llmkern.parallel.pipeline import schedules as sch

    ap = argparse.ArgumentParser(prog="llmkern plan --layout", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="a Hugging Face config (a directory or config.json)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages")
    ap.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    ap.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=0, help="ZeRO over dp (0: DDP)")
    ap.add_argument("--seq", type=int, default=4096, help="tokens per sequence")
    ap.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    ap.add_argument("--microbatches", type=int, default=None, help="micro-batches per step (default: pp)")
    ap.add_argument("--schedule", choices=sch.SCHEDULES, default="1f1b", help="the pipeline schedule shown")
    ap.add_argument("--sequence-parallel", action="store_true", help="split activations along the sequence")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="weights' dtype")
    args = ap.parse_args(argv)
    try:
        plan = layout_plan(args.config, tp=args.tp, pp=args.pp, dp=args.dp, zero_stage=args.zero_stage, seq=args.seq,
                           micro_batch=args.micro_batch, microbatches=args.microbatches,
                           sequence_parallel=args.sequence_parallel, dtype=_DTYPES[args.dtype],
                           schedule="gpipe" if args.schedule == "gpipe" else "1f1b")
    except (ValueError, NotImplementedError, TypeError) as e:
        print(f"llmkern plan --layout: {e}", file=sys.stderr)
        return 2
    print(format_layout_plan(plan, args.schedule))
    return 0
