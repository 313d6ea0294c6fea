"""grumpy: the Gated Recurrent Unit in NumPy, with backpropagation through time by hand."""

from grumpy.cell import GRUCell, gru_cell_backward, gru_cell_forward
from grumpy.estimators import GRUClassifier, GRURegressor, forecast_windows
from grumpy.kernels import gru_sequence_backward, gru_sequence_forward
from grumpy.layers import GRU, gru_backward, gru_forward
from grumpy.quantized import quantize
from grumpy.rnn import RNN, rnn_backward, rnn_forward, rnn_sequence_backward, rnn_sequence_forward
from grumpy.stream import GRUStream

__version__ = "0.1.0"

__all__ = [
    "GRU",
    "GRUCell",
    "GRUClassifier",
    "GRURegressor",
    "GRUStream",
    "RNN",
    "forecast_windows",
    "gru_backward",
    "gru_cell_backward",
    "gru_cell_forward",
    "gru_forward",
    "gru_sequence_backward",
    "gru_sequence_forward",
    "quantize",
    "rnn_backward",
    "rnn_forward",
    "rnn_sequence_backward",
    "rnn_sequence_forward",
]
