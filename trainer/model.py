"""LeNet-5 as in Hsu et al. 2020 (the notes' model): 815,332 parameters for 100 classes."""

from __future__ import annotations

import functools

import torch
from torch import nn

from trainer.augment import prepare_eval


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 100):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 5 * 5, 384), nn.ReLU(inplace=True),
            nn.Linear(384, 192), nn.ReLU(inplace=True),
            nn.Linear(192, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@functools.lru_cache(maxsize=8)
def initial_parameters(seed: int, num_classes: int) -> dict[str, torch.Tensor]:
    """A fresh LeNet-5's parameters for `seed` (torch's own initialisation, on the CPU), made
    once per seed: the trials of a study mostly share one seed, and drawing 815k numbers is
    most of a trial's start. Read-only by contract: every caller copies before training."""
    with torch.random.fork_rng(devices=[]):  # only the CPU generator (torch.manual_seed would
        torch.default_generator.manual_seed(seed)  # seed, and queue seeds for, every device)
        init = LeNet5(num_classes)
    return {n: p.detach() for n, p in init.named_parameters()}


class ImageClassifier(nn.Module):
    """LeNet-5 behind the trainer's own input normalisation: takes uint8 images (N, 3, 32, 32)
    as stored on disk and returns logits, so a logged model needs no preprocessing code."""

    def __init__(self, net: LeNet5):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(prepare_eval(images))


def from_checkpoint(state: dict, num_classes: int) -> ImageClassifier:
    """The model of a trial's checkpoint (`Engine.state`); local methods' K worker copies are
    averaged, as their final communication round would."""
    net = LeNet5(num_classes)
    net.load_state_dict({name: rows.float().mean(0) for name, rows in state["params"].items()})
    return ImageClassifier(net.eval())
