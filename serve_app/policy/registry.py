"""One registry for every pluggable policy kind.

A policy class registers itself by name when it is defined::

    class EmailDetector(PiiDetector, name="email"): ...

Config names policies; ``make(base, name, params)`` builds one with its typed,
strict parameter model, and an unknown name fails at start-up with the list
of known ones.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict

from serve_app.errors import ConfigError


class PolicyParams(BaseModel):
    """Base of every policy's parameter model: strict, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Policy:
    """Base of registrable policies. Each direct subclass of Policy is a *kind* with its own namespace."""

    kind: ClassVar[str] = "policy"
    name: ClassVar[str] = ""
    Params: ClassVar[type[PolicyParams]] = PolicyParams
    _registry: ClassVar[dict[str, type["Policy"]]]

    def __init_subclass__(cls, name: str | None = None, kind: str | None = None, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if kind is not None:
            cls.kind = kind
            cls._registry = {}
        if name is not None:
            if name in cls._registry:
                raise TypeError(f"{cls.kind} policy {name!r} is registered twice")
            cls.name = name
            cls._registry[name] = cls

    def __init__(self, params: PolicyParams | None = None):
        self.params = params if params is not None else self.Params()

    @classmethod
    def registered(cls) -> list[str]:
        return sorted(cls._registry)


P = TypeVar("P", bound=Policy)


def make(base: type[P], name: str, params: dict[str, Any] | None = None) -> P:
    """Build the ``base``-kind policy registered as ``name`` with validated ``params``."""
    policy_cls = base._registry.get(name)
    if policy_cls is None:
        raise ConfigError(f"Unknown {base.kind} policy {name!r}; known: {', '.join(base.registered())}")
    from pydantic import ValidationError

    try:
        typed = policy_cls.Params.model_validate(params or {})
    except ValidationError as exc:
        raise ConfigError(f"invalid parameters for {base.kind} policy {name!r}: {exc}") from None
    return policy_cls(typed)
