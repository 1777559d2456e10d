"""`variant/<name>/<dtype>`: every registered variant at small sizes, forward and backward on the
device in one dtype, against a float64 CPU run of the same weights and inputs (rounded to that dtype);
a variant that cannot run in float64 on the CPU is checked against its nearest registered ancestor."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

import variants
from harness.measurement import DTYPES
from harness.selfcheck.framework import Context, Outcome, Skip, first_line
from harness.selfcheck.references import BASE_SEED, TOLERANCES, judge, tensor_errors, widened
from harness.store.schema import CAUSAL, D_FF, D_MODEL, FFN_CHUNKS, MAX_SEQ_LEN, N_HEADS, N_LAYERS, VOCAB_SIZE
from variants.registry import VariantUnavailable

VARIANT_BATCH, VARIANT_SEQ_LEN = 2, 32
# Small settings given to whichever variant has the field. With bucket_size = seq_len / 2 and one
# hash round an LSH layer has two chunks that see each other, so its output does not depend on its
# (device-drawn) rotations and a CPU reference can reproduce it; `lsh/*` checks the hashing itself.
SMALL_SETTINGS: dict[str, Any] = {
    D_MODEL: 32,
    N_HEADS: 2,
    D_FF: 64,
    N_LAYERS: 2,
    VOCAB_SIZE: 61,
    MAX_SEQ_LEN: 64,
    "bucket_size": VARIANT_SEQ_LEN // 2,
    "n_hashes": 1,
    "n_chunks": 2,
    FFN_CHUNKS: 2,
}


class ProbeLayer(nn.Module):
    """Linear(tanh(x)): a deterministic f or g for the residual variants, [B, L, d] -> [B, L, d]. It ends
    in a Linear, which (like the real layers) does not keep its own output for the backward."""

    def __init__(self, d_model: int):
        super().__init__()
        self.linear = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.tanh(x))

    def flops(self, batch: int, seq_len: int) -> int:
        return 2 * batch * seq_len * self.linear.in_features * self.linear.out_features


def small_settings(name: str, causal: bool | None) -> dict[str, Any]:
    """The SMALL_SETTINGS that variant `name` takes, with `causal` where it has that field."""
    fields = variants.spec(name).parameters()
    settings = {k: v for k, v in SMALL_SETTINGS.items() if k in fields}
    if causal is not None and CAUSAL in fields:
        settings[CAUSAL] = causal
    return settings


def takes_settings(name: str, causal: bool | None) -> bool:
    """Whether variant `name`'s config accepts `small_settings(name, causal)` (linformer has no causal form)."""
    try:
        variants.make_config(name, **small_settings(name, causal))
    except (ValueError, TypeError):
        return False
    return True


def build_small(name: str, causal: bool | None) -> nn.Module:
    """Variant `name` at small sizes in float64 on the CPU, seeded (residual stacks get two ProbeLayer pairs)."""
    torch.manual_seed(BASE_SEED)
    variant = variants.spec(name)
    settings = small_settings(name, causal)
    if variant.kind == "residual":  # not a column: the variant kind
        layers = [(ProbeLayer(SMALL_SETTINGS[D_MODEL]), ProbeLayer(SMALL_SETTINGS[D_MODEL])) for _ in range(2)]
        module = variant.module_cls(variants.make_config(name, **settings), layers)
    else:
        module = variants.build(name, **settings)
    return module.to(torch.float64)


def variant_inputs(kind: str, module: nn.Module) -> torch.Tensor:
    """float64 inputs of a small module: tokens [B, L] for a model, else activations [B, L, d_model]."""
    generator = torch.Generator().manual_seed(BASE_SEED + 1)
    if kind == "model":
        return torch.randint(0, SMALL_SETTINGS[VOCAB_SIZE], (VARIANT_BATCH, VARIANT_SEQ_LEN), generator=generator)
    return torch.randn(VARIANT_BATCH, VARIANT_SEQ_LEN, SMALL_SETTINGS[D_MODEL], generator=generator, dtype=torch.float64)


def forward_backward(module: nn.Module, inputs: torch.Tensor, probe_seed: int = BASE_SEED + 2) -> dict[str, torch.Tensor | None]:
    """Output and gradients of sum(module(inputs) * probe) (probe: fixed random, like the workloads):
    {"output": ..., "input": d/d inputs (float inputs only), "<parameter name>": its gradient}."""
    module.train()
    torch.manual_seed(BASE_SEED)  # randomness inside the layer (dropout is 0; unseeded rotations) drawn alike
    inputs = inputs.detach().requires_grad_(inputs.is_floating_point())
    output = module(inputs)
    probe = torch.randn(output.shape, generator=torch.Generator().manual_seed(probe_seed), dtype=torch.float64)
    (output * probe.to(output.device, output.dtype)).sum().backward()
    run = {"output": output.detach(), "input": inputs.grad if inputs.is_floating_point() else None}
    run.update({name: p.grad for name, p in module.named_parameters()})
    return run


def on_device(master: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A copy of the float64 master in `dtype` on `device`."""
    return copy.deepcopy(master).to(device=device, dtype=dtype)


def rounded_reference(master: nn.Module, dtype: torch.dtype, module_cls: type[nn.Module] | None = None) -> nn.Module:
    """A float64 CPU copy of the master whose parameters are exactly the device copy's (rounded to `dtype`);
    `module_cls` rebuilds it as that (registered ancestor) class with the same config and state."""
    if module_cls is None:
        reference = copy.deepcopy(master)
    else:
        reference = module_cls(master.config).to(torch.float64)
        reference.load_state_dict(master.state_dict())
    with torch.no_grad():
        for parameter in reference.parameters():  # buffers (constants such as mask values) stay as they are
            parameter.copy_(widened(parameter, dtype))
    return reference


def registered_ancestors(name: str) -> list[tuple[str, type[nn.Module]]]:
    """(name, class) of the registered variants that variant `name`'s class derives from, nearest first
    (e.g. a variant that forces one kernel of another): its reference where it cannot run in float64 on CPU."""
    by_class = {variants.spec(other).module_cls: other for other in variants.available()}
    own = variants.spec(name).module_cls
    return [(by_class[cls], cls) for cls in own.__mro__[1:] if cls in by_class]


def reference_run(name: str, master: nn.Module, inputs: torch.Tensor, dtype: torch.dtype) -> tuple[dict, str]:
    """The float64 CPU run of the master with rounded weights and inputs, and which variant computed it."""
    reference_inputs = widened(inputs, dtype) if inputs.is_floating_point() else inputs
    try:
        return forward_backward(rounded_reference(master, dtype), reference_inputs), name
    except VariantUnavailable:
        for ancestor, cls in registered_ancestors(name):
            try:
                return forward_backward(rounded_reference(master, dtype, cls), reference_inputs), ancestor
            except VariantUnavailable:
                continue
        raise Skip(f"no float64 CPU reference: {name} cannot run there and derives from no registered variant that can") from None


def check_variant(name: str, dtype_name: str, context: Context) -> Outcome:
    """Forward + backward of variant `name` on the device in `dtype_name` against its float64 CPU reference."""
    variant = variants.spec(name)
    if variant.kind not in ("attention", "feedforward", "residual", "model"):  # not a column: variant kinds
        raise Skip(f"kind {variant.kind!r}: no recipe to build and feed it")
    dtype = DTYPES[dtype_name]
    causal_settings = tuple(c for c in ((False, True) if CAUSAL in variant.parameters() else (None,)) if takes_settings(name, c))
    if not causal_settings:
        raise Skip("its config rejects the small settings in both masking modes")
    errors: dict[str, float] = {}
    references = set()
    for causal in causal_settings:
        try:
            master = build_small(name, causal)
            inputs = variant_inputs(variant.kind, master)
            device_inputs = inputs.to(context.device, dtype) if inputs.is_floating_point() else inputs.to(context.device)
            device_run = forward_backward(on_device(master, context.device, dtype), device_inputs)
        except VariantUnavailable as error:
            raise Skip(f"variant unavailable here: {first_line(error)}") from None
        reference, reference_name = reference_run(name, master, inputs, dtype)
        references.add(reference_name)
        suffix = "" if causal is None else ("/causal" if causal else "/bidirectional")
        errors.update({f"{key}{suffix}": value for key, value in tensor_errors(device_run, reference).items()})
    outcome = judge(errors, TOLERANCES[dtype_name])
    outcome.data["reference"] = sorted(references)
    if references != {name}:
        outcome.detail += f"; reference: {', '.join(sorted(references))} (float64, cpu)"
    return outcome
