"""The one place that decides every parameter's kind: frozen, global or local.

Rules are module prefixes registered when the model is assembled (the backbone is frozen,
an adapter registers itself as global or local); the longest matching prefix wins, so the
partition is complete and disjoint by construction. Everything that sends, receives,
aggregates or filters parameters asks this registry -- never the parameter names.
"""

from __future__ import annotations

from collections import OrderedDict
from enum import Enum

import torch
from torch import nn


class ParamKind(str, Enum):
    FROZEN = "frozen"
    GLOBAL = "global"
    LOCAL = "local"


class RegistryError(ValueError):
    """A state does not fit the registry (unknown, missing, local-in-global or mis-shaped keys)."""


class ParameterRegistry:
    """Maps each parameter name of a model to its ParamKind.

    Arguments:
      model (nn.Module): the assembled model.
      rules (list): ``(prefix, kind)`` pairs; ``""`` is the default rule. A prefix matches a
        parameter name equal to it or starting with ``prefix + "."``.
    """

    def __init__(self, model: nn.Module, rules: list[tuple[str, ParamKind]]) -> None:
        self._rules = sorted(rules, key=lambda r: len(r[0]), reverse=True)
        self._kinds: dict[str, ParamKind] = OrderedDict()
        for name, _ in model.named_parameters():
            self._kinds[name] = self._resolve(name)

    def _resolve(self, name: str) -> ParamKind:
        for prefix, kind in self._rules:
            if prefix == "" or name == prefix or name.startswith(prefix + "."):
                return ParamKind(kind)
        raise RegistryError(f"parameter '{name}' matches no registry rule")

    def kind(self, name: str) -> ParamKind:
        if name not in self._kinds:
            raise RegistryError(f"'{name}' is not a parameter of this model")
        return self._kinds[name]

    def names(self, kind: ParamKind | str) -> list[str]:
        kind = ParamKind(kind)
        return sorted(n for n, k in self._kinds.items() if k == kind)

    def all_names(self) -> list[str]:
        return list(self._kinds)

    def counts(self, model: nn.Module) -> dict[str, dict[str, int]]:
        """Parameter counts and bytes by kind."""
        params = dict(model.named_parameters())
        counts = {k.value: 0 for k in ParamKind}
        nbytes = {k.value: 0 for k in ParamKind}
        for name, kind in self._kinds.items():
            p = params[name]
            counts[kind.value] += p.numel()
            nbytes[kind.value] += p.numel() * p.element_size()
        return {"params": counts, "bytes": nbytes}

    def set_trainable(self, model: nn.Module, kinds: set[ParamKind]) -> None:
        """requires_grad = True exactly for parameters of the given kinds (frozen never)."""
        kinds = {ParamKind(k) for k in kinds} - {ParamKind.FROZEN}
        for name, p in model.named_parameters():
            p.requires_grad_(self._kinds[name] in kinds)


def _registry(model: nn.Module) -> ParameterRegistry:
    reg = getattr(model, "registry", None)
    if not isinstance(reg, ParameterRegistry):
        raise RegistryError(f"{type(model).__name__} has no parameter registry")
    return reg


def _state_of(model: nn.Module, kind: ParamKind) -> OrderedDict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return OrderedDict((n, params[n].detach().cpu().clone()) for n in _registry(model).names(kind))


def global_state(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Only the global parameters (what may leave a site), detached CPU copies."""
    return _state_of(model, ParamKind.GLOBAL)


def local_state(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Only the local (L-MoE) parameters, detached CPU copies."""
    return _state_of(model, ParamKind.LOCAL)


def check_state(model: nn.Module, state: dict, kind: ParamKind | str, source: str = "state") -> None:
    """Raise RegistryError unless ``state`` has exactly the parameters of ``kind`` with the right shapes."""
    kind = ParamKind(kind)
    reg = _registry(model)
    expected = set(reg.names(kind))
    given = set(state)
    foreign = sorted(given - expected)
    if foreign:
        kinds = {n: (reg.kind(n).value if n in reg.all_names() else "unknown") for n in foreign[:3]}
        raise RegistryError(f"{source}: {len(foreign)} key(s) that are not {kind.value} parameters: {kinds}")
    missing = sorted(expected - given)
    if missing:
        raise RegistryError(f"{source}: {len(missing)} {kind.value} parameter(s) missing, e.g. '{missing[0]}'")
    params = dict(model.named_parameters())
    for name in sorted(given):
        shape = tuple(torch.as_tensor(state[name]).shape)
        if shape != tuple(params[name].shape):
            raise RegistryError(f"{source}: '{name}' has shape {shape}, expected {tuple(params[name].shape)}")


def _load(model: nn.Module, state: dict, kind: ParamKind, source: str) -> None:
    check_state(model, state, kind, source)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            tensor = torch.as_tensor(value)
            if not torch.isfinite(tensor).all():
                raise RegistryError(f"{source}: '{name}' contains NaN or Inf")
            params[name].copy_(tensor.to(params[name].dtype))


def load_global_state(model: nn.Module, state: dict, source: str = "global state") -> None:
    """Load exactly the global parameters (tensors or numpy arrays); anything else is an error."""
    _load(model, state, ParamKind.GLOBAL, source)


def load_local_state(model: nn.Module, state: dict, source: str = "local state") -> None:
    """Load exactly the local parameters; anything else is an error."""
    _load(model, state, ParamKind.LOCAL, source)
