"""Turn a cell into the one call that gets measured, and count its FLOPs.

workload x mode:
- `attention`: one attention layer (projections included) on random [batch, seq_len, d_model];
- `block`: the residual stack of `n_layers` (norm + attention, norm + FFN) on random activations;
- `model`: a whole language model on random tokens, loss = bits per dim: ours (`reformer_lm`) or
  the model-kind variant the cell's model block names under `model_variant` (`build_model_variant`);
- `forward`: inference under `torch.no_grad()`;
- `forward_backward`: forward, then backward of a fixed random projection of the output
  (or of the loss for `model`);
- `train_step`: forward_backward plus an AdamW step.
In the training modes the gradients are allocated when the workload is built and zeroed in place
by each step, and AdamW's state is materialised then too (one step on zero gradients: its moments
stay 0), so parameters, gradients and optimizer state all persist between steps: a step's peak
above the state before it is its activations and temporaries (`activation_mem_mib`), and
`Workload.state_memory_mib` gives the other three parts exactly.
FLOPs count 2 per multiply-add; backward is counted as twice the forward (`step_flops`: less
what has no backward, LSH's hashing matmul). Bytes moved are the module's `bytes_moved`
(variants/traffic.py), plus AdamW's state in train_step (`step_bytes`).
The step is a `PhasedStep`: forward (the loss), then backward (and the optimizer step), timed apart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn

import variants
from harness.measurement import DTYPES, TIMER_SETTING, PhasedStep
from harness.store.schema import (
    ATTENTION_BACKEND,
    BACKWARD_BYTES,
    BACKWARD_FLOPS,
    BYTES,
    D_MODEL,
    DEFAULT_MODEL_VARIANT,
    FORWARD_BYTES,
    FORWARD_FLOPS,
    GRAD_MEM_MIB,
    MODEL_VARIANT,
    OPTIM_MEM_MIB,
    PARAM_MEM_MIB,
    VOCAB_SIZE,
)
from harness.units import MIB
from variants.model import ReformerLMConfig, build_layer_stack
from variants.traffic import adamw_step

BACKWARD_FLOPS_FACTOR = 2


def tensor_mib(tensors: Iterable[torch.Tensor]) -> float:
    """MiB held by `tensors`, each storage counted once (views and tied weights share one)."""
    storages: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values()) / MIB


@dataclass
class Workload:
    """The measured call of a cell (a `PhasedStep`: forward, then backward), and what one call does
    (tokens, analytic FLOPs); `optimizer` in mode train_step."""

    step: PhasedStep
    module: nn.Module
    tokens: int
    flops: int
    optimizer: torch.optim.Optimizer | None = None
    batch: int = 0
    seq_len: int = 0
    mode: str = "forward"
    element_size: int = 4

    def phase_columns(self) -> dict[str, int | None]:
        """`forward_flops`, `backward_flops` (`step_flops` apart) and `bytes`, `forward_bytes`,
        `backward_bytes` (`step_bytes`; None where the module declares no `bytes_moved`). Call it
        after a step: a variant's byte count may depend on the backend its forward ran."""
        forward = step_flops(self.module, self.batch, self.seq_len, "forward")
        traffic = step_bytes(self.module, self.batch, self.seq_len, self.element_size, self.mode, self.optimizer)
        return {
            FORWARD_FLOPS: forward,
            BACKWARD_FLOPS: self.flops - forward,
            BYTES: None if traffic is None else sum(traffic),
            FORWARD_BYTES: None if traffic is None else traffic[0],
            BACKWARD_BYTES: None if traffic is None else traffic[1],
        }

    def state_memory_mib(self) -> dict[str, float]:
        """What persists between steps, MiB: `param_mem_mib` (the module's parameters and buffers),
        `grad_mem_mib` (their gradients; 0 in mode forward) and `optim_mem_mib` (the optimizer's
        state tensors; 0 without an optimizer)."""
        params = list(self.module.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        state = [v for s in (self.optimizer.state.values() if self.optimizer else ()) for v in s.values() if torch.is_tensor(v)]
        return {
            PARAM_MEM_MIB: tensor_mib([*params, *self.module.buffers()]),
            GRAD_MEM_MIB: tensor_mib(grads),
            OPTIM_MEM_MIB: tensor_mib(state),
        }

    def attention_backends(self) -> dict[str, str]:
        """{ATTENTION_BACKEND: what ran} from the modules that set `attention_backend` in their
        last forward (several distinct ones joined by ' + '); {} when none does."""
        used = sorted({m.attention_backend for m in self.module.modules() if getattr(m, ATTENTION_BACKEND, None)})
        return {ATTENTION_BACKEND: " + ".join(used)} if used else {}


def model_variant_of(cell: Any) -> str:
    """Name of the model-kind variant a cell builds: cell.model[MODEL_VARIANT], default ours."""
    return str(cell.model.get(MODEL_VARIANT, DEFAULT_MODEL_VARIANT))


def build_model_variant(name: str, config: ReformerLMConfig) -> nn.Module:
    """Model-kind variant `name` built from `config` (a ReformerLMConfig or subclass; its field values
    are re-validated as `name`'s own config class). The module maps tokens [batch, seq_len] ->
    logits [batch, seq_len, vocab_size] and has loss_bpd and flops(batch, seq_len).
    ValueError for a name that is not a registered model; VariantUnavailable from peers that cannot run."""
    spec = variants.spec(name)
    if spec.kind != "model":
        raise ValueError(f"{MODEL_VARIANT} {name!r} is a {spec.kind} variant; model variants: {', '.join(variants.available('model'))}")
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(ReformerLMConfig)}
    return spec.module_cls(variants.make_config(name, **values))


def workload_model_config(cell: Any) -> ReformerLMConfig:
    """The ReformerLMConfig a benchmark cell's block or model workload builds: its model block (less
    `model_variant`) with the cell's attention variant, validated by the registry (`make_config`).
    A training cell's model: `harness.training.training_model_config`."""
    model = {k: v for k, v in cell.model.items() if k != MODEL_VARIANT}
    return variants.make_config(
        DEFAULT_MODEL_VARIANT,
        **model,
        attention=cell.variant,
        attention_params={cell.variant: dict(cell.variant_params)},
    )


def _build_module(cell: Any) -> nn.Module:
    if cell.workload == "attention":
        return variants.build(cell.variant, **cell.attention_params())
    config = workload_model_config(cell)
    if cell.workload == "block":
        if model_variant_of(cell) != DEFAULT_MODEL_VARIANT:
            raise ValueError(f"{MODEL_VARIANT} applies to workload 'model' only (the block workload is our layer stack)")
        return build_layer_stack(config)
    return build_model_variant(model_variant_of(cell), config)


def build_workload(cell: Any, device: torch.device, seed: int = 0) -> Workload:
    """Build the module and inputs of `cell` on `device`; return its measured step."""
    torch.manual_seed(seed)
    dtype = DTYPES[cell.dtype]
    module = _build_module(cell).to(device=device, dtype=dtype)
    batch, seq_len = cell.batch, cell.seq_len
    training = cell.mode != "forward"
    module.train(training)

    if cell.workload == "model":
        vocab = cell.model.get(VOCAB_SIZE, 256)
        tokens = torch.randint(0, vocab, (batch, seq_len), device=device)
        inputs: torch.Tensor = tokens

        def loss_of() -> torch.Tensor:
            return module.loss_bpd(tokens)
    else:
        inputs = torch.randn(batch, seq_len, module_width(cell), device=device, dtype=dtype)
        inputs.requires_grad_(training)
        probe = torch.randn_like(inputs) if training else None

        def loss_of() -> torch.Tensor:
            return (module(inputs) * probe).sum()

    optimizer = None
    if cell.mode == "forward":

        def forward() -> Any:
            with torch.no_grad():
                return module(inputs)

        step = PhasedStep(forward)
    elif cell.mode in ("forward_backward", "train_step"):
        for param in module.parameters():
            if param.requires_grad:
                param.grad = torch.zeros_like(param)
        if cell.mode == "train_step":
            # capturable: its step stays on the device, so the `graphs` timer can capture it (CUDA only)
            capturable = device.type == "cuda" and cell.measure.get(TIMER_SETTING) == "graphs"
            optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, capturable=capturable)
            optimizer.step()  # materialises AdamW's state on zero gradients (only weight decay moves the weights)
        trained = optimizer

        def forward() -> torch.Tensor:
            module.zero_grad(set_to_none=False)  # in place: gradients persist between steps, like the weights
            inputs.grad = None
            return loss_of()

        def backward(loss: torch.Tensor) -> None:
            loss.backward()
            if trained is not None:
                trained.step()

        step = PhasedStep(forward, backward)
    else:
        raise ValueError(f"unknown mode {cell.mode!r}")

    flops = step_flops(module, batch, seq_len, cell.mode)
    element_size = torch.empty((), dtype=dtype).element_size()
    return Workload(step, module, batch * seq_len, flops, optimizer, batch, seq_len, cell.mode, element_size)


def step_flops(module: nn.Module, batch: int, seq_len: int, mode: str) -> int:
    """Analytic FLOPs of one step on [batch, seq_len]: the forward's (`module.flops`), and with a
    backward BACKWARD_FLOPS_FACTOR times those of them that have one, i.e. less what submodules
    declare in `no_backward_flops` (LSH's hashing matmul: its argmax passes no gradient). Each
    module instance counts once, as in `flops`, where every layer is its own instance; a module that
    declares `no_backward_flops` must not contain another that does."""
    forward = int(module.flops(batch, seq_len))
    if mode == "forward":
        return forward
    no_backward = sum(int(m.no_backward_flops(batch, seq_len)) for m in module.modules() if hasattr(m, "no_backward_flops"))
    return forward + BACKWARD_FLOPS_FACTOR * (forward - no_backward)


def step_bytes(
    module: nn.Module, batch: int, seq_len: int, element_size: int, mode: str, optimizer: torch.optim.Optimizer | None = None
) -> tuple[int, int] | None:
    """Analytic (forward, backward) bytes read and written by one step on [batch, seq_len]: the
    module's `bytes_moved` (variants/traffic.py), backward 0 in mode forward, and with an optimizer
    one AdamW step over the trainable parameters (their state in their own dtype) in backward.
    None when the module declares no `bytes_moved` (a plugin variant)."""
    if not hasattr(module, "bytes_moved"):
        return None
    traffic = module.bytes_moved(batch, seq_len, element_size)
    if mode == "forward":
        return int(traffic.forward), 0
    backward = int(traffic.backward)
    if optimizer is not None:
        backward += sum(adamw_step(p.numel(), p.element_size()) for p in module.parameters() if p.requires_grad)
    return int(traffic.forward), backward


def module_width(cell: Any) -> int:
    """d_model of a cell (the variant's own override, else the model block's)."""
    return int(cell.attention_params().get(D_MODEL, cell.model.get(D_MODEL, 256)))
