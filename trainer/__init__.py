"""trainer: everything one training run needs, and nothing about search.

Owns the data (CIFAR-100, digits, synthetic; held as uint8 tensors on the device), batched
per-sample augmentation, the LeNet-5 model, the optimisers (AdamW, SGDM, LARS, LAMB), the lr
schedule and the training loop `train(config, on_epoch)`. It imports neither Optuna nor MLflow:
the per-epoch callback is the only seam to the search half. Its modules, without import
cycles (tests/test_structure.py):

    errors     ConfigError, DataError (no torch: the command line catches them)
    catalogue  every dataset's name, sizes, classes and source; the data root
    folder     a `folder:PATH` dataset read as arrays
    config     TrainConfig: every knob, defaults = the notes' baseline; the checkpoint format
    data       datasets by name, the stratified validation split, tensors on the device
    networks   the `model` setting: any network built, checked, its initial state, the logged model
    divergence when a run has diverged
    augment, model, optim, stacked_optim, schedule, runtime, engine, loop, local
"""

from trainer.config import TrainConfig

__all__ = ["Diverged", "TrainConfig", "TrainResult", "replay", "train"]


def __getattr__(name: str):
    # torch loads only when training is asked for: `search validate` and `--help` stay fast
    if name in ("Diverged", "TrainResult", "replay", "train"):
        from trainer import loop

        return getattr(loop, name)
    raise AttributeError(name)
