"""apply_tensor_parallel: Megatron's layout on a live transformers Llama or GPT-2 model.

    report = apply_tensor_parallel(model, mesh)            # mesh["tp"], a group, or the axis name "tp"
    print(report)                                          # what was split, padded, replicated

Per decoder layer: the attention's q, k, v projections become column-parallel by heads (GPT-2's
fused c_attn: q|k|v each split by heads) and its output projection row-parallel; the MLP's up (and
gate) projections column-parallel, its down projection row-parallel. One region entry before the
attention and one before the MLP (a forward pre-hook: identity forward, all-reduce backward), one
exit in each row-parallel layer (all-reduce forward): 2 all-reduces forward and 2 backward per
layer. The token embedding becomes vocab-parallel, the LM head column-parallel over the same
vocabulary blocks (a tied head shares the embedding's shard). Norms, position embeddings and the
rotary tables stay replicated.

loss_parallel=True (default): the LM head's logits stay split, (B, T, V/tp) per rank, and the
model's loss_function is vocab_parallel_cross_entropy (2 small all-reduces, never the (T, V) logits
gathered). outputs.logits is then this rank's vocabulary block. False: the head gathers the logits
and HF's own loss runs on them.

sequence_parallel=True: between regions the hidden states are split along T: the first layer
takes this rank's T/tp tokens of the embedding output, each region entry all-gathers (backward:
reduce-scatter), each exit reduce-scatters (backward: all-gather), the norms run on T/tp tokens
(their weight gradients are partial per rank, summed over tp by a gradient hook), and the final
norm's output is all-gathered. T must be a multiple of tp.

Sizes tp does not divide: the vocabulary and the MLP width are padded to a multiple of tp with zero
rows/columns that stay exactly zero (layout.py); attention heads and KV heads cannot be padded, so
a tp that does not divide them is an error. The model may be a stage of a pipeline (any module
holding decoder layers): what it holds is converted, and under sequence parallelism its inputs and
outputs are sequence shards unless it holds the embedding (input) or the final norm (output).

Order with the other engines (llmkern.parallel's parallelize): tensor parallelism first, on the
whole model or a pipeline stage, then activation checkpointing, then DDP/ZeRO over dp. LoRA goes
before it: LoRALinear layers become ColumnParallelLoRALinear / RowParallelLoRALinear.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llmkern.nn.lora import LoRALinear
from llmkern.parallel import collectives, groups
from llmkern.parallel.tensor_parallel import regions
from llmkern.parallel.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from llmkern.parallel.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from llmkern.parallel.tensor_parallel.layout import TP_LAYOUT
from llmkern.parallel.tensor_parallel.lora import ColumnParallelLoRALinear, RowParallelLoRALinear
from llmkern.parallel.tensor_parallel.regions import TPComm

__all__ = ["SUPPORTED", "TensorParallelReport", "VocabParallelCausalLMLoss", "apply_tensor_parallel"]

SUPPORTED = ("llama", "gpt2")
_SUPPORTED_TEXT = ("transformers Llama (LlamaForCausalLM, LlamaModel or modules holding LlamaDecoderLayer) and "
                   "GPT-2 (GPT2LMHeadModel, GPT2Model or modules holding GPT2Block)")
_TP_TYPES = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, ColumnParallelLoRALinear,
             RowParallelLoRALinear)


@dataclasses.dataclass(kw_only=True, slots=True)
class TensorParallelReport:
    """What apply_tensor_parallel did to a model on this rank."""

    architecture: str
    """"llama" or "gpt2"."""
    tp: int
    """The tensor-parallel degree."""
    rank: int
    """This rank in the tp group."""
    sequence_parallel: bool
    """Whether activations between regions are split along the sequence."""
    loss_parallel: bool
    """Whether the logits stay split over the vocabulary and the loss is vocab-parallel."""
    layers: int
    """Decoder layers converted."""
    column_parallel: dict[str, str] = dataclasses.field(default_factory=dict)
    """Module path -> how its output rows are split."""
    row_parallel: dict[str, str] = dataclasses.field(default_factory=dict)
    """Module path -> how its input columns are split."""
    vocab_parallel: dict[str, str] = dataclasses.field(default_factory=dict)
    """Embedding / LM head path -> how the vocabulary is split."""
    padded: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    """Module path -> (dense size, padded size) of a dimension tp does not divide."""
    replicated: list[str] = dataclasses.field(default_factory=list)
    """Parameters every tp rank holds whole (norms, position embeddings, row-parallel biases, LoRA's
    replicated factors)."""
    lora: dict[str, str] = dataclasses.field(default_factory=dict)
    """LoRA module path -> the kernel its adapter product runs and the dropout mask it draws (every
    tp LoRA layer runs the fused lora_linear op; a row-parallel shard draws its columns of the
    single-device mask)."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """Everything else a user should know (tied weights, dropout in tp regions, the loss function)."""

    def __str__(self) -> str:
        lines = [f"tensor parallel: {self.architecture}, tp={self.tp} (rank {self.rank}), {self.layers} layers, "
                 f"sequence_parallel={self.sequence_parallel}, loss_parallel={self.loss_parallel}"]
        for title, rows in (("column-parallel", self.column_parallel), ("row-parallel", self.row_parallel),
                            ("vocab-parallel", self.vocab_parallel)):
            lines += [f"  {title:16s} {k}: {v}" for k, v in rows.items()]
        lines += [f"  padded           {k}: {a} -> {b}" for k, (a, b) in self.padded.items()]
        lines += [f"  lora             {k}: {v}" for k, v in self.lora.items()]
        lines.append(f"  replicated       {len(self.replicated)} parameters" +
                     (f" ({', '.join(self.replicated[:6])}{', ...' if len(self.replicated) > 6 else ''})"
                      if self.replicated else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class VocabParallelCausalLMLoss:
    """transformers' ForCausalLMLoss (shift, flatten, mean over counted tokens or sum /
    num_items_in_batch) on vocab-parallel logits: assigned to model.loss_function."""

    def __init__(self, group, vocab_size: int, comm: TPComm):
        self.group, self.vocab_size, self.comm = group, vocab_size, comm

    def __call__(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index: int = -100,
                 shift_labels=None, **kwargs):
        if shift_labels is None:
            labels = F.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:].contiguous()
        shift_labels = shift_labels.to(logits.device)
        logits = logits.float()  # as ForCausalLMLoss: the loss in fp32
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = vocab_parallel_cross_entropy(logits.reshape(-1, logits.shape[-1]), shift_labels.reshape(-1),
                                            self.group, vocab_size=self.vocab_size, ignore_index=ignore_index,
                                            reduction=reduction, comm=self.comm)
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss


# --- architectures ---------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Arch:
    name: str
    layer_type: type
    base_type: type
    embedding: str
    """Attribute of the base model holding the token embedding."""
    final_norm: str
    """Attribute of the base model holding the final norm."""


def _archs() -> list[_Arch]:
    found = []
    with contextlib.suppress(ImportError):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel

        found.append(_Arch("llama", LlamaDecoderLayer, LlamaModel, "embed_tokens", "norm"))
    with contextlib.suppress(ImportError):
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block, GPT2Model

        found.append(_Arch("gpt2", GPT2Block, GPT2Model, "wte", "ln_f"))
    return found


def _detect(model: nn.Module) -> tuple[_Arch, list[tuple[str, nn.Module]], tuple[str, nn.Module] | None]:
    """(architecture, [(path, decoder layer)], (path, base model) or None)."""
    hits = []
    for arch in _archs():
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, arch.layer_type)]
        bases = [(n, m) for n, m in model.named_modules() if isinstance(m, arch.base_type)]
        if layers or bases:
            hits.append((arch, layers, bases[0] if bases else None))
    if not hits:
        raise ValueError(f"apply_tensor_parallel: {type(model).__name__} is not a supported architecture (no decoder "
                         f"layer or base model of one found); supported: {_SUPPORTED_TEXT}")
    if len(hits) > 1:
        raise ValueError(f"apply_tensor_parallel: {type(model).__name__} mixes architectures "
                         f"{[h[0].name for h in hits]}; convert one model at a time")
    return hits[0]


def _resolve_tp_group(mesh_or_group) -> dist.ProcessGroup:
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(mesh_or_group, DeviceMesh) and mesh_or_group.ndim > 1:
        names = mesh_or_group.mesh_dim_names or ()
        if "tp" not in names:
            raise ValueError(f"apply_tensor_parallel: the {mesh_or_group.ndim}-D mesh has dimensions {names}, none "
                             f"named 'tp'; pass mesh['<your tp dimension>']")
        mesh_or_group = mesh_or_group["tp"]
    return groups.resolve(mesh_or_group)


class _Converter:
    """Replaces modules and records what it did (one instance per apply_tensor_parallel call)."""

    def __init__(self, model: nn.Module, pg: dist.ProcessGroup, comm: TPComm, report: TensorParallelReport):
        self.model, self.pg, self.report = model, pg, report
        self.checked = dataclasses.replace(comm, check=comm.check)
        self.quiet = dataclasses.replace(comm, check=False)
        self.first_collective_assigned = False

    def comm_for_first(self) -> TPComm:
        """The checked settings for the first module that communicates in forward, quiet after it."""
        if self.first_collective_assigned:
            return self.quiet
        self.first_collective_assigned = True
        return self.checked

    def _set(self, path: str, new: nn.Module) -> None:
        parent, _, leaf = path.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, leaf, new)

    def column(self, path: str, *, parts: tuple[int, ...] = (), gather_output: bool = False,
               input_is_parallel: bool = True, comm: TPComm | None = None) -> nn.Module:
        old = self.model.get_submodule(path)
        comm = comm or self.quiet
        kw = {"gather_output": gather_output, "input_is_parallel": input_is_parallel, "parts": parts, "comm": comm}
        if isinstance(old, LoRALinear):
            new = ColumnParallelLoRALinear.from_lora(old, self.pg, **kw)
            new.from_conv1d = getattr(old, "from_conv1d", False)
            self.report.lora[path] = new.kernel()
        else:
            new = ColumnParallelLinear.from_linear(_as_linear(old, path), self.pg, **kw)
        self._set(path, new)
        self.report.column_parallel[path] = new.layout.describe()
        if new.layout.padded != new.layout.size:
            self.report.padded[path] = (new.layout.size, new.layout.padded)
        return new

    def row(self, path: str, *, comm: TPComm | None = None, sequence_parallel: bool = False) -> nn.Module:
        old = self.model.get_submodule(path)
        comm = comm or self.quiet
        if isinstance(old, LoRALinear):
            new = RowParallelLoRALinear.from_lora(old, self.pg, sequence_parallel=sequence_parallel, comm=comm)
            new.from_conv1d = getattr(old, "from_conv1d", False)
            self.report.lora[path] = new.kernel()
        else:
            new = RowParallelLinear.from_linear(_as_linear(old, path), self.pg, input_is_parallel=True,
                                                sequence_parallel=sequence_parallel, comm=comm)
        self._set(path, new)
        self.report.row_parallel[path] = new.layout.describe()
        if new.layout.padded != new.layout.size:
            self.report.padded[path] = (new.layout.size, new.layout.padded)
        return new


def _as_linear(m: nn.Module, path: str) -> nn.Linear:
    """m as an nn.Linear (weight (C_out, C_in)): itself, or a transformers Conv1D (weight (C_in, C_out)) as
    a Linear holding the transposed weight."""
    if isinstance(m, nn.Linear):
        return m
    with contextlib.suppress(ImportError):
        from transformers.pytorch_utils import Conv1D

        if isinstance(m, Conv1D):
            lin = nn.Linear(m.nx, m.nf, bias=m.bias is not None, device="meta")
            lin.weight = nn.Parameter(m.weight.detach().t(), requires_grad=m.weight.requires_grad)
            lin.bias = m.bias
            return lin
    raise TypeError(f"apply_tensor_parallel: {path} is a {type(m).__name__}; expected an nn.Linear, a transformers "
                    f"Conv1D or an llmkern LoRALinear")


def _join(path: str, leaf: str) -> str:
    return f"{path}.{leaf}" if path else leaf


def _entry_hook(pg, comm: TPComm, sequence_parallel: bool):
    """A forward pre-hook that moves a module's hidden_states (first positional argument, or the
    keyword) into a tp region."""

    def enter(x):
        if sequence_parallel:
            return regions.gather_from_sequence(x, pg, 1, comm)
        return regions.copy_to_region(x, pg, comm)

    return _map_hidden_states(enter)


def _map_hidden_states(fn):
    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
        raise TypeError(f"tensor parallel: {type(module).__name__} was called without hidden states (first "
                        f"positional argument or hidden_states=)")

    return hook


def _grad_sum_hook(pg, comm: TPComm):
    """A tensor hook that sums a replicated parameter's per-rank partial gradient over tp (sequence
    parallelism: a norm's weight sees only the rank's T/tp tokens)."""

    def hook(g):
        return regions._all_reduce(g, pg, comm)

    return hook


def _llama_layer(conv: _Converter, path: str, layer: nn.Module, tp: int, sp: bool, first: bool) -> None:
    attn, mlp = layer.self_attn, layer.mlp
    for name in ("q_proj", "k_proj", "v_proj"):
        conv.column(_join(path, f"self_attn.{name}"))
    conv.row(_join(path, "self_attn.o_proj"), sequence_parallel=sp,
             comm=conv.comm_for_first() if first and not sp else None)
    for name in ("gate_proj", "up_proj"):
        conv.column(_join(path, f"mlp.{name}"))
    conv.row(_join(path, "mlp.down_proj"), sequence_parallel=sp)
    attn_comm = conv.comm_for_first() if first and sp else conv.quiet
    attn.register_forward_pre_hook(_entry_hook(conv.pg, attn_comm, sp), with_kwargs=True)
    mlp.register_forward_pre_hook(_entry_hook(conv.pg, conv.quiet, sp), with_kwargs=True)


def _gpt2_layer(conv: _Converter, path: str, layer: nn.Module, tp: int, sp: bool, first: bool) -> None:
    attn, mlp = layer.attn, layer.mlp
    c = attn.embed_dim
    conv.column(_join(path, "attn.c_attn"), parts=(c, c, c))
    conv.row(_join(path, "attn.c_proj"), sequence_parallel=sp, comm=conv.comm_for_first() if first and not sp else None)
    attn.split_size = c // tp
    attn.num_heads = attn.num_heads // tp
    conv.column(_join(path, "mlp.c_fc"))
    conv.row(_join(path, "mlp.c_proj"), sequence_parallel=sp)
    attn_comm = conv.comm_for_first() if first and sp else conv.quiet
    attn.register_forward_pre_hook(_entry_hook(conv.pg, attn_comm, sp), with_kwargs=True)
    mlp.register_forward_pre_hook(_entry_hook(conv.pg, conv.quiet, sp), with_kwargs=True)


def _heads(arch: _Arch, layer: nn.Module) -> dict[str, int]:
    if arch.name == "llama":
        cfg = layer.self_attn.config
        return {"attention heads": cfg.num_attention_heads, "key/value heads": cfg.num_key_value_heads}
    if hasattr(layer, "crossattention"):
        raise ValueError("apply_tensor_parallel: GPT-2 with cross-attention (add_cross_attention=True) is not "
                         "supported")
    return {"attention heads": layer.attn.num_heads}


def _norms(arch: _Arch, layer: nn.Module) -> list[nn.Module]:
    if arch.name == "llama":
        return [layer.input_layernorm, layer.post_attention_layernorm]
    return [layer.ln_1, layer.ln_2]


def _dropouts(model: nn.Module) -> tuple[list[str], list[str], list[str]]:
    """Paths of modules that drop out with p > 0: (inside tp regions: attention probabilities; LoRA
    layers; elsewhere: replicated activations)."""
    region, lora, other = [], [], []
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear):
            if m.dropout > 0:
                lora.append(n)
        elif isinstance(m, nn.Dropout):
            if m.p > 0:
                (region if n.endswith("attn_dropout") else other).append(n)
        elif isinstance(getattr(m, "attention_dropout", None), float) and m.attention_dropout > 0:
            region.append(n)
    return region, lora, other


def _listing(names: list[str]) -> str:
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def apply_tensor_parallel(model: nn.Module, mesh_or_group, *, sequence_parallel: bool = False,
                          loss_parallel: bool = True, comm: TPComm | None = None) -> TensorParallelReport:
    """Splits `model` (a transformers Llama or GPT-2, whole or a pipeline stage) over the tp group in
    place and returns what was done (see the module docstring).

    mesh_or_group: a DeviceMesh with a "tp" dimension, a 1-D mesh, a ProcessGroup or a registered axis
        name ("tp"). Every rank of the group calls this with the same model (same weights: each rank
        keeps its slices of them).
    comm: the collectives' backend, timeout and checks (TPComm()).
    A collective: the ranks agree on the architecture, the sizes and these settings first, and a
    difference raises ValueError on every rank before anything is changed.
    """
    comm = TPComm() if comm is None else comm
    if not isinstance(comm, TPComm):
        raise TypeError(f"apply_tensor_parallel: comm must be a TPComm, got {type(comm).__name__}")
    for flag, value in (("sequence_parallel", sequence_parallel), ("loss_parallel", loss_parallel)):
        if not isinstance(value, bool):
            raise TypeError(f"apply_tensor_parallel: {flag} must be a bool, got {value!r}")
    pg = _resolve_tp_group(mesh_or_group)
    tp, rank = dist.get_world_size(pg), dist.get_rank(pg)
    already = [n for n, m in model.named_modules() if isinstance(m, _TP_TYPES)]
    if already:
        raise ValueError(f"apply_tensor_parallel: the model is already tensor-parallel ({already[0]} is a "
                         f"{type(model.get_submodule(already[0])).__name__})")
    arch, layers, base = _detect(model)
    for path, layer in layers:
        for what, n in _heads(arch, layer).items():
            if n % tp:
                raise ValueError(f"apply_tensor_parallel: tp={tp} must divide the number of {what} ({n}) of "
                                 f"{path or type(layer).__name__}: heads are split whole, they cannot be padded")
    base_path, base_mod = base if base is not None else ("", None)
    embedding_path = _join(base_path, arch.embedding) if base_mod is not None else None
    norm_path = _join(base_path, arch.final_norm) if base_mod is not None else None
    head = model.get_submodule("lm_head") if hasattr(model, "lm_head") else None
    in_region, in_lora, elsewhere = _dropouts(model)
    dropout = in_region or in_lora or elsewhere

    # Every rank must convert the same model the same way; weights may differ only if the user means
    # it (each rank keeps its own slices), so the check is on structure and settings.
    fields = {"architecture": arch.name, "layers": [p for p, _ in layers],
              "parameters": [(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()],
              "sequence_parallel": sequence_parallel, "loss_parallel": loss_parallel,
              "comm": (comm.backend, comm.check, comm.timeout_s, str(comm.accumulate_dtype))}
    if dropout:
        # Replicated activations stay equal across tp ranks only if every rank draws the same dropout
        # masks: the ranks' generators must agree (seed every rank alike).
        fields["rng_state"] = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
    if dist.get_backend(pg) != "fake":
        # torch's fake process group (torch.testing._internal.distributed.fake_pg, for plans of layouts
        # too large to run) moves no data: there is nothing to compare
        collectives.agree(pg, "apply_tensor_parallel", timeout=comm.timeout_s,
                          describe=_describe_difference, **fields)

    report = TensorParallelReport(architecture=arch.name, tp=tp, rank=rank, sequence_parallel=sequence_parallel,
                                  loss_parallel=loss_parallel, layers=len(layers))
    conv = _Converter(model, pg, comm, report)
    with torch.random.fork_rng(devices=[]):
        _convert(model, conv, arch, layers, embedding_path, norm_path, head, tp, sequence_parallel, loss_parallel)
    sharded = {id(p) for m in model.modules() for p in m.parameters(recurse=False) if hasattr(p, TP_LAYOUT)}
    report.replicated = [n for n, p in model.named_parameters() if id(p) not in sharded]
    if in_region:
        report.notes.append(f"attention dropout inside tp regions ({_listing(in_region)}): each rank draws the masks "
                            f"of its own heads from the shared generator, not the single-device run's masks (the "
                            f"statistics are the same)")
    if sequence_parallel and elsewhere:
        report.notes.append(f"dropout on sequence shards ({_listing(elsewhere)}): each rank draws the mask of its "
                            f"own T/tp tokens from the shared generator, not the single-device run's masks")
    model._llmkern_tensor_parallel = report
    return report


def _describe_difference(rank: int, theirs: dict, first: dict) -> str:
    bad = [k for k in first if theirs.get(k) != first.get(k)]
    if "parameters" in bad:
        mine = dict((n, (s, d)) for n, s, d in first["parameters"])
        other = dict((n, (s, d)) for n, s, d in theirs["parameters"])
        diff = sorted(set(mine.items()) ^ set(other.items()))[:3]
        return f"rank {rank} has a different model than rank 0 (parameters differ: {diff})"
    if "rng_state" in bad and len(bad) == 1:
        return (f"rank {rank}'s torch generator differs from rank 0's, and the model has dropout: tp ranks must "
                f"draw equal masks on replicated activations (seed every rank with the same torch.manual_seed)")
    return f"rank {rank} differs from rank 0 in " + ", ".join(f"{k}={theirs.get(k)!r} (rank 0: {first.get(k)!r})"
                                                                for k in bad)


def _convert(model, conv: _Converter, arch: _Arch, layers, embedding_path, norm_path, head, tp: int, sp: bool,
             loss_parallel: bool) -> None:
    pg, report = conv.pg, conv.report
    emb_new = None
    if embedding_path is not None:
        old = model.get_submodule(embedding_path)
        tied = head is not None and getattr(head, "weight", None) is old.weight
        emb_new = VocabParallelEmbedding.from_embedding(old, pg, comm=conv.comm_for_first())
        conv._set(embedding_path, emb_new)
        report.vocab_parallel[embedding_path] = emb_new.layout.describe()
        if emb_new.layout.padded != emb_new.layout.size:
            report.padded[embedding_path] = (emb_new.layout.size, emb_new.layout.padded)
    else:
        tied = False
    layer_fn = _llama_layer if arch.name == "llama" else _gpt2_layer
    for i, (path, layer) in enumerate(layers):
        layer_fn(conv, path, layer, tp, sp, first=(i == 0 and emb_new is None))
        if sp:
            for norm in _norms(arch, layer):
                for p in norm.parameters():
                    if p.requires_grad:
                        p.register_hook(_grad_sum_hook(pg, conv.quiet))
    if sp and layers and emb_new is not None:
        # The embedding's output is replicated (the position ids and the attention mask are built from
        # its full length); the first layer keeps this rank's T/tp tokens of it.
        layers[0][1].register_forward_pre_hook(
            _map_hidden_states(lambda x: regions.scatter_to_region(x, pg, 1, conv.quiet)), with_kwargs=True)
    head_is_tp = head is not None and (isinstance(head, (nn.Linear, LoRALinear)))
    if sp and norm_path is not None:
        norm = model.get_submodule(norm_path)
        for p in norm.parameters():
            if p.requires_grad:
                p.register_hook(_grad_sum_hook(pg, conv.quiet))
        grad = "reduce_scatter" if head_is_tp else "split"
        norm.register_forward_hook(lambda m, a, out: regions.gather_from_sequence(out, pg, 1, conv.quiet, grad=grad))
    if head is not None:
        if not head_is_tp:
            raise TypeError(f"apply_tensor_parallel: lm_head is a {type(head).__name__}; expected an nn.Linear or a "
                            f"LoRALinear")
        if getattr(head, "bias", None) is not None:
            raise ValueError("apply_tensor_parallel: an LM head with a bias is not supported")
        new_head = conv.column("lm_head", gather_output=not loss_parallel, input_is_parallel=sp)
        report.column_parallel.pop("lm_head")
        report.vocab_parallel["lm_head"] = new_head.layout.describe()
        if tied:
            new_head.weight = emb_new.weight
            report.notes.append(f"lm_head.weight is tied to {embedding_path}.weight: one shard serves both")
        vocab = new_head.layout.size
        if loss_parallel:
            model.loss_function = VocabParallelCausalLMLoss(pg, vocab, conv.quiet)
            report.notes.append("outputs.logits are this rank's vocabulary block (B, T, ceil(V/tp)); the loss is "
                                "vocab_parallel_cross_entropy (labels as for the dense model)")
