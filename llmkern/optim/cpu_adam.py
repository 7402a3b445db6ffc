"""CPUAdam: the AdamW step of ZeRO-Offload. fp32 master weights, moments and gradients live in CPU
memory; the step runs in the C++ kernel (OpenMP, AVX-512/AVX2 via -march=native, see `llmkern
info`) and can write a bf16/fp16 copy of every updated parameter into a (pinned) buffer in the same
pass, ready for a non_blocking upload to the GPU.
"""
from __future__ import annotations

import torch

from llmkern.ops.fused_adamw import StateRounding
from llmkern.optim.adamw import FusedAdamW


class CPUAdam(FusedAdamW):
    """FusedAdamW restricted to CPU fp32 parameters, on the C++ kernel.

    copy_dtype: None, torch.bfloat16 or torch.float16: after each clean step, model_copy(p) holds
        the updated p in that dtype (written by the kernel, not by a second pass).
    pin_memory: pin the copy buffers (page-locked, for async H2D). None pins when CUDA is usable;
        pinning needs a CUDA driver.
    adamw_mode: True for AdamW (decoupled decay), False for Adam with L2 decay.
    state_dtype, state_rounding, rounding_seed: as FusedAdamW (bf16 moments, rounded to nearest or
        stochastically; the C++ kernel draws the same bits as every other backend).
    """

    _PICKLED = FusedAdamW._PICKLED + ("copy_dtype", "pin_memory", "_copies")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, adamw_mode: bool = True,
                 copy_dtype: torch.dtype | None = None, pin_memory: bool | None = None,
                 state_dtype: torch.dtype = torch.float32, state_rounding: StateRounding = "nearest",
                 rounding_seed: int = 0, backend="cpu"):
        if copy_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"copy_dtype must be None, torch.bfloat16 or torch.float16, got {copy_dtype}")
        # set before the groups are added: add_param_group allocates each parameter's copy
        self.copy_dtype = copy_dtype
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._copies: dict[torch.Tensor, torch.Tensor] = {}
        self._init_adam(params, lr, betas, eps, weight_decay, decoupled_weight_decay=adamw_mode, amsgrad=False,
                        master_weights=False, state_dtype=state_dtype, state_rounding=state_rounding,
                        rounding_seed=rounding_seed, backend=backend)

    def _check_param(self, p: torch.Tensor) -> None:
        if p.device.type != "cpu" or p.dtype != torch.float32:
            raise ValueError(f"CPUAdam needs CPU float32 parameters (the fp32 masters), got {p.dtype} on {p.device}")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if self.copy_dtype is not None:
            for p in self.param_groups[-1]["params"]:
                self._copies[p] = torch.empty(p.shape, dtype=self.copy_dtype, pin_memory=self.pin_memory)
                self._copies[p].copy_(p.detach())

    def model_copy(self, p: torch.Tensor) -> torch.Tensor:
        """The copy_dtype buffer of parameter p."""
        if self.copy_dtype is None:
            raise RuntimeError("CPUAdam was built without copy_dtype; there are no model copies")
        return self._copies[p]

    def _model_copies(self, params: list[torch.Tensor], has_master: bool) -> list[torch.Tensor]:
        return [self._copies[p] for p in params] if self._copies else []
