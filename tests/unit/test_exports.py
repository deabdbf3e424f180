"""Every public module of ours has an explicit ``__all__``: each listed name exists, and
each public class or function defined in the module is listed (nothing public by accident)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import aggregator
import common
import deploy
import gateway
import wsmanager

PACKAGES = [common, gateway, aggregator, deploy, wsmanager]


def _public_modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + "."):
            parts = info.name.split(".")
            if "contracts" in parts or any(p.startswith("_") for p in parts[1:]):
                continue
            names.append(info.name)
    return sorted(names)


def _module(name: str) -> ModuleType:
    return importlib.import_module(name)


@pytest.mark.parametrize("name", _public_modules())
def test_module_declares_all_and_every_name_exists(name: str) -> None:
    module = _module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ lists names that do not exist: {missing}"
    assert len(exported) == len(set(exported)), f"{name}.__all__ has duplicates"


@pytest.mark.parametrize("name", _public_modules())
def test_public_definitions_are_exported(name: str) -> None:
    module = _module(name)
    exported = set(getattr(module, "__all__", ()))
    unlisted = [
        attr
        for attr, value in vars(module).items()
        if not attr.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and getattr(value, "__module__", None) == name
        and attr not in exported
    ]
    assert not unlisted, f"{name} defines public names missing from __all__: {unlisted}"
