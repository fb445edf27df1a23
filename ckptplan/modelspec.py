"""Load a model from a spec string: ``path/to/file.py:factory`` or ``package.module:factory``.

A factory returns ``(model, args)`` or ``(model, args, kwargs)``; ``model(*args, **kwargs)`` is one
training step's forward. Every way this can go wrong raises InputError saying what to fix.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from .errors import InputError
from .safeyaml import NoAliasLoader

if TYPE_CHECKING:
    from torch import nn

BUNDLED_EXAMPLE = "examples/gpt2.py:gpt2_small"


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadedModel:
    name: str  # the factory name, used for default file names
    model: nn.Module
    args: tuple
    kwargs: dict


def bundled_example() -> str:
    """The GPT-2-small-shaped example next to the package (a source checkout or editable install)."""
    root = Path(__file__).resolve().parent.parent
    path = root / "examples" / "gpt2.py"
    if not path.exists():
        raise InputError(
            "the bundled example examples/gpt2.py is not next to this installation; "
            "pass --model path/to/file.py:factory"
        )
    return f"{path}:gpt2_small"


def parse_factory_args(items: list[str]) -> dict[str, Any]:
    """``["batch_size=4", "seq_len=512"]`` -> ``{"batch_size": 4, "seq_len": 512}`` (YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise InputError(f"--arg {item!r} must look like name=value, e.g. --arg batch_size=4")
        try:
            out[key] = yaml.load(value, Loader=NoAliasLoader)  # safe_load without aliases
        except yaml.YAMLError:
            out[key] = value
        except (ValueError, RecursionError) as e:  # an integer past Python's digit limit; nesting too deep
            raise InputError(f"--arg {key}=...: {str(e).splitlines()[0] if str(e) else 'nested too deep'}") from None
    return out


def load_model(spec: str, factory_kwargs: dict[str, Any] | None = None) -> LoadedModel:
    """Import the spec's factory and call it with ``factory_kwargs``."""
    return call_factory(*load_factory(spec), factory_kwargs)


def load_factory(spec: str) -> tuple[str, Callable[..., Any]]:
    """(name, factory) of a spec, imported but not called."""
    from . import _compat  # noqa: F401  torch, checked: imported here so the CLI's --help needs none of it

    target, sep, factory_name = spec.rpartition(":")
    if not sep or not target or not factory_name.isidentifier():
        raise InputError(f"model spec {spec!r} must be path/to/file.py:factory or package.module:factory")
    module = _import(target)
    factory = getattr(module, factory_name, None)
    if factory is None or not callable(factory):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[:12]
        raise InputError(f"{target} has no callable {factory_name!r}; callables there: {', '.join(found)}")
    return factory_name, factory


def check_factory_argument(name: str, factory: Callable[..., Any], argument: str) -> None:
    """Refuse ``argument`` unless ``factory`` takes a keyword argument of that name (or any, **kwargs)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): calling it will tell
        return
    if argument in params and params[argument].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.VAR_POSITIONAL,
    ):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    takes = [
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    raise InputError(
        f"the factory {name} takes no argument {argument!r}; it takes: {', '.join(takes) or 'no keyword arguments'}"
    )


def call_factory(
    factory_name: str, factory: Callable[..., Any], factory_kwargs: dict[str, Any] | None = None
) -> LoadedModel:
    """Call a factory and check what it returns: (model, args) or (model, args, kwargs)."""
    from torch import nn

    try:
        result = factory(**(factory_kwargs or {}))
    except TypeError as e:
        raise InputError(f"calling {factory_name}({_fmt(factory_kwargs)}) failed: {e}") from None
    except (Exception, SystemExit) as e:  # a user's factory may raise anything; say which and why
        raise InputError(f"the factory {factory_name} raised {_what(e)}") from None
    if not isinstance(result, tuple) or len(result) not in (2, 3) or not isinstance(result[0], nn.Module):
        raise InputError(
            f"the factory {factory_name} must return (model, args) or (model, args, kwargs) "
            f"with an nn.Module first; it returned {type(result).__name__}"
        )
    args = result[1]
    kwargs = result[2] if len(result) == 3 else {}
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
        raise InputError(f"the factory {factory_name} must return args as a tuple and kwargs as a dict")
    return LoadedModel(name=factory_name, model=result[0], args=tuple(args), kwargs=kwargs)


def _import(target: str) -> Any:
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise InputError(f"model file {target} does not exist")
        name = f"_ckptplan_model_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise InputError(f"cannot import {target} as a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as e:  # a script's sys.exit() must not end ckptplan
            del sys.modules[name]
            raise InputError(f"importing {target} raised {_what(e)}") from None
        return module
    try:
        return importlib.import_module(target)
    except ImportError as e:
        raise InputError(f"cannot import module {target!r}: {e}") from None
    except (Exception, SystemExit) as e:
        raise InputError(f"importing {target} raised {_what(e)}") from None


def _what(e: BaseException) -> str:
    if isinstance(e, SystemExit):  # sys.exit() in a model file: its code would read as one of ckptplan's
        return f'SystemExit({e.code!r}): it calls sys.exit(); guard its script part with `if __name__ == "__main__":`'
    return f"{type(e).__name__}: {e}"


def _fmt(kwargs: dict[str, Any] | None) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in (kwargs or {}).items())
