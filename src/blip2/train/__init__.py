"""Training BLIP-2: stage 1 (Q-Former representation learning: ITC, ITM, ITG) and stage 2 (the language-model
loss through the language model), from a YAML config (`blip2 train CONFIG.yaml`) or Python:

    from blip2.train import new_checkpoint, train
    train("stage1.yaml")             # -> run_dir/output, a checkpoint blip2.load and transformers read

See `blip2.train.config` for the config's fields, `losses` for the math, `loop` for the loop.
"""

from .config import TrainConfig, TrainConfigError, load_config
from .export import new_checkpoint
from .loop import train

__all__ = ["TrainConfig", "TrainConfigError", "load_config", "new_checkpoint", "train"]
