"""What trace and probe observed: plain data that rules read. No torch here, so rules stay pure."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class ParamState:
    """One parameter: where it lives, what it is, and (after a probe) what gradient it got."""

    name: str
    # the module whose forward uses it: its owner, or for a parameter held in an nn.ParameterDict / ParameterList
    # (never called itself) the module that holds the container
    module: str
    numel: int
    dtype: str
    requires_grad: bool
    quantized: bool = False
    adapter: bool = False  # a PEFT adapter weight (lora_A / lora_B / ...)
    saved: bool | None = None  # kept by the adapter's save_pretrained; None when not a PEFT model
    embedding: bool = False  # an input embedding or the output head matrix
    intended: bool | None = None  # matches the user's `trainable` regex; None when no regex was given
    grad: str | None = None  # ok | none | zero | nonfinite, for trainable params after a probe
    grad_norm: float | None = None
    used: bool | None = None  # its module ran in the forward
    in_optimizer: bool | None = None
    # an inference tensor (made under torch.inference_mode): autograd can neither save it nor update it in place
    inference: bool = False


@dataclasses.dataclass
class ModuleState:
    """One module: parameter counts, hooks and checkpointing, and what its forward produced."""

    name: str
    cls: str
    depth: int
    trainable: int = 0
    frozen: int = 0
    quantized: int = 0
    dtypes: tuple[str, ...] = ()
    hooks: tuple[str, ...] = ()
    gc: str = "off"  # off | reentrant | non-reentrant (transformers' per-layer checkpointing)
    ran: bool | None = None
    calls: int = 0
    order: int | None = None  # index of its first finished call in the forward
    in_requires_grad: bool | None = None
    out_requires_grad: bool | None = None
    out_grad_fn: str | None = None
    out_finite: bool | None = None
    grad_enabled: bool | None = None  # autograd was on at its first call
    in_reentrant: bool = False  # first call ran inside a reentrant checkpoint's no-grad forward
    detached_output: bool = False  # grad on, inputs or params require grad, yet no floating output does
    # trainable params that ran and got no gradient because the autograd path from them ends in this module: they
    # reach its inputs (or sit inside it) but not its outputs. Filled by the probe only when such params exist.
    cut_params: list[str] = dataclasses.field(default_factory=list)
    # trainable params inside it that ran and got no gradient because none of its outputs reaches the loss: the
    # outermost such module (its output is computed, then not used). Filled by the probe only when such params exist.
    unused_params: list[str] = dataclasses.field(default_factory=list)
    grads: dict[str, int] = dataclasses.field(default_factory=dict)  # ok/none/zero/nonfinite counts (own params)
    grad_norm: float | None = None


@dataclasses.dataclass
class FlagFlip:
    """Trainable parameters whose requires_grad went off during the probe's step (gradflow.probing.backward)."""

    params: list[str]
    # before_forward | forward | loss: already off when the model's forward began (the loss function switched it),
    # first seen off after the model's forward, or only after the loss
    phase: str
    module: str | None = None  # the module during whose call (its hooks, or its forward) it went off, when known
    via: str | None = None  # forward hook | forward pre-hook | set_adapter | disable_adapter | None
    adapters_before: tuple[str, ...] = ()
    adapters_after: tuple[str, ...] = ()
    toggled: bool = False  # on again by the end of the loss: switched off and back during the step


@dataclasses.dataclass
class CheckpointCall:
    """One call into torch.utils.checkpoint seen during the forward."""

    reentrant: bool
    tensor_args: int
    grad_args: int  # tensor arguments that require grad
    depth: int  # 0 for an outermost region, 1+ when nested in another region
    location: str | None  # first module run inside the region, else the module that called checkpoint
    modules: list[str] = dataclasses.field(default_factory=list)  # modules run inside (first level)
    phase: str = "forward"  # forward | backward (recomputation)
    caller: str | None = None  # the module whose code called checkpoint (None at top level)


@dataclasses.dataclass
class LossState:
    value: float | None = None
    requires_grad: bool = False
    grad_fn: str | None = None
    error: str | None = None
    error_phase: str | None = None  # forward | loss | backward
    is_leaf: bool = False
    reaches_output: bool | None = None  # the loss's graph contains the model output


@dataclasses.dataclass
class LossTerm:
    """A term of the loss computed from the model's outputs without a gradient (gradflow.probing.loss_terms)."""

    op: str  # the call that added it: add, sub, stack, ...
    shape: list[int]
    how: str  # how it lost its gradient, in words ("under torch.no_grad() from the model output")
    computed_at: str | None = None  # file:line where it lost it, when the trace can tell
    added_at: str | None = None  # file:line of the addition


@dataclasses.dataclass
class GradDiff:
    """A trainable parameter whose gradient with checkpointing on differs from the one with it off."""

    name: str
    module: str
    kind: str  # differs | none-with-gc | none-without-gc | zero-with-gc | zero-without-gc
    rel_diff: float | None = None  # ||g_on - g_off|| / ||g_off||
    max_abs_diff: float | None = None


@dataclasses.dataclass
class GcEquivalence:
    """`--check-gc`: the same batch run with checkpointing on and off, gradients compared (gradflow.probing.gc_check)."""

    compared: bool
    mode: str | None = None  # the checkpointing compared with none: reentrant | non-reentrant | mixed
    enabled_for_check: bool = False  # the model had none; gradflow turned transformers' on for the comparison
    reason: str | None = None  # why nothing was compared (the model cannot checkpoint)
    error_with_gc: str | None = None  # an exception in the run with checkpointing
    error_without_gc: str | None = None
    params_compared: int = 0
    rtol: dict[str, float] = dataclasses.field(default_factory=dict)  # by gradient dtype
    atol: dict[str, float] = dataclasses.field(default_factory=dict)
    loss_with_gc: float | None = None
    loss_without_gc: float | None = None
    diffs: list[GradDiff] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ParamStep:
    """One intended-trainable parameter after `--steps K` optimizer steps (gradflow.probing.steps)."""

    name: str
    module: str
    changed: bool
    requires_grad: bool
    in_optimizer: bool
    has_state: bool | None  # the optimizer holds state for it after the steps; None: it keeps none at all (SGD)
    grad: str  # ok (a nonzero gradient at some step) | zero | none
    zero_lr: bool = False  # its param group's learning rate was 0 at every step


@dataclasses.dataclass
class StepsRun:
    """`--steps K`: K real optimizer steps on one batch, then parameters and optimizer state put back."""

    steps: int
    optimizer: str  # class name
    optimizer_source: str  # given | trainer | default (AdamW lr 1e-3 over the trainable parameters)
    scheduler: str | None = None
    lrs: list[list[float]] = dataclasses.field(default_factory=list)  # per step, per param group (as stepped)
    next_lrs: list[float] = dataclasses.field(default_factory=list)  # per group, what step K+1 would use
    zero_lr_groups: list[int] = dataclasses.field(default_factory=list)  # groups with trainable params, lr 0 throughout
    group_sizes: list[int] = dataclasses.field(default_factory=list)  # trainable params per group
    losses: list[float | None] = dataclasses.field(default_factory=list)
    error: str | None = None
    error_step: int | None = None  # the step (1-based) that raised
    error_phase: str | None = None  # forward | loss | backward | optimizer
    restored: bool = False
    params: list[ParamStep] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class LeakPair:
    """One sample whose loss has gradient w.r.t. another sample's input embeddings (packed batch)."""

    sample: int  # index of the sample whose loss was differentiated (in packing order, across rows)
    other: int  # index of the sample whose embeddings got gradient
    ratio: float  # max |grad| on the other sample's rows / max |grad| on its own rows


@dataclasses.dataclass
class PackedLeak:
    """A packed probe batch: does one sample's loss reach another sample's inputs? (gradflow.probing.leak)"""

    samples: int  # samples in the batch (segments of position_ids, over all rows)
    rows: int
    checked: int = 0  # samples whose loss was differentiated
    attn_implementation: str | None = None  # config._attn_implementation
    leaks: list[LeakPair] = dataclasses.field(default_factory=list)
    max_ratio: float = 0.0
    cache_created: bool | None = None  # the forward built a KV cache (use_cache on): masking_utils then skips packing
    attention_mask_given: bool = False  # the batch carries an attention_mask: masking_utils then skips packing
    causes: list[str] = dataclasses.field(default_factory=list)  # cache | attention-mask | implementation
    error: str | None = None  # the measurement could not run (e.g. an attention backward missing on this device)


@dataclasses.dataclass
class WrapperFact:
    """One FSDP unit (gradflow.setup.wrappers): the module it wraps and the original parameters it flattens or groups."""

    kind: str  # fsdp1 (FullyShardedDataParallel) | fsdp2 (fully_shard)
    module: str  # path of the wrapped module in the snapshot's names ("" for the root)
    params: list[str] = dataclasses.field(default_factory=list)  # original parameter names in this unit
    use_orig_params: bool | None = None  # FSDP1's option; None for FSDP2
    param_dtype: str | None = None  # the mixed-precision policy's param_dtype, None without one
    planned: bool = False  # computed from a wrap plan (gradflow.setup.wrappers.plan_fsdp1), not read from a wrapped model


@dataclasses.dataclass
class Snapshot:
    """Everything rules look at."""

    model_class: str
    params: list[ParamState]
    modules: list[ModuleState]
    is_peft: bool = False  # the model carries PEFT adapters, however they were added
    adapter_names: tuple[str, ...] = ()
    active_adapters: tuple[str, ...] = ()
    # how the adapters got there: "peft" (a PeftModel), "transformers" (load_adapter / add_adapter /
    # from_pretrained(adapter dir)) or "injected" (peft.inject_adapter_in_model); None without adapters
    adapter_source: str | None = None
    quantized: str = "none"
    kbit_prepared: bool | None = None
    input_grad_hook: bool = False
    inputs_embeds_given: bool = False
    gc_mode: str = "off"
    use_cache: bool | None = None
    legacy_cache_in_batch: bool = False
    trainable_regex: str | None = None
    optimizer_given: bool = False
    traced: bool = False
    probed: bool = False
    checkpoints: list[CheckpointCall] = dataclasses.field(default_factory=list)
    loss: LossState | None = None
    labels_all_masked: bool | None = None
    output_requires_grad: bool | None = None
    forward_nonfinite_at: str | None = None
    nonfinite_weights: list[str] = dataclasses.field(default_factory=list)  # its own params already NaN/Inf
    # DistributedDataParallel's find_unused_parameters and static_graph; None when not under DDP. Whoever builds the
    # snapshot for a setup that will be wrapped later (a Trainer's ddp_find_unused_parameters) may fill them in.
    ddp_find_unused: bool | None = None
    ddp_static_graph: bool | None = None
    # FSDP units found on the wrapped model (FSDP1 / fully_shard), or planned for one (gradflow.setup.wrappers)
    wrappers: list[WrapperFact] = dataclasses.field(default_factory=list)
    trainer: str | None = None  # the Trainer class whose prepared setup this is (gradflow.probe(trainer))
    # where autograd was off: modules called under torch.no_grad() / inference_mode (the outermost of each run),
    # and modules whose class's forward carries such a decorator (module -> "no_grad" | "inference_mode" | ...)
    no_grad_modules: list[str] = dataclasses.field(default_factory=list)
    # the traced module whose forward made each such call; None: a call from outside the model's forward (the loss
    # function, a Trainer's compute_loss)
    no_grad_callers: dict[str, str | None] = dataclasses.field(default_factory=dict)
    grad_off_forward: dict[str, str] = dataclasses.field(default_factory=dict)
    gc_equivalence: GcEquivalence | None = None  # filled by --check-gc (gradflow.probe(check_gc=True))
    steps: StepsRun | None = None  # filled by --steps K (gradflow.probe(steps=K))
    packed_leak: PackedLeak | None = None  # filled when the probe batch is packed (gradflow.probing.leak)
    flips: list[FlagFlip] = dataclasses.field(default_factory=list)  # requires_grad switched off during the step
    # terms added to the loss that were computed from model outputs without a gradient (gradflow.probing.loss_terms)
    loss_terms: list[LossTerm] = dataclasses.field(default_factory=list)
    # trainable parameters exactly zero at the step that got a nonzero gradient (a gate that starts at zero); read
    # by the probe only when some zero gradient is not one of lora_start_zeros (gradflow.probing.backward)
    zero_valued: list[str] = dataclasses.field(default_factory=list)
    # ops with a zero derivative (round, floor, ceil, trunc, sign) the probe's replay found on the way from the loss
    # to trainable parameters whose gradient is exactly zero (gradflow.probing.cuts)
    zero_derivative_ops: list[str] = dataclasses.field(default_factory=list)

    def flipped(self) -> set[str]:
        """Names of the trainable parameters whose requires_grad went off during the step."""
        return {n for f in self.flips for n in f.params}

    def unused_outputs(self) -> set[str]:
        """Names of the trainable parameters whose module ran but none of whose outputs reached the loss."""
        return {n for m in self.modules for n in m.unused_params}

    def without_grad(self, *, flat_zeros: bool = False, zeros: bool = False) -> list[ParamState]:
        """Trainable parameters that ran and got no gradient, outside reentrant no-grad regions (explained by
        reentrant-checkpoint-no-input-grad), minus those explained as switched off during the step or as computed and
        never used. A zero gradient counts where the probe's replay placed it at a cut (a zero-derivative op such as
        round() without a straight-through estimator). Before the replay (the probe deciding whether to run one):
        `flat_zeros`, an FSDP1 unit's zero entries count; `zeros`, every zero gradient counts; either but the
        expected zeros (LoRA's at step 0, those behind a zero gate, token rows the batch lacks)."""
        modules = {m.name: m for m in self.modules}
        other = self.flipped() | self.unused_outputs()
        zero = {n for m in self.modules for n in m.cut_params}
        if flat_zeros or zeros:
            counted = self.flat_params() if flat_zeros else set()
            counted |= {p.name for p in self.params if p.grad == "zero"} if zeros else set()
            zero |= counted - self.expected_zeros()
        out = []
        for p in self.params:
            if not p.requires_grad or not p.used or p.name in other:
                continue
            if p.grad != "none" and not (p.grad == "zero" and p.name in zero):
                continue
            owner = modules.get(p.module)
            if owner is None or not owner.in_reentrant:
                out.append(p)
        return out

    def expected_zeros(self) -> set[str]:
        """Zero gradients that are how the training starts, not a fault: LoRA-style pairs at step 0, the params
        behind a gate that starts at zero, and PEFT's trainable-token rows the batch does not contain."""
        out = {p.name for _, _, hit in self.lora_start_zeros() for p in hit}
        out |= {p.name for _, hit in self.gated_zeros() for p in hit}
        return out | {p.name for p in self.params if ".trainable_tokens_delta." in p.name}

    def lora_start_zeros(self) -> list[tuple[str, str, list[ParamState]]]:
        """LoRA's expected zeros at step 0: [(the weight, the one that starts at zero, its params)] for each kind
        with any. lora_A's first gradient is exactly zero because lora_B starts at zero while getting a gradient
        itself (on an embedding PEFT starts lora_embedding_A at zero, so lora_embedding_B is the zero one). PEFT's
        other low-rank methods start the same way: VeRA's vera_lambda_b and AdaLoRA's lora_E start at zero."""
        found, seen = [], set()
        for zero, start in _START_ZERO:
            ok = {p.name.replace(f".{start}.", f".{zero}.") for p in self.params if f".{start}." in p.name
                  and p.grad == "ok"}
            hit = [p for p in self.params if p.requires_grad and p.grad == "zero" and f".{zero}." in p.name
                   and p.name in ok and p.name not in seen]
            if hit:
                seen.update(p.name for p in hit)
                found.append((zero, start, hit))
        return found

    def gated_zeros(self) -> list[tuple[ParamState, list[ParamState]]]:
        """Zero first gradients behind a gate that starts at zero: [(the gate, the params it holds at zero)]. A
        trainable parameter that is exactly zero and got a gradient itself, held by the module of a zero-gradient
        parameter or by a module around it (`h + tanh(gate) * up(down(h))`, gate = 0: down and up get zeros until
        the gate moves). LoRA-style pairs (lora_start_zeros) are left to their own names."""
        if not self.zero_valued:
            return []
        expected = {p.name for _, _, hit in self.lora_start_zeros() for p in hit}
        by_name = {p.name: p for p in self.params}
        gates: dict[str, list[str]] = {}  # module -> the zero-valued parameters it holds
        for name in self.zero_valued:
            if name in by_name:
                gates.setdefault(by_name[name].module, []).append(name)
        found: dict[str, list[ParamState]] = {}
        for p in self.params:
            if not p.requires_grad or p.grad != "zero" or p.name in expected:
                continue
            gate = next((g for m in ancestors(p.module) for g in gates.get(m, ()) if g != p.name), None)
            if gate is not None:
                found.setdefault(gate, []).append(p)
        return [(by_name[g], hit) for g, hit in found.items()]

    def flat_params(self) -> set[str]:
        """Names of the parameters inside wrapped FSDP1 units: FSDP1 keeps one flat gradient per unit, so a parameter
        the loss never reached gets zeros there, not None."""
        return {n for unit in self.wrappers if unit.kind == "fsdp1" and not unit.planned for n in unit.params}

    def module(self, name: str) -> ModuleState | None:
        for m in self.modules:
            if m.name == name:
                return m
        return None

    def trainable_params(self) -> list[ParamState]:
        return [p for p in self.params if p.requires_grad]


# (the weight whose first gradient is zero, the weight beside it that starts at zero), as PEFT initialises them:
# LoRA (lora_B = 0; lora_embedding_A = 0 on an embedding), VeRA (vera_lambda_b = 0: reset_vera_parameters) and
# AdaLoRA (lora_E = 0: reset_lora_parameters, which zeroes both lora_A's and lora_B's gradients)
_START_ZERO = (("lora_A", "lora_B"), ("lora_embedding_B", "lora_embedding_A"), ("vera_lambda_d", "vera_lambda_b"),
               ("lora_A", "lora_E"), ("lora_B", "lora_E"))


def ancestors(module: str):
    """`module` itself, then each module above it up to the root ("")."""
    while True:
        yield module
        if not module:
            return
        module = module.rsplit(".", 1)[0] if "." in module else ""


def count_into_ancestors(index: dict, p: ParamState) -> None:
    """Add parameter `p`'s numel to its module and every ancestor in `index` (name -> ModuleState; "" is the root),
    as quantized, trainable or frozen."""
    for prefix in ancestors(p.module):
        m = index.get(prefix)
        if m is not None:
            if p.quantized:
                m.quantized += p.numel
            elif p.requires_grad:
                m.trainable += p.numel
            else:
                m.frozen += p.numel