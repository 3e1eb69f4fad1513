"""arbfn: a true-ternary ARB network as pure functions over an explicit pytree of packed integer state."""

from arbfn.audit import audit
from arbfn.checkpoint import load, save
from arbfn.config import Config, ModelConfig, TrainConfig, UpdateConfig, preset
from arbfn.model import State, apply_model, init_model
from arbfn.train import train_step

__all__ = ["Config", "ModelConfig", "State", "TrainConfig", "UpdateConfig", "apply_model", "audit",
           "init_model", "load", "preset", "save", "train_step"]
