"""What every thalweg optimizer shares: input checks, backend choice, state, clipping, non-finite skipping.

An optimizer subclass states its algorithm — its rule (:mod:`thalweg.engine`), its hyper-parameter
checks and which group keys feed the rule — and this base does the rest, once: it creates the state the
rule's program needs, picks the backend per device, clips, skips non-finite steps, and hands each group's
tensors (local shards under FSDP2) to :func:`thalweg.engine.run`.
"""

from __future__ import annotations

import inspect

import itertools
import operator
from typing import Any, Callable, ClassVar, Iterable

import numpy as np
import torch

from torch.optim.optimizer import _global_optimizer_post_hooks as _GLOBAL_POST_HOOKS
from torch.optim.optimizer import _global_optimizer_pre_hooks as _GLOBAL_PRE_HOOKS

from . import _checks, distributed, engine
from .engine import codec, rounding

BACKENDS = ("auto", *engine.BACKENDS)
_IS_SPARSE = operator.attrgetter("is_sparse")
_IS_CPU = operator.attrgetter("is_cpu")
_CPU = torch.device("cpu")

# The state entry that holds an 8-bit role's absmax values (``exp_avg`` -> ``exp_avg_absmax``).
_ABSMAX = "_absmax"
_KAHAN = "kahan_comp"  # param_update="kahan": the compensation of a bfloat16 parameter

# Parameter dtypes whose state ``state_dtype=torch.float32`` widens.
_NARROW = (torch.bfloat16, torch.float16)

# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing; matched so that clipping
# through the optimizer equals clipping by hand.
_CLIP_EPS = 1e-6


def scalar_dtype() -> torch.dtype:
    """dtype of the ``step`` counter, as torch.optim stores it (so checkpoints cross-load)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def resolve_backend(backend: str, foreach: bool | None, fused: bool | None) -> tuple[str, bool]:
    """Map ``backend`` and torch's ``foreach=``/``fused=`` keywords onto one backend name.

    Returns the backend and whether ``"auto"`` may pick the fused path (``fused=False`` forbids it).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    for name, value in (("foreach", foreach), ("fused", fused)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be True, False or None, got {value!r}")
    if foreach and fused:
        raise ValueError("foreach=True and fused=True cannot be used together; pick one")
    requested = "fused" if fused else "foreach" if foreach else "reference" if foreach is False else None
    if requested is None:
        return backend, fused is not False
    if backend not in ("auto", requested):
        raise ValueError(f"backend={backend!r} contradicts {'fused' if fused else 'foreach'}={fused if fused else foreach}")
    return requested, True


# rule scalars a param group keeps in one of torch's pairs: name -> (group key, position)
_FROM_PAIR = {"beta1": ("betas", 0), "beta2": ("betas", 1), "beta3": ("betas", 2)}


class Optimizer(torch.optim.Optimizer):
    """Base of every thalweg optimizer: a ``torch.optim.Optimizer`` with checked input and shared options.

    Subclasses set :attr:`rule` (their elementwise update, see :mod:`thalweg.engine`) and implement
    :meth:`_check_hyperparameters`; :meth:`_scalars` (which group keys feed the rule) and
    :meth:`_initial_value` (a state's starting value) have defaults that fit most.
    """

    rule: ClassVar[engine.Rule]
    name: ClassVar[str]  # the name thalweg.create knows it by
    # the kind of method, for readers choosing among many (the arena groups its report by it): "SGD-like",
    # "RMSprop-like", "Adam-like", "layer-wise", "LR-free", "schedule-free" or "matrix"
    family: ClassVar[str] = "other"
    # create and advance a ``step`` counter per parameter, as torch.optim does for all but SGD
    counts_steps: ClassVar[bool] = True
    # group keys a checkpoint may lack (filled from the defaults, as torch.optim's __setstate__ does for keys
    # added over the releases); any other hyper-parameter missing from a checkpoint's group is an error
    optional_group_keys: ClassVar[frozenset[str]] = frozenset({"maximize", "foreach", "fused", "capturable",
                                                                "differentiable"})
    accepts_sparse_grads: ClassVar[bool] = False
    requires_sparse_grads: ClassVar[bool] = False  # SparseAdam: a dense gradient is refused (as torch's)
    # per-parameter state entries a subclass keeps itself, outside the rule's roles (SparseAdam's int `step`)
    own_state_keys: ClassVar[frozenset[str]] = frozenset()
    # a stage of torch ops on whole tensors runs before the rule (:meth:`_transform_grads`, Muon)
    transforms_grads: ClassVar[bool] = False
    # a stage of torch ops over every group of the step at once runs before any group's rule
    # (:meth:`_stage_step`: a value reduced over all parameters, Prodigy's and D-Adaptation's step size d)
    stages_step: ClassVar[bool] = False
    # state entries whose shape is not the parameter's (Adafactor's row and column factors): checked by
    # :meth:`_check_state`, not against the parameter's shape
    unshaped_state_keys: ClassVar[frozenset[str]] = frozenset()
    # How each state role is kept with state_dtype="int8" (see thalweg.engine.codec): "signed" or "unsigned"
    # 8-bit blocks (first moments; second moments, which are >= 0), or "float" (kept as float state: an
    # iterate or an average of iterates, which 8 bits would blur). An optimizer that declares nothing, or not
    # every role of its rule, has no 8-bit state, and refuses state_dtype="int8".
    state_codecs: ClassVar[dict[str, str]] = {}
    # Layer-wise optimizers scale each tensor's step by a trust ratio that a param group can turn off
    # with ``trust_ratio=False`` (thalweg.create puts biases and norms in such a group).
    layerwise: ClassVar[bool] = False
    # The process group over which the gradient norm (max_grad_norm, skip_nonfinite) is summed when
    # each process holds different whole parameters (ZeroRedundancyOptimizer); set it with
    # thalweg.distributed.reduce_grad_norm_over. Sharded (DTensor) groups need nothing: see step().
    grad_norm_process_group: Any = None

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        backend: str,
        foreach: bool | None,
        fused: bool | None,
        max_grad_norm: float | None,
        skip_nonfinite: bool,
        state_dtype: torch.dtype | None = None,
        differentiable: bool | None = False,
        capturable: bool = False,
        param_update: str = "nearest",
    ) -> None:
        self.backend, self._auto_may_fuse = resolve_backend(backend, foreach, fused)
        if differentiable is not None:  # None: an optimizer without the option (SparseAdam, as torch's)
            _checks.flag("differentiable", differentiable)
        _checks.flag("capturable", capturable)
        if capturable:
            raise ValueError(f"capturable=True is not supported: a thalweg step reads its step counts on the host, "
                             f"which a CUDA graph cannot capture; use torch.optim.{type(self).__name__} to capture steps")
        if differentiable and (self.backend not in ("auto", "reference") or state_dtype is not None):
            raise ValueError("differentiable=True steps with the reference backend in the parameters' own dtype; it "
                             f"cannot be combined with backend={self.backend!r} or state_dtype={state_dtype!r}")
        if differentiable is not None:
            defaults = {**defaults, "differentiable": differentiable}
        passed = {"foreach": foreach, "fused": fused, "capturable": capturable}
        defaults = {**defaults, **{key: passed[key] for key in self._backend_group_keys()}}
        _checks.optional_positive("max_grad_norm", max_grad_norm)
        _checks.flag("skip_nonfinite", skip_nonfinite)
        if state_dtype == "int8":
            undeclared = [role for role in self.rule.state_roles if role not in self.state_codecs]
            if undeclared or not self.state_codecs:
                raise ValueError(f"state_dtype='int8' is not available for {type(self).__name__}: "
                                 + (f"its state {', '.join(map(repr, undeclared))} has no 8-bit form" if undeclared
                                    else "its state is not elementwise"))
        elif not (state_dtype is None or state_dtype is torch.float32):
            raise ValueError(f"state_dtype must be None, torch.float32 or 'int8', got {state_dtype!r}")
        if param_update not in rounding.MODES:
            raise ValueError(f"param_update must be 'nearest', 'stochastic' or 'kahan', got {param_update!r}")
        if param_update != "nearest" and state_dtype is None:
            raise ValueError(f"param_update={param_update!r} rounds the new value of a bfloat16 parameter from a step "
                             "computed in float32: combine it with state_dtype=torch.float32 or state_dtype='int8'")
        self.state_dtype = state_dtype
        self.param_update = param_update
        self.rounding_steps = 0  # steps rounded stochastically so far: the rounding's key (see engine.rounding)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0
        self.last_grad_norm: torch.Tensor | None = None
        self._check_hyperparameters(defaults)

        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors or of param-group dicts, got a single Tensor; wrap it in a list")
        if isinstance(params, (set, frozenset)):
            raise TypeError("params must be an ordered collection (a set's order changes between runs); use a list")
        groups = list(params)
        if not groups:
            raise ValueError("params is empty: the optimizer was given no parameters to optimize")
        super().__init__(groups, defaults)
        if not any(group["params"] for group in self.param_groups):
            raise ValueError("params is empty: every parameter group has an empty 'params' list")
        if param_update != "nearest":  # (checked again at each step: a model may change dtype later)
            for index, group in enumerate(self.param_groups):
                for position, param in enumerate(group["params"]):
                    if param.dtype == torch.float16:
                        raise ValueError(f"param group {index}, params[{position}] is float16: param_update="
                                         f"{param_update!r} rounds bfloat16 parameters (use bfloat16, or "
                                         "param_update='nearest' for float16 ones)")

    @classmethod
    def _backend_group_keys(cls) -> tuple[str, ...]:
        """Which of torch's ``foreach``, ``fused`` and ``capturable`` keys this optimizer's param groups carry:
        those of its torch.optim namesake's constructor (NAdam has no ``fused``, SGD no ``capturable``), so that
        state_dicts match torch's; for an optimizer torch does not have, those of its own constructor."""
        namesake = getattr(torch.optim, cls.__name__, None)
        constructor = namesake.__init__ if isinstance(namesake, type) else cls.__init__
        taken = inspect.signature(constructor).parameters
        return tuple(key for key in ("foreach", "fused", "capturable") if key in taken)

    def _group_backend(self, group: dict[str, Any]) -> str | None:
        """The backend a param group's own ``fused``/``foreach`` keys ask for, as torch reads them per group
        (a group added with ``foreach=False``, a loaded checkpoint's keys); None where they ask nothing."""
        if group.get("fused"):
            return "fused"
        if group.get("foreach"):
            return "foreach"
        if group.get("foreach") is False:
            return "reference"
        return None

    def _check_backend_keys(self, group: dict[str, Any]) -> None:
        """A param group's ``foreach``/``fused``/``capturable``, checked as the constructor checks them."""
        resolve_backend("auto", group.get("foreach"), group.get("fused"))
        if "capturable" in group:
            _checks.flag("capturable", group["capturable"])
            if group["capturable"]:
                raise ValueError("capturable=True is not supported: a thalweg step reads its step counts on the "
                                 "host, which a CUDA graph cannot capture")

    # -- what a subclass states -------------------------------------------------------------

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        """Raise ValueError/TypeError for an invalid hyper-parameter in ``group`` (or the defaults)."""
        raise NotImplementedError

    def _scalars(self, group: dict[str, Any]) -> dict[str, Any]:
        """The rule's flags and hyper-parameters from a param group: by default each rule scalar is the group
        key of the same name, and ``beta1``/``beta2`` are torch's ``betas`` pair (numbers as Python floats, a
        tensor ``lr`` or beta read once)."""
        values = {}
        for name in self.rule.scalars:
            if name in _FROM_PAIR:
                key, index = _FROM_PAIR[name]
                value, label = group[key][index], f"{key}[{index}]"
            else:
                value, label = group[name], name
            values[name] = value if type(value) is bool else _checks.as_number(label, value)
        return values

    def _initial_value(self, role: str, group: dict[str, Any]) -> float:
        """The value a new state tensor of ``role`` starts from (0 unless the algorithm says otherwise)."""
        return 0.0

    def _initial_state(self, param: torch.Tensor, role: str, group: dict[str, Any]) -> torch.Tensor:
        """A new state tensor of ``role`` for ``param``: filled with :meth:`_initial_value` unless the algorithm
        starts it from the parameter itself (Schedule-Free's ``z``)."""
        return self._new_state(param, self._initial_value(role, group))

    def _scalar_state(self, group: dict[str, Any]) -> dict[str, float]:
        """Per-parameter scalar state created with ``step`` (0-d tensors of torch's scalar dtype), by key and
        starting value: NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``. None by default."""
        return {}

    def _supplied(self, group: dict[str, Any], states: list[dict[str, Any]], params: list[torch.Tensor]) -> dict[str, Any]:
        """The rule's :class:`~thalweg.engine.PerTensor` values for a step of these parameters (float64 numpy
        arrays, one entry per parameter), from each parameter's state before the step (and its shape: Muon's
        learning rate); nothing is written here.
        Anything else in the dict is handed back to :meth:`_after_step`."""
        raise NotImplementedError(f"{type(self).__name__}'s rule takes per-tensor values; define _supplied")

    def _per_tensor_values(self, group: dict[str, Any], states: list[dict[str, Any]], params: list[torch.Tensor],
                           sizes: np.ndarray | None, where=None) -> dict[str, Any]:
        """The rule's per-tensor values: ``size`` (each whole tensor's element count, also when it is sharded:
        what a per-tensor mean or RMS divides by) and what :meth:`_supplied` gives for the rest."""
        values: dict[str, Any] = {}
        if sizes is not None:
            values["size"] = sizes
        if any(name != "size" for name in self.rule.supplied):
            _check_scalar_state(where, states, self._scalar_state(group))
            values.update(self._supplied(group, states, params))
        return values

    def _sizes(self, program: engine.Program, params: list[torch.Tensor]) -> np.ndarray | None:
        """The rule's ``size`` column: each tensor's element count (a DTensor's is the whole tensor's), counted
        only when this group's program uses it (cautious=True); None when the rule takes no ``size``."""
        if "size" not in self.rule.supplied:
            return None
        if "size" not in program.early_vars:
            return np.zeros(len(params))
        return np.array([p.numel() for p in params], dtype=np.float64)

    def _check_state(self, where, params: list[torch.Tensor], states: list[dict[str, Any]]) -> None:
        """Raise, naming the parameter (``where(k)``), for state the rule's checks do not cover and the step
        would use (``own_state_keys``); called before anything is written."""

    def _sharded_by_state(self, group: dict[str, Any]) -> dict[int, torch.Tensor]:
        """The group's DTensor parameters by the id of their state dict: how a stage handed local shards (and their
        ``self.state`` dicts) finds each whole parameter (a DTensor's ``to_local()`` is a new object each call)."""
        return {id(self.state[p]): p for p in group["params"] if distributed.is_sharded(p) and p in self.state}

    def _transform_grads(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
                         states: list[dict[str, Any]]) -> list[torch.Tensor]:
        """With ``transforms_grads``: what the rule reads as each parameter's gradient (same shape and dtype),
        computed with torch ops on whole tensors after every check has passed (it may write state)."""
        raise NotImplementedError

    def _stage_step(self, entries: list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor],
                                              list[dict[str, Any]], "distributed.Sharding | None"]]
                    ) -> list[dict[str, Any]] | None:
        """With ``stages_step``: torch ops over the whole step, after every check and the clipping, before any rule.

        ``entries``: per param group and device, ``(group, params, grads, states, sharding)`` (local shards under
        FSDP2, with the group's :class:`~thalweg.distributed.Sharding`). It may write state and group keys, and
        returns per entry the rule scalars that replace those :meth:`_scalars` gave, or None: the step ends
        here, no rule runs."""
        raise NotImplementedError

    def _after_step(self, group: dict[str, Any], states: list[dict[str, Any]], supplied: dict[str, Any]) -> None:
        """Write the scalar state this step advanced (after the update; ``supplied``: what :meth:`_supplied` gave)."""

    def _sparse_update(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
                       states: list[dict[str, Any]], first: np.ndarray | None) -> None:
        """Step parameters whose gradient is sparse (only optimizers with ``accepts_sparse_grads``): by default
        the rule function itself, on torch's sparse-dense arithmetic (SGD's ``param - lr * grad``, as torch's
        ``param.add_(grad, alpha=-lr)``). State is kept dense; with state, the gradient is made dense first."""
        scalars = self._scalars(group)
        program = self.rule.program(scalars)
        if self.rule.supplied:
            scalars = {**scalars, **self._per_tensor_values(group, states, params, self._sizes(program, params))}
        if program.state_roles:  # a dense state (a momentum buffer) changes every row anyway: so does the step
            grads = [grad.to_dense() for grad in grads]
        roles, quantised = self._role_lists(program, params, states)
        steps = [state["step"] for state in states] if self.counts_steps else None
        engine.run(program, "reference", params, grads, roles, steps, first, scalars, out_of_place=True,
                   quantised=quantised)

    def _auto_fused(self, device: torch.device, params: list[torch.Tensor], group: dict[str, Any]) -> bool:
        """Whether ``backend="auto"`` takes the fused path for these tensors (where fused is available): yes,
        unless an optimizer measured otherwise (SGD's one-op update on a few large tensors)."""
        return True

    # -- state -------------------------------------------------------------------------------

    @property
    def _float_state(self) -> torch.dtype | None:
        """The dtype float state of bfloat16/float16 parameters is kept in: float32 with ``state_dtype``
        float32, and with "int8" too (small tensors, and the roles declared "float"); None: the param's own."""
        return None if self.state_dtype is None else torch.float32

    def _widens(self, param: torch.Tensor) -> bool:
        """Whether ``param``'s float state is kept in float32 rather than the param's own dtype."""
        return self.state_dtype is not None and param.dtype in _NARROW

    def _new_state(self, param: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """A state tensor for ``param`` filled with ``fill``, in float32 where :meth:`_widens` says so, else
        in the param's dtype (torch's memory format rule either way)."""
        dtype = self._float_state if self._widens(param) else param.dtype
        return torch.full_like(param, fill, dtype=dtype, memory_format=torch.preserve_format)

    def _codec(self, role: str, param: torch.Tensor) -> str | None:
        """``"signed"`` or ``"unsigned"`` when ``role``'s state of ``param`` is kept in 8 bits, else None."""
        if self.state_dtype != "int8":
            return None
        kind = self.state_codecs.get(role)
        return kind if kind in ("signed", "unsigned") and codec.quantises(param.numel()) else None

    def _role_lists(self, program: engine.Program, params: list[torch.Tensor], states: list[dict[str, Any]],
                    where=None) -> tuple[list[list[Any]], bool]:
        """Each state role's entries of ``states`` (the rule's role lists) and whether any is 8-bit: those are
        :class:`~thalweg.engine.codec.Blockwise` views of the codes and absmax, checked here."""
        roles = [[state[role] for state in states] for role in program.state_roles]
        if self.state_dtype != "int8":
            return roles, False
        quantised = False
        for role, entries in zip(program.state_roles, roles):
            kind = self.state_codecs[role]
            if kind == "float":
                continue
            for k, value in enumerate(entries):
                if isinstance(value, torch.Tensor) and value.dtype == torch.uint8:
                    absmax = states[k].get(role + _ABSMAX)
                    problem = codec.check(value, absmax, params[k].shape)
                    if problem is not None:
                        raise RuntimeError(f"{_name(where, k)}: its 8-bit state[{role!r}] is damaged: {problem}")
                    entries[k] = _blockwise(value, absmax, params[k], kind == "signed")
                    quantised = True
        return roles, quantised

    def _states(self, params: list[torch.Tensor], group: dict[str, Any], program: engine.Program,
                created_log: list | None = None, where=None) -> tuple[list[dict[str, Any]], np.ndarray | None]:
        """``self.state[p]`` of each param with what ``program`` needs created (torch's key names), and per
        param whether its state was created now (the rule's ``first``; None when it does not read it).

        A program that needs no state leaves ``self.state`` untouched, as torch's SGD without momentum does.
        ``created_log`` receives ``(mapping, key)`` for everything created, so that a step that fails later
        can take it back; ``where(k)`` names parameter ``k`` in errors.
        """
        roles = program.state_roles
        if not roles and not self.counts_steps and not self.transforms_grads:
            return [], None
        table = self.state
        # one lookup per param (a tensor's hash is a Python call): get, then create what is missing
        states = list(map(table.get, params))
        if None in states:
            for i, (param, state) in enumerate(zip(params, states)):
                if state is None:
                    states[i] = table[param] = {}
                    if created_log is not None:
                        created_log.append((table, param))
        created = None
        counts_steps = self.counts_steps
        core = self.rule.core_roles
        scalar_state = self._scalar_state(group) if counts_steps else {}
        for i, (param, state) in enumerate(zip(params, states)):
            # (a count alone is no fresh state: torch.optim refuses it too (KeyError); a compensation alone is)
            fresh = not state or (len(state) == 1 and _KAHAN in state)
            if counts_steps and "step" not in state:
                if state:  # moments without a count: the next step would start them over (torch refuses it too)
                    raise RuntimeError(f"{_name(where, i)}: its state has {sorted(state)} but no 'step'; it is not a "
                                       f"{type(self).__name__} state (a checkpoint of another optimizer?)")
                state["step"] = torch.tensor(0.0, dtype=scalar_dtype())
                if created_log is not None:
                    created_log.append((state, "step"))
                for key, value in scalar_state.items():
                    state[key] = torch.tensor(float(value), dtype=scalar_dtype())
                    if created_log is not None:
                        created_log.append((state, key))
            elif scalar_state and not fresh:
                absent = [key for key in scalar_state if key not in state]
                if absent:
                    raise RuntimeError(f"{_name(where, i)}: its state has {sorted(state)} but no {absent[0]!r}, which "
                                       f"every {type(self).__name__} state holds")
            for role in roles:
                if role not in state:
                    if role in core and not fresh:
                        raise RuntimeError(f"{_name(where, i)}: its state has {sorted(state)} but no {role!r}, which "
                                           f"every {type(self).__name__} state holds")
                    state[role] = self._initial_state(param, role, group)
                    if created_log is not None:
                        created_log.append((state, role))
                    kind = self._codec(role, param)
                    if kind is not None:  # encoded from the float start (Adagrad's may be nonzero)
                        state[role], state[role + _ABSMAX] = _encoded(state[role], param, kind == "signed")
                        if created_log is not None:
                            created_log.append((state, role + _ABSMAX))
                    if created is None:
                        created = np.zeros(len(params), dtype=np.bool_)
                    created[i] = True
        if program.uses_first and created is None:
            created = np.zeros(len(params), dtype=np.bool_)
        return states, created

    # -- parameter groups ------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        entries = group.get("params")
        if entries is None:
            raise ValueError("a param group needs a 'params' entry")
        if isinstance(entries, torch.Tensor):
            entries = [entries]
        elif isinstance(entries, (set, frozenset)):
            raise TypeError("a param group's 'params' must be ordered (a set's order changes between runs); use a list")
        entries = list(entries)
        tensors = [entry[1] if isinstance(entry, tuple) and len(entry) == 2 else entry for entry in entries]
        seen: set[int] = set()
        owner = {id(p): i for i, other in enumerate(self.param_groups) for p in other["params"]}
        for index, tensor in enumerate(tensors):
            where = f"params[{index}]" if not self.param_groups else f"params[{index}] of param group {len(self.param_groups)}"
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{where} must be a torch.Tensor, got {type(tensor).__name__}")
            if not tensor.is_leaf and not tensor.retains_grad and not self.defaults.get("differentiable"):
                raise ValueError(f"{where} is not a leaf tensor (it was computed from others); optimize the tensor it came from")
            if not (tensor.is_floating_point()):
                raise TypeError(f"{where} has dtype {tensor.dtype}; only floating-point tensors can be optimized")
            if id(tensor) in seen:
                raise ValueError(f"{where} appears twice in the same param group")
            seen.add(id(tensor))
            if id(tensor) in owner:
                raise ValueError(f"{where} is already in param group {owner[id(tensor)]}; a parameter may belong to one group only")
        self._check_hyperparameters({**self.defaults, **group})
        self._check_backend_keys(group)
        self._check_parameters({**self.defaults, **group}, tensors, len(self.param_groups))
        group["params"] = entries
        super().add_param_group(group)

    def _check_parameters(self, group: dict[str, Any], params: list[torch.Tensor], group_index: int) -> None:
        """Raise, naming the parameter (``params[k]`` of param group ``group_index``), for a parameter this optimizer
        cannot step (a shape, a sharding, a dtype), as its group is added and before it is (``group``: the group's
        keys with the defaults filled in)."""

    # -- checkpoints -----------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(backend=self.backend, _auto_may_fuse=self._auto_may_fuse, max_grad_norm=self.max_grad_norm,
                     skip_nonfinite=self.skip_nonfinite, skipped_steps=self.skipped_steps, state_dtype=self.state_dtype,
                     param_update=self.param_update, rounding_steps=self.rounding_steps)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's __setstate__ adds `differentiable` to the defaults, which go into every group below: not for
        # an optimizer that has no such option (SparseAdam, as torch's)
        before = state.get("defaults", getattr(self, "defaults", None))
        has_differentiable = not before or "differentiable" in before
        super().__setstate__(state)
        if not has_differentiable:
            self.defaults.pop("differentiable", None)
        # A checkpoint written by torch.optim (or an older thalweg) may lack our group keys: fill
        # them from the defaults, as torch's own optimizers do in __setstate__.
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        for key, value in (("backend", "auto"), ("_auto_may_fuse", True), ("max_grad_norm", None),
                           ("skip_nonfinite", False), ("skipped_steps", 0), ("last_grad_norm", None),
                           ("state_dtype", None), ("param_update", "nearest"), ("rounding_steps", 0)):
            self.__dict__.setdefault(key, value)

    # What thalweg adds to an optimizer's own state travels in the first param group of a state_dict (DCP
    # keeps only "state" and "param_groups"); torch.optim ignores a group key it does not know.
    # (``rounding_steps`` only with param_update="stochastic": the key of its random bits)
    _OWN_STATE = ("skipped_steps", "rounding_steps")

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        if state_dict["param_groups"]:
            for key in self._OWN_STATE:
                if key != "rounding_steps" or self.param_update == "stochastic":
                    state_dict["param_groups"][0][key] = getattr(self, key)
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's ``load_state_dict``, after checking that the checkpoint fits this optimizer: a checkpoint of
        another optimizer, or a damaged one, is refused with nothing changed (see the README's list)."""
        self._check_checkpoint(state_dict)
        super().load_state_dict(state_dict)
        numbers = ("step", *self._scalar_state(self.defaults)) if self.counts_steps else ()
        for state in self.state.values():  # torch < 1.12 wrote `step` (and NAdam's mu_product...) as plain numbers
            for key in numbers:
                value = state.get(key)
                if value is not None and not isinstance(value, torch.Tensor):
                    state[key] = torch.tensor(float(value), dtype=scalar_dtype())
        if len(numbers) > 1:
            # torch.optim casts every state tensor but `step` to its parameter's dtype on load, NAdam's mu_product
            # and ASGD's eta and mu included (float32 -> bfloat16 or float64): the resumed run would then step
            # differently from one never stopped. They are taken back from the checkpoint in their own dtype.
            saved = state_dict["state"]
            indices = [index for group in state_dict["param_groups"] for index in group["params"]]
            params = [param for group in self.param_groups for param in group["params"]]
            for index, param in zip(indices, params):
                for key in numbers[1:]:
                    value = saved.get(index, {}).get(key)
                    if isinstance(value, torch.Tensor) and param in self.state:
                        self.state[param][key] = value.detach().to(param.device, copy=True)
        for key in self._OWN_STATE:  # back from the group into the optimizer (absent: a torch.optim checkpoint)
            values = [group.pop(key) for group in self.param_groups if key in group]
            if values:
                setattr(self, key, values[0])
        if self.param_update != "kahan":  # the compensation of a "kahan" run: nothing here reads it
            for state in self.state.values():
                state.pop(_KAHAN, None)
        if self.state_dtype is not None or self.state_codecs:
            self._retake_state(state_dict)

    def _retake_state(self, state_dict: dict[str, Any]) -> None:
        """After torch.optim's load: the state entries its cast to the parameter's dtype would change, taken again
        from the checkpoint itself.

        torch.optim casts every state tensor but ``step`` to a floating parameter's dtype. With ``state_dtype``,
        the float state of bfloat16/float16 parameters is taken in float32 instead (no round trip through
        bfloat16); 8-bit state (uint8 codes and float32 absmax) is taken as it was saved, or encoded from a
        float checkpoint, and an 8-bit checkpoint loaded without ``state_dtype="int8"`` is decoded to float.
        """
        saved = state_dict["state"]
        indices = [index for group in state_dict["param_groups"] for index in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        for index, param in zip(indices, params):
            if index not in saved or param not in self.state:
                continue
            entry, state = saved[index], self.state[param]
            widens = self._widens(param)
            for key, value in entry.items():
                if key == "step" or key.endswith(_ABSMAX) or not isinstance(value, torch.Tensor):
                    continue
                if key == _KAHAN:  # kept in bfloat16 as the parameter, whole and contiguous (the kernels write it)
                    if key in state and not distributed.is_sharded(param):
                        state[key] = value.detach().to(param.device, param.dtype, copy=True).contiguous()
                    continue
                kind = self._codec(key, param)
                if value.dtype == torch.uint8:  # 8-bit in the checkpoint
                    absmax = entry[key + _ABSMAX]
                    if kind is not None:
                        state[key] = value.to(param.device, copy=True)
                        state[key + _ABSMAX] = absmax.to(param.device, torch.float32, copy=True)
                    else:
                        signed = self.state_codecs[key] == "signed"
                        decoded = _blockwise(value, absmax, param, signed).decode()
                        decoded = decoded.to(param.device, self._float_state if widens else param.dtype)
                        state[key] = distributed.shard_like(param, decoded) if distributed.is_sharded(param) else decoded
                        state.pop(key + _ABSMAX, None)
                elif kind is not None and value.is_floating_point():  # a float checkpoint: encoded on load
                    state[key], state[key + _ABSMAX] = _encoded(value.to(param.device), param, kind == "signed")
                elif widens and value.is_floating_point():
                    state[key] = value.to(device=param.device, dtype=self._float_state)

    def _check_checkpoint(self, state_dict: dict[str, Any]) -> None:
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(f"a {name} checkpoint is a dict with 'state' and 'param_groups', got "
                             f"{sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__}")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the checkpoint has {len(groups)} param groups, this {name} has {len(self.param_groups)}")
        required = set(self.defaults) - self.optional_group_keys
        params = {}
        for index, (saved, group) in enumerate(zip(groups, self.param_groups)):
            missing = sorted(required - set(saved))
            if missing:
                raise ValueError(f"param group {index} of the checkpoint has no {', '.join(map(repr, missing))}: it is "
                                 f"not a {name} checkpoint (its keys: {sorted(k for k in saved if k != 'params')})")
            params.update(zip(saved["params"], group["params"]))
        scalar_keys = set(self._scalar_state(self.defaults)) if self.counts_steps else set()
        allowed = set(self.rule.state_roles) | ({"step"} | scalar_keys if self.counts_steps else set()) | self.own_state_keys
        allowed |= {role + _ABSMAX for role, kind in self.state_codecs.items() if kind != "float"}
        allowed.add(_KAHAN)  # (param_update="kahan"'s: dropped on load unless this optimizer's is "kahan" too)
        for index, state in state_dict["state"].items():
            where = f"state of param {index} in the checkpoint"
            foreign = sorted(set(state) - allowed)
            if foreign:
                raise ValueError(f"{where} holds {', '.join(map(repr, foreign))}, which a {name} does not keep "
                                 f"(it keeps {sorted(allowed)}): a checkpoint of another optimizer?")
            if self.counts_steps and state and "step" not in state:
                raise ValueError(f"{where} has {sorted(state)} but no 'step'")
            param = params.get(index)
            for key, value in state.items():
                if key == "step" or key in scalar_keys:
                    number = value if not isinstance(value, torch.Tensor) else (
                        float(value) if value.numel() == 1 else None)
                    is_number = isinstance(number, (int, float)) and not isinstance(number, bool)
                    if key == "step" and not (is_number and number >= 0):
                        raise ValueError(f"{where}: 'step' must be a count >= 0 (a number or a one-element tensor), "
                                         f"got {value!r}")
                    if not is_number:
                        raise ValueError(f"{where}: {key!r} must be a number or a one-element tensor, got {value!r}")
                elif not isinstance(value, torch.Tensor):
                    raise ValueError(f"{where}: {key!r} must be a tensor, got {type(value).__name__}")
                elif key.endswith(_ABSMAX) and key.removesuffix(_ABSMAX) in self.state_codecs:
                    codes = state.get(key.removesuffix(_ABSMAX))
                    if not (isinstance(codes, torch.Tensor) and codes.dtype == torch.uint8):
                        raise ValueError(f"{where} holds {key!r} without the 8-bit {key.removesuffix(_ABSMAX)!r} it "
                                         "scales")
                elif value.dtype == torch.uint8:  # an 8-bit state: its codes and absmax checked together
                    if self.state_codecs.get(key, "float") == "float":
                        raise ValueError(f"{where}: {key!r} is 8-bit (uint8), which a {name} does not keep for {key!r}")
                    problem = codec.check(value, state.get(key + _ABSMAX),
                                          param.shape if param is not None else value.shape)
                    if problem is not None:
                        raise ValueError(f"{where}: the 8-bit {key!r} is damaged: {problem}")
                elif param is not None and key not in self.unshaped_state_keys and value.shape != param.shape:
                    raise ValueError(f"{where}: {key!r} has shape {tuple(value.shape)} but the parameter has "
                                     f"{tuple(param.shape)}")

    # -- the step ----------------------------------------------------------------------------

    def backend_for(self, device: torch.device, params: list[torch.Tensor] | None = None,
                    group: dict[str, Any] | None = None) -> str:
        """The backend this optimizer uses for ``params`` (all on ``device``, from param group ``group``).

        ``"auto"``: the fused kernels where their compiler is installed and the optimizer does not know them
        to be slower for these tensors (:meth:`_auto_fused`); otherwise torch.optim's own default for the
        device: the for-loop on CPU (where ``foreach`` is slower, see NOTES.md) and ``foreach`` elsewhere.
        """
        if group is not None and group.get("differentiable"):  # torch ops the autograd graph can record
            return "reference"
        asked = None if group is None else self._group_backend(group)
        if asked is not None:
            return asked
        if self.backend != "auto":
            return self.backend
        may_fuse = self._auto_may_fuse and (group is None or group.get("fused", True) is not False)
        if may_fuse and engine.unavailable_reason(device) is None and (
                params is None or group is None or self._auto_fused(device, params, group)):
            return "fused"
        return "reference" if device.type == "cpu" else "foreach"

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss.

        Step hooks (``register_step_pre_hook``, ``register_optimizer_step_post_hook``...) run around it as
        in torch.optim, and a profiler sees it as ``Optimizer.step#<class>.step``.
        """
        # torch.optim wraps every optimizer class's step() in its hooks and a profiler range
        # (Optimizer.profile_hook_step); this step runs the same hooks itself and opens the range only
        # while a profiler records. Entering an idle range and the no_grad decorator cost ~0.13 ms per
        # step when the backward pass has just flushed the caches: 5-10 % of a fused step on a small model.
        if type(self).step is not Optimizer.step:  # a subclass's step, wrapped by torch: hooks ran already
            return self._step_without_grad(closure)
        if torch.autograd._profiler_enabled():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
                return self._step_with_hooks(closure)
        return self._step_with_hooks(closure)

    step.hooked = True  # type: ignore[attr-defined]  # tells torch.optim not to wrap it

    def _step_with_hooks(self, closure: Callable[[], Any] | None) -> Any:
        args, kwargs = ((self,) if closure is None else (self, closure)), {}
        for hook in itertools.chain(_GLOBAL_PRE_HOOKS.values(), self._optimizer_step_pre_hooks.values()):
            result = hook(self, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"a step pre-hook must return None or a tuple (new_args, new_kwargs), got {result!r}")
                args, kwargs = result
        loss = self._step_without_grad(*args[1:], **kwargs)
        self._optimizer_step_code()
        for hook in itertools.chain(self._optimizer_step_post_hooks.values(), _GLOBAL_POST_HOOKS.values()):
            hook(self, args, kwargs)
        return loss

    def _step_without_grad(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        previous = torch.is_grad_enabled()
        # what torch.no_grad() does, without its context-manager layers; differentiable=True records the step
        # (as torch.optim's _use_grad_for_differentiable)
        torch._C._set_grad_enabled(bool(self.defaults.get("differentiable")))
        try:
            return self._update_all(loss)
        finally:
            torch._C._set_grad_enabled(previous)

    def _update_all(self, loss: Any) -> Any:
        """The step itself (gradients off): checks, clipping, then every group's update; returns ``loss``.

        A step that raises changes nothing: everything is checked — hyper-parameters, backends, gradients and
        every state tensor the step will touch, in every group — before anything is written, and state
        created for the step is taken back if a later check fails.
        """
        work = []
        for group_index, group in enumerate(self.param_groups):
            self._check_hyperparameters(group)
            params = group["params"]
            grads = [p.grad for p in params]
            positions = None  # where each stepped param sits in the group (None: all of them, in order)
            if any(g is None for g in grads):
                positions = [i for i, g in enumerate(grads) if g is not None]
                params = [params[i] for i in positions]
                grads = [grads[i] for i in positions]
            if self.requires_sparse_grads and not all(map(_IS_SPARSE, grads)):
                position = next(i for i, g in enumerate(grads) if not g.is_sparse)
                raise RuntimeError(f"parameter {_position(group, params[position])} of param group {group_index}: "
                                   f"{type(self).__name__} does not support dense gradients, please consider Adam "
                                   "instead (SparseAdam steps only the rows a sparse gradient holds)")
            if any(map(_IS_SPARSE, grads)):  # the one kind of gradient an optimizer may refuse
                for param, grad in zip(params, grads):
                    self._check_grad(param, grad, group_index, group)
            # DTensor (FSDP2) groups: which processes hold the other shards; a ValueError for mixed groups.
            sharding = distributed.group_sharding(group_index, group["params"])
            scalars = self._scalars(group)
            work.append((group_index, group, positions, params, grads, sharding, scalars, self.rule.program(scalars)))
        grads = [g for w in work for g in w[4]]
        if not grads and self.grad_norm_process_group is None:
            return loss

        # Backends are resolved before anything is written, so an unavailable one (backend="fused"
        # without numba or triton) fails the step with gradients, state and parameters as they were.
        plan = []
        backends_used = set()
        for group_index, group, positions, params, group_grads, sharding, scalars, program in work:
            for device, indices in _split_by_device(params):
                device_params = params if indices is None else [params[i] for i in indices]
                device_grads = group_grads if indices is None else [group_grads[i] for i in indices]
                where = _Where(group_index, group, positions, indices)
                backend = self.backend_for(device, device_params, group)
                if backend == "fused":
                    reason = engine.unavailable_reason(device)
                    if reason is not None:
                        raise RuntimeError(f"backend='fused' is not available for {device.type} tensors: {reason}")
                backends_used.add((device.type, backend))
                plan.append((group, device_params, device_grads, sharding, scalars, program, backend, where))

        norm = None
        if self.max_grad_norm is not None or self.skip_nonfinite:
            # Sharded or partitioned gradients: local squared norms summed across processes, once.
            # A step that runs fused on CPU takes the norm with the fused kernel too.
            fused_cpu = backends_used == {("cpu", "fused")}
            norm = distributed.total_grad_norm(lambda gs: global_grad_norm(gs, fused_cpu=fused_cpu),
                                               [(w[5], w[4]) for w in work], self.grad_norm_process_group)
            if self.skip_nonfinite and not bool(torch.isfinite(norm)):
                if self.max_grad_norm is not None:
                    self.last_grad_norm = norm.to(report_dtype(grads))
                self.skipped_steps += 1
                return loss

        # Nothing is written yet: create the state each group needs and check every tensor the step touches.
        created: list = []
        try:
            ready = [self._ready(*entry, created) for entry in plan]
        except BaseException:
            for mapping, key in reversed(created):  # the state this step created, taken back
                del mapping[key]
            raise
        if norm is not None:
            local_grads = [distributed.local(g) for g in grads]
            if self.max_grad_norm is not None:
                self.last_grad_norm = norm.to(report_dtype(local_grads))
                clip_grads_(local_grads, norm, self.max_grad_norm)
        if self.stages_step:
            updates = self._stage_step([(after[0], arguments[2], arguments[3], after[1], entry[3])
                                        for entry, (arguments, _, _, after) in zip(plan, ready)])
            if updates is None:
                return loss
            ready = [((*arguments[:7], {**arguments[7], **update}), keywords, sparse, after)
                     for (arguments, keywords, sparse, after), update in zip(ready, updates)]
        for arguments, keywords, sparse, (group, states, supplied) in ready:
            if sparse is not None:
                self._sparse_update(*sparse)
            if self.transforms_grads and arguments[2]:
                # a stage of torch ops on whole tensors before the elementwise rule (Muon's orthogonalisation):
                # the rule then reads its result as the gradient; the kernels' tables are taken again for it
                program, backend, params, grads, roles, steps, first, scalars = arguments
                arguments = (program, backend, params, self._transform_grads(group, params, grads, states), roles,
                             steps, first, scalars)
                keywords = {**keywords, "partitioned": None}
            engine.run(*arguments, **keywords)
            if supplied is not None:
                self._after_step(group, states, supplied)
        if self.param_update == "stochastic":
            self.rounding_steps += 1
        return loss

    def _ready(self, group, params, grads, sharding, scalars, program, backend, where, created):
        """A group's tensors on one device made ready for :func:`thalweg.engine.run`, every one of them checked."""
        states, first = self._states(params, group, program, created, where)
        rounds = self._rounding(params, states, where, created) if self.param_update != "nearest" else None
        sparse = None
        if any(map(_IS_SPARSE, grads)):
            kept = [i for i, g in enumerate(grads) if not g.is_sparse]
            taken = [i for i, g in enumerate(grads) if g.is_sparse]
            sparse = (group, [params[i] for i in taken], [grads[i] for i in taken],
                      [states[i] for i in taken] if states else [], None if first is None else first[taken])
            where = where.subset(kept)
            params, grads = [params[i] for i in kept], [grads[i] for i in kept]
            states = [states[i] for i in kept] if states else []
            if first is not None:
                first = first[kept]
        roles, quantised = self._role_lists(program, params, states, where)
        steps = [state["step"] for state in states] if self.counts_steps and states else None
        sizes = self._sizes(program, params)
        if sharding is not None:  # (the sizes above are the whole tensors': a DTensor's numel is global)
            local = distributed.local
            params, grads = [local(p) for p in params], [local(g) for g in grads]
            roles = [[local(t) if isinstance(t, torch.Tensor) else t for t in role] for role in roles]
            if rounds is not None:
                rounds.comps = [None if t is None else local(t) for t in rounds.comps]
        try:  # the fused path checks what its kernels touch; only what it leaves to foreach is checked here
            partitioned = engine.partition(backend, params, grads, roles, steps, quantised=quantised)
            unchecked = partitioned[1]
        except (AttributeError, TypeError, RuntimeError):  # a state entry that is not a tensor at all
            partitioned, unchecked = None, range(len(params))
        _check_tensors(where, params, grads, roles, steps, program.state_roles, unchecked)
        self._check_state(where, params, states)
        supplied = None
        if self.rule.supplied:
            supplied = self._per_tensor_values(group, states, params, sizes, where)
            scalars = {**scalars, **supplied}
        arguments = (program, backend, params, grads, roles, steps, first, scalars)
        keywords = dict(sum_across=None if sharding is None else sharding.sum_across_shards_, widen_to=self._float_state,
                        partitioned=partitioned, out_of_place=bool(group.get("differentiable")), quantised=quantised,
                        rounding=rounds)
        return arguments, keywords, sparse, (group, states, supplied)

    def _rounding(self, params: list[torch.Tensor], states: list[dict[str, Any]], where: _Where,
                  created: list) -> rounding.Rounding | None:
        """How ``params`` take their new values with ``param_update`` (None when none is bfloat16): per parameter
        the key and flat offset of its random bits ("stochastic"), or its compensation buffer ("kahan"), created
        here where missing (a new run, a checkpoint of another mode). Called before anything is written."""
        dtypes = {p.dtype for p in params}
        if torch.float16 in dtypes:
            k = next(k for k, p in enumerate(params) if p.dtype == torch.float16)
            raise RuntimeError(f"{where(k)} is float16: param_update={self.param_update!r} rounds bfloat16 parameters "
                               "(use bfloat16, or param_update='nearest' for float16 ones)")
        if torch.bfloat16 not in dtypes:
            return None
        n = len(params)
        keys, offsets, comps = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64), [None] * n
        if self.param_update == "stochastic":
            first = sum(len(g["params"]) for g in self.param_groups[:where.group_index])
            for k, param in enumerate(params):
                if param.dtype != torch.bfloat16:
                    continue
                keys[k] = rounding.key(self.rounding_steps, first + where.position(k))
                if distributed.is_sharded(param):
                    offset = distributed.flat_offset(param)
                    if offset is None:
                        raise NotImplementedError(f"{where(k)}: param_update='stochastic' needs parameters sharded on "
                                                  f"dim 0 (as FSDP2 shards), got placements {tuple(param.placements)}")
                    offsets[k] = offset
            return rounding.Rounding("stochastic", keys, offsets, comps)
        for k, param in enumerate(params):
            if param.dtype != torch.bfloat16:
                continue
            state = states[k] if states else self.state.get(param)
            if state is None:  # (a rule without state: SGD without momentum)
                state = self.state[param] = {}
                created.append((self.state, param))
            comp = state.get(_KAHAN)
            if comp is None:
                comp = state[_KAHAN] = torch.zeros_like(param, memory_format=torch.contiguous_format)
                created.append((state, _KAHAN))
            elif not (isinstance(comp, torch.Tensor) and comp.dtype == torch.bfloat16 and comp.shape == param.shape
                      and comp.device == param.device):
                raise RuntimeError(f"{where(k)}: state[{_KAHAN!r}] is "
                                   f"{_describe(comp) if isinstance(comp, torch.Tensor) else type(comp).__name__} but "
                                   f"the parameter is {_describe(param)}")
            elif not distributed.local(comp).is_contiguous():  # (the kernels write it through its address)
                comp = state[_KAHAN] = comp.contiguous()
            comps[k] = comp
        return rounding.Rounding("kahan", keys, offsets, comps)

    def _check_grad(self, param: torch.Tensor, grad: torch.Tensor, group_index: int, group: dict[str, Any]) -> None:
        # Called for every gradient of a group that has a sparse one. Shape, dtype and device need no
        # check: torch's ``.grad`` setter and autograd already refuse a gradient that differs from its
        # parameter in any of them; sparsity is what torch lets through.
        if grad.is_sparse and not self.accepts_sparse_grads:
            # Located only on failure: the search is linear in the group's size.
            raise RuntimeError(
                f"parameter {_position(group, param)} of param group {group_index}: {type(self).__name__} does not "
                "support sparse gradients; use thalweg.SGD or thalweg.Adagrad, or a dense layer "
                "(e.g. nn.Embedding(sparse=False))"
            )
        if grad.is_sparse and self.state_dtype == "int8" and type(self)._sparse_update is not Optimizer._sparse_update:
            raise RuntimeError(
                f"state_dtype='int8' cannot be used with sparse gradients (param group {group_index}): "
                f"{type(self).__name__} updates only a sparse gradient's rows, and an 8-bit block spans rows; use "
                "state_dtype=None for a model with sparse embeddings"
            )
        if grad.is_sparse and self.param_update != "nearest":
            raise RuntimeError(
                f"param_update={self.param_update!r} cannot be used with sparse gradients (param group {group_index}): "
                f"{type(self).__name__} updates only a sparse gradient's rows; use param_update='nearest' for a model "
                "with sparse embeddings"
            )
        if grad.is_sparse and group.get("cautious"):
            raise RuntimeError(
                f"cautious=True cannot be used with sparse gradients (param group {group_index}): its mask compares "
                "the step with the gradient on every row; put the embedding in a group with cautious=False"
            )
        if grad.is_sparse and group.get("weight_decay", 0) != 0:  # torch fails deep inside (add(sparse, dense))
            raise RuntimeError(
                f"weight_decay={group['weight_decay']} cannot be used with sparse gradients (param group "
                f"{group_index}): it would touch every row; put the embedding in a group with weight_decay=0"
            )


def _blockwise(codes: torch.Tensor, absmax: torch.Tensor, param: torch.Tensor, signed: bool) -> codec.Blockwise:
    """The 8-bit state ``codes`` and ``absmax`` of ``param`` as the engine steps it; for a DTensor, this process's
    shard, with its offset in the whole tensor and the collective that makes a block's absmax the whole block's."""
    if not distributed.is_sharded(param):
        return codec.Blockwise(codes, absmax, signed)
    offset, max_across = distributed.shard_layout(param)
    return codec.Blockwise(distributed.local(codes), distributed.local(absmax), signed, offset, max_across)


def _encoded(value: torch.Tensor, param: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, absmax)`` of a new state tensor of ``param``; for a DTensor, the blocks are the whole tensor's
    (a collective: every process creates the state of the same parameters in the same step)."""
    if not distributed.is_sharded(param):
        return codec.encode(value, signed)
    offset, max_across = distributed.shard_layout(param)
    codes, absmax = codec.encode_shard(distributed.local(value), signed, offset, codec.n_blocks(param.numel()),
                                       max_across)
    return distributed.shard_like(param, codes), distributed.replicated_like(param, absmax)


def _position(group: dict[str, Any], param: torch.Tensor) -> int:
    for index, candidate in enumerate(group["params"]):
        if candidate is param:
            return index
    return -1


def _split_by_device(params: list[torch.Tensor]) -> list[tuple[torch.device, list[int] | None]]:
    """``[(device, positions)]`` per device, in first-seen order; one entry with ``None`` (all positions, in
    order) in the usual case, told without building a device object per tensor."""
    if all(map(_IS_CPU, params)):
        return [(_CPU, None)] if params else []
    devices = {p.device for p in params}
    if len(devices) <= 1:
        return [(devices.pop(), None)] if devices else []
    split: dict[torch.device, list[int]] = {}
    for index, param in enumerate(params):
        split.setdefault(param.device, []).append(index)
    return list(split.items())


class _Where:
    """How errors name a stepped parameter: its param group, its position there, its name when known."""

    __slots__ = ("group_index", "group", "positions")

    def __init__(self, group_index: int, group: dict[str, Any], positions: list[int] | None,
                 indices: list[int] | None) -> None:
        self.group_index, self.group = group_index, group
        if indices is not None:
            positions = [indices[k] if positions is None else positions[indices[k]] for k in range(len(indices))]
        self.positions = positions

    def subset(self, kept: list[int]) -> "_Where":
        narrowed = _Where(self.group_index, self.group, None, None)
        narrowed.positions = [self.position(k) for k in kept]
        return narrowed

    def position(self, k: int) -> int:
        return k if self.positions is None else self.positions[k]

    def __call__(self, k: int) -> str:
        position = self.position(k)
        names = self.group.get("param_names")
        name = f" ({names[position]!r})" if names and position < len(names) else ""
        return f"param group {self.group_index}, params[{position}]{name}"


def _name(where, k: int) -> str:
    return where(k) if where is not None else f"params[{k}]"


def _check_tensors(where: _Where, params, grads, roles, steps, role_names, positions) -> None:
    """Raise, naming the parameter and the entry, for a gradient or state tensor the step cannot use."""
    for k in positions:
        param, grad = params[k], grads[k]
        if grad.shape != param.shape or grad.dtype != param.dtype or grad.device != param.device:
            raise RuntimeError(f"{where(k)}: its gradient is a {_describe(grad)} tensor but the parameter is "
                               f"{_describe(param)} (was p.grad.data or p.data assigned?)")
        for role, tensors in zip(role_names, roles):
            value = tensors[k]
            if isinstance(value, codec.Blockwise):  # (checked when it was made)
                continue
            if not isinstance(value, torch.Tensor):
                raise RuntimeError(f"{where(k)}: state[{role!r}] is {type(value).__name__}, not a tensor")
            if value.shape != param.shape or value.device != param.device or not value.is_floating_point():
                raise RuntimeError(f"{where(k)}: state[{role!r}] is a {_describe(value)} tensor but the parameter is "
                                   f"{_describe(param)}")
        if steps is not None and not (isinstance(steps[k], torch.Tensor) and steps[k].numel() == 1):
            raise RuntimeError(f"{where(k)}: state['step'] is {steps[k]!r}, not a one-element tensor")


def _check_scalar_state(where: _Where, states: list[dict[str, Any]], keys) -> None:
    """Raise, naming the parameter, for a scalar state entry (NAdam's ``mu_product``...) that is not a number."""
    for k, state in enumerate(states):
        for key in keys:
            value = state.get(key)
            if not (isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point()):
                raise RuntimeError(f"{where(k)}: state[{key!r}] is {value!r}, not a one-element float tensor")


def _describe(tensor: torch.Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')} {tensor.device}"


def global_grad_norm(grads: list[torch.Tensor], *, fused_cpu: bool = False) -> torch.Tensor:
    """The L2 norm of all gradients together, accumulated in float64 on every backend (a 0-d float64 tensor;
    no host sync).

    float64 accumulation makes "non-finite" mean one thing whatever the backend: a gradient holds a NaN or an
    infinity. Finite float32 gradients whose sum of squares would overflow float32 (entries around 1e20)
    have a finite norm, so ``skip_nonfinite`` takes the step and ``max_grad_norm`` clips by it. With
    ``fused_cpu`` (the step runs the fused backend on CPU), dense CPU gradients are summed by one kernel
    call per dtype instead of torch's foreach norm, which loops over the tensors on CPU.
    """
    dense = [g for g in grads if not g.is_sparse]
    squares = []  # float64 sums of squares
    if fused_cpu:
        from .engine import cpu as fused_kernels

        on_cpu = [g for g in dense if g.is_cpu]
        squares, fallback = fused_kernels.sum_of_squares(on_cpu)
        dense = [on_cpu[i] for i in fallback] + [g for g in dense if not g.is_cpu]
    device = grads[0].device
    for (bucket,) in group_by_device_and_dtype([dense]):
        norms = torch.stack(torch._foreach_norm(bucket, 2, dtype=torch.float64))
        squares.append(norms.square().sum())
    for grad in grads:
        if grad.is_sparse:
            squares.append(torch.linalg.vector_norm(grad.coalesce()._values(), dtype=torch.float64).square())
    return torch.stack([s.to(device) for s in squares]).sum().sqrt()


def report_dtype(grads: list[torch.Tensor]) -> torch.dtype:
    """The dtype ``last_grad_norm`` is reported in, as torch.nn.utils.clip_grad_norm_ returns it."""
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


def clip_grads_(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale ``grads`` in place so that their global norm is at most ``max_norm`` (torch's clip_grad_norm_ rule)."""
    coefficient = torch.clamp(max_norm / (norm + _CLIP_EPS), max=1.0)
    for (bucket,) in group_by_device_and_dtype([[g for g in grads if not g.is_sparse]]):
        torch._foreach_mul_(bucket, coefficient.to(device=bucket[0].device, dtype=bucket[0].dtype))
    for grad in grads:
        if grad.is_sparse:
            grad.mul_(coefficient.to(device=grad.device, dtype=grad.dtype))


def group_by_device_and_dtype(tensor_lists: list[list[torch.Tensor]]) -> list[list[list[torch.Tensor]]]:
    """Split parallel tensor lists into buckets whose first list shares one device and dtype
    (``torch._foreach_*`` needs one device and dtype per call), each in the original order."""
    order: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(tensor_lists[0]):
        order.setdefault((tensor.device, tensor.dtype), []).append(index)
    return [[[tensors[i] for i in indices] if tensors else [] for tensors in tensor_lists]
            for indices in order.values()]
