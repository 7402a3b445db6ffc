"""Megatron-style tensor parallelism: layers, the conjugate autograd collectives, vocab-parallel
cross-entropy, LoRA on tp layers, and apply_tensor_parallel for transformers Llama and GPT-2.

    layout.py         ShardLayout: one dimension split over tp ranks, padded to equal blocks
    regions.py        TPComm; copy_to_region / reduce_from_region / gather / scatter (+ sequence versions)
    layers.py         ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, gather_full
    cross_entropy.py  vocab_parallel_cross_entropy (never gathers the (T, V) logits)
    lora.py           ColumnParallelLoRALinear, RowParallelLoRALinear (llmkern.nn.LoRALinear on tp shards)
    apply.py          apply_tensor_parallel(model, mesh_or_group, sequence_parallel, loss_parallel) -> report
    checkpoint.py     save_checkpoint / load_checkpoint of a parallelize run (tp x ZeRO), reshardable
"""
from llmkern.parallel.tensor_parallel.apply import (
    SUPPORTED,
    TensorParallelReport,
    VocabParallelCausalLMLoss,
    apply_tensor_parallel,
)
from llmkern.parallel.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from llmkern.parallel.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    gather_full,
)
from llmkern.parallel.tensor_parallel.layout import TP_LAYOUT, ShardLayout
from llmkern.parallel.tensor_parallel.lora import ColumnParallelLoRALinear, RowParallelLoRALinear
from llmkern.parallel.tensor_parallel.regions import (
    TPComm,
    copy_to_region,
    gather_from_region,
    gather_from_sequence,
    reduce_from_region,
    reduce_scatter_to_sequence,
    scatter_to_region,
)

__all__ = [
    "SUPPORTED", "TP_LAYOUT", "ColumnParallelLinear", "ColumnParallelLoRALinear", "RowParallelLinear",
    "RowParallelLoRALinear", "ShardLayout", "TPComm", "TensorParallelReport", "VocabParallelCausalLMLoss",
    "VocabParallelEmbedding", "apply_tensor_parallel", "copy_to_region", "gather_from_region",
    "gather_from_sequence", "gather_full", "reduce_from_region", "reduce_scatter_to_sequence", "scatter_to_region",
    "vocab_parallel_cross_entropy",
]
