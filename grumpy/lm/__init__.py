"""The character-level language-model tool, built on the library (nothing here is imported by it).

==============  ===============================================================
``config``      the model's shape and a training run's settings
``model``       embedding -> GRU stack -> linear head; softmax cross-entropy
``data``        the vocabulary, the text, the streams of training windows
``checkpoint``  one safetensors file per checkpoint, written atomically
``run``         a run's state: started fresh or from a checkpoint, saved
``loop``        :func:`train`, top to bottom
``report``      messages, the progress bar, metrics.jsonl, loss.png
``generate``    the loss of a text, text sampled from a model
==============  ===============================================================
"""

from grumpy.lm.config import ModelConfig, TrainConfig
from grumpy.lm.generate import estimate_loss, evaluate, sample
from grumpy.lm.loop import TrainResult, train
from grumpy.lm.model import CharModel

__all__ = ["CharModel", "ModelConfig", "TrainConfig", "TrainResult", "estimate_loss", "evaluate", "sample", "train"]
