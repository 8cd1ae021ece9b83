"""The network a run trains, named by the `model` setting, built with its `model_args`:

    lenet5                   the notes' LeNet-5 (`trainer.model`), the default
    torchvision:NAME         a torchvision classification builder (resnet18, mobilenet_v3_small,
                             ...), fresh weights: nothing is downloaded
    PATH.py:FUNCTION         a function in the user's file (a relative PATH: the current
                             directory's; the search half makes it absolute first)
    package.module:FUNCTION  a function in an importable module

A factory is called as `FUNCTION(num_classes=C, **model_args)` and returns an `nn.Module` mapping
a float image batch (B, 3, H, W) to (B, C) logits. Every problem -- a file, module or function
that does not exist, an argument the factory does not take, a factory that raises, an output
that is not (B, C) logits -- is one ConfigError naming the spec, before any training.

`packable` says whether the engine can run a network's rows as one batched model
(`torch.func.vmap` over `functional_call`): one dry step on two rows, on the CPU.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.augment import prepare_eval
from trainer.catalogue import IMAGE_SHAPE
from trainer.errors import ConfigError
from trainer.model import LeNet5

DEFAULT = "lenet5"


def args_key(model_args: dict[str, Any]) -> tuple:
    """`model_args` as a hashable, ordered key (packs and caches compare it)."""
    return tuple(sorted(model_args.items()))


def _from_file(path: str, function: str, spec: str) -> Callable[..., nn.Module]:
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise ConfigError(f"model {spec}: no such file {file}")
    name = _module_name(file)
    module = sys.modules.get(name)
    if module is None:
        loader = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(loader)
        sys.modules[name] = module  # pickling a model built from it finds its classes
        try:
            loader.loader.exec_module(module)
        except Exception as exc:  # the user's file: any error is theirs to read, in one line
            sys.modules.pop(name, None)
            raise ConfigError(f"model {spec}: {file.name} raised {type(exc).__name__}: {exc}") from None
    found = getattr(module, function, None)
    if not callable(found):
        raise ConfigError(f"model {spec}: {file.name} has no function {function!r}")
    return found


def user_module(spec: str) -> Any:
    """The loaded module of a `PATH.py:FUNCTION` network (after `build`), else None."""
    location, sep, _ = str(spec).rpartition(":")
    if not sep or not location.endswith(".py"):
        return None
    return sys.modules.get(_module_name(Path(location).expanduser().resolve()))


def _module_name(file: Path) -> str:
    """A user's file as a module: a name of its own per path (two files may share a name)."""
    return "search_user_model_" + hashlib.sha1(str(file).encode()).hexdigest()[:12]


def _from_module(module_name: str, function: str, spec: str) -> Callable[..., nn.Module]:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"model {spec}: cannot import {module_name} ({exc})") from None
    found = getattr(module, function, None)
    if not callable(found):
        raise ConfigError(f"model {spec}: {module_name} has no function {function!r}")
    return found


def _torchvision(name: str, spec: str) -> Callable[..., nn.Module]:
    from torchvision import models

    names = models.list_models(module=models)  # classification builders only
    if name not in names:
        near = [n for n in sorted(names) if n[:3] == name[:3]] or sorted(names)[:8]
        raise ConfigError(f"model {spec}: not a torchvision classification model (e.g. "
                          f"{', '.join(near[:8])}; all: torchvision.models.list_models())")
    builder = models.get_model_builder(name)
    return functools.partial(builder, weights=None)


def factory(spec: str) -> Callable[..., nn.Module]:
    """The function that builds the network `spec` names."""
    spec = str(spec).strip()
    if spec == "lenet5":
        return LeNet5
    kind, sep, rest = spec.partition(":")
    if not sep or not kind or not rest:
        raise ConfigError(f"model {spec!r}: expected lenet5, torchvision:NAME, PATH.py:FUNCTION "
                          "or package.module:FUNCTION")
    if kind == "torchvision":
        return _torchvision(rest, spec)
    location, _, function = spec.rpartition(":")
    if location.endswith(".py"):
        return _from_file(location, function, spec)
    return _from_module(location, function, spec)


def _check_args(make: Callable[..., nn.Module], spec: str, model_args: dict[str, Any]) -> None:
    target = make.func if isinstance(make, functools.partial) else make
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin: let the call say
        return
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    takes = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if "num_classes" not in takes:
        raise ConfigError(f"model {spec}: its factory must take num_classes= (it takes "
                          f"{', '.join(takes) or 'nothing'})")
    for key in model_args:
        if key not in takes:
            raise ConfigError(f"model_args.{key}: not an argument of {spec} (it takes "
                              f"{', '.join(t for t in takes if t != 'num_classes') or 'nothing else'})")


def build(spec: str, num_classes: int, model_args: dict[str, Any] | None = None) -> nn.Module:
    """A fresh network (torch's own initialisation from the current generator)."""
    model_args = dict(model_args or {})
    make = factory(spec)
    _check_args(make, spec, model_args)
    try:
        model = make(num_classes=num_classes, **model_args)
    except Exception as exc:  # the user's factory: one line, whatever it raised
        raise ConfigError(f"model {spec}: its factory raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {spec}: its factory returned {type(model).__name__}, not a "
                          "torch.nn.Module")
    return model


def check_output(model: nn.Module, spec: str, num_classes: int, image_shape: tuple[int, ...]) -> None:
    """Raises ConfigError unless a batch of two images gives (2, num_classes) logits."""
    x = torch.zeros(2, *image_shape)
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as exc:
        raise ConfigError(f"model {spec}: a batch of 2 images {tuple(x.shape)} failed: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    finally:
        model.train()
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model {spec}: returned {shape} for a batch of 2 images; expected "
                          f"(2, {num_classes}) logits")


def packable(model: nn.Module, image_shape: tuple[int, ...]) -> str | None:
    """None when two rows of the network run as one batched model (a dry training step under
    `torch.func.vmap`, on the device the model is on); else the reason, in one line."""
    from torch.func import functional_call, stack_module_state, vmap

    params, buffers = stack_module_state([model, model])
    device = next(iter(params.values()), torch.empty(0)).device  # the engine asks on its own
    x = torch.zeros(2, 2, *image_shape, device=device)
    y = torch.zeros(2, 2, dtype=torch.long, device=device)

    def loss(p, b, xi, yi):
        out = functional_call(model, {**p, **b}, (xi,))
        return nn.functional.cross_entropy(out, yi)

    try:
        vmap(loss, randomness="different")(params, buffers, x, y).sum().backward()
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{type(exc).__name__}: {text[:200]}"
    return None


def check(spec: str, model_args: dict[str, Any], num_classes: int,
          image_shape: tuple[int, ...] = IMAGE_SHAPE) -> str | None:
    """The preflight of a run's network, on the CPU: built, its output checked (ConfigError,
    one line); returns None when its rows run batched, else the reason they cannot."""
    with torch.random.fork_rng(devices=[]):  # a check draws nothing from the run's generator
        model = build(spec, num_classes, model_args)
    check_output(model, spec, num_classes, image_shape)
    return None if spec == DEFAULT else packable(model, image_shape)


@functools.lru_cache(maxsize=8)
def initial_state(spec: str, model_args: tuple, seed: int, num_classes: int
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A fresh network's (parameters, buffers) for `seed` on the CPU, made once per seed (the
    trials of a study mostly share one seed, and drawing the weights is most of a trial's
    start). Read-only by contract: every caller copies before training."""
    with torch.random.fork_rng(devices=[]):  # only the CPU generator (torch.manual_seed would
        torch.default_generator.manual_seed(seed)  # seed, and queue seeds for, every device)
        net = build(spec, num_classes, dict(model_args))
    return ({n: p.detach() for n, p in net.named_parameters()},
            {n: b.detach() for n, b in net.named_buffers()})


class ImageClassifier(nn.Module):
    """A trained network behind the trainer's own input normalisation: takes uint8 images
    (N, 3, H, W) as stored on disk and returns logits, so a logged model needs no
    preprocessing code."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(prepare_eval(images))


def from_checkpoint(state: dict, num_classes: int, spec: str = DEFAULT,
                    model_args: dict[str, Any] | None = None) -> ImageClassifier:
    """The network of a trial's checkpoint (`Engine.state`); local methods' K worker copies
    are averaged, as their final communication round would (running statistics too; counters
    are the first worker's)."""
    net = build(spec, num_classes, model_args)
    rows = {**state["params"], **state.get("buffers", {})}
    net.load_state_dict({name: t.float().mean(0) if t.is_floating_point() else t[0]
                         for name, t in rows.items()})
    return ImageClassifier(net.eval())
