"""grumpy.interop: weights to and from PyTorch and Keras, exact and checked."""

import os
import subprocess
import sys

import numpy as np
import pytest

from grumpy import GRU
from grumpy import interop

TOL = 1e-5  # float32 agreement with the real frameworks


def bits_equal(a, b) -> bool:
    """Same dtype, shape and bytes: stricter than ==, which treats -0.0 as 0.0."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def randomise(gru: GRU, seed: int) -> GRU:
    """Nonzero values everywhere, biases included, so that every mapping is exercised."""
    rng = np.random.default_rng(seed)
    gru.load_state_dict({k: rng.uniform(-0.8, 0.8, v.shape) for k, v in gru.params.items()})
    return gru


def test_import_grumpy_stays_numpy_only():
    code = (
        "import sys, grumpy, grumpy.interop, grumpy.interop.onnx, grumpy.cli; grumpy.cli.build_parser(); "
        "print(sorted(m for m in ('torch', 'keras', 'onnx', 'onnxruntime', 'safetensors') if m in sys.modules))"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


# -- PyTorch -----------------------------------------------------------------

@pytest.fixture
def torch():
    return pytest.importorskip("torch")

TORCH_FORMS = [  # (num_layers, bidirectional, bias)
    (1, False, True),
    (2, True, True),
    (2, False, False),
    (3, True, False),
]


@pytest.mark.parametrize("num_layers,bidirectional,bias", TORCH_FORMS)
def test_torch_round_trips_are_bitwise(torch, num_layers, bidirectional, bias):
    torch.manual_seed(num_layers)
    t = torch.nn.GRU(3, 5, num_layers, bias=bias, bidirectional=bidirectional)
    g = interop.from_torch(t)
    assert (g.input_size, g.hidden_size, g.num_layers, g.bidirectional, g.bias, g.reset_after) == (
        3, 5, num_layers, bidirectional, bias, True)
    back = interop.to_torch_state_dict(g)
    orig = t.state_dict()
    assert list(back) == list(orig)
    for k in orig:
        assert bits_equal(back[k].numpy(), orig[k].numpy()), k
    t.load_state_dict(back)  # PyTorch accepts it as is

    g2 = randomise(GRU(4, 3, num_layers, bias=bias, bidirectional=bidirectional), seed=5)
    g3 = interop.from_torch(interop.to_torch(g2))
    for k in g2.params:
        assert bits_equal(g3.params[k], g2.params[k]), k


@pytest.mark.parametrize("num_layers,bidirectional,bias", TORCH_FORMS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_torch_outputs_agree(torch, num_layers, bidirectional, bias, batch_first):
    torch.manual_seed(7)
    t = torch.nn.GRU(4, 6, num_layers, bias=bias, bidirectional=bidirectional, batch_first=batch_first)
    g = interop.from_torch(t).eval()
    assert g.batch_first == batch_first
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 7, 4) if batch_first else (7, 3, 4)).astype(np.float32)
    h0 = rng.standard_normal((num_layers * (2 if bidirectional else 1), 3, 6)).astype(np.float32)
    y, h_n = g(x, h0)
    with torch.no_grad():
        ty, th_n = t(torch.from_numpy(x), torch.from_numpy(h0))
    np.testing.assert_allclose(y, ty.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(h_n, th_n.numpy(), atol=TOL, rtol=0)


def test_torch_state_dict_of_numpy_arrays_and_float64(torch):
    t = torch.nn.GRU(2, 3, 2, dtype=torch.float64)
    state = {k: v.numpy() for k, v in t.state_dict().items()}
    g = interop.from_torch_state_dict(state)
    assert g.dtype == np.float64
    assert interop.to_torch(g).weight_ih_l1.dtype == torch.float64
    g32 = interop.from_torch_state_dict(state, dtype=np.float32)
    assert g32.dtype == np.float32
    assert interop.from_torch(torch.nn.GRU(2, 3, 2, dropout=0.25)).dropout == 0.25


def test_torch_safetensors(torch, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    torch.manual_seed(3)
    t = torch.nn.GRU(3, 4, 2, bidirectional=True)
    other = torch.nn.GRU(2, 2)
    path = tmp_path / "model.safetensors"
    tensors = {"rnn." + k: v for k, v in t.state_dict().items()}
    tensors["head.weight"] = torch.zeros(5, 8)
    st.save_file(tensors, str(path))
    g = interop.load_torch_safetensors(path)
    for k, v in t.state_dict().items():
        assert bits_equal(g.params[k], v.numpy()), k

    tensors.update({"enc." + k: v for k, v in other.state_dict().items()})
    st.save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"exactly one GRU.*\['enc\.', 'rnn\.'\]"):
        interop.load_torch_safetensors(path)
    assert interop.load_torch_safetensors(path, prefix="enc.").hidden_size == 2
    with pytest.raises(ValueError, match="no tensor names start with prefix 'dec.'"):
        interop.load_torch_safetensors(path, prefix="dec.")
    with pytest.raises(ValueError, match=r"unexpected keys \['weight'\]"):
        interop.load_torch_safetensors(path, prefix="head.")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        interop.load_torch_safetensors(bad)


def test_torch_bad_input(torch):
    t = torch.nn.GRU(3, 4, 2)
    state = dict(t.state_dict())
    with pytest.raises(ValueError, match="reset_after=False"):
        interop.to_torch_state_dict(GRU(3, 4, reset_after=False))
    with pytest.raises(ValueError, match="expected a torch.nn.GRU, got LSTM"):
        interop.from_torch(torch.nn.LSTM(3, 4))
    missing = {k: v for k, v in state.items() if k != "bias_hh_l1"}
    with pytest.raises(ValueError, match=r"keys \['bias_hh_l1'\] are missing"):
        interop.from_torch_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['gru.extra'\]"):
        interop.from_torch_state_dict({**state, "gru.extra": state["bias_ih_l0"]})
    # A transposed weight is refused, not transposed back.
    with pytest.raises(ValueError, match=r"weight_ih_l0 has shape \(3, 12\), expected \(3H, I\) = \(12, I\)"):
        interop.from_torch_state_dict({**state, "weight_ih_l0": state["weight_ih_l0"].T})
    with pytest.raises(ValueError, match=r"weight_hh_l1 has shape \(12, 3\), expected \(12, 4\)"):
        interop.from_torch_state_dict({**state, "weight_hh_l1": torch.zeros(12, 3)})
    with pytest.raises(ValueError, match="bfloat16"):
        interop.from_torch_state_dict({k: v.bfloat16() for k, v in state.items()})
    with pytest.raises(ValueError, match=r"dtype\(s\) \['float16'\].*dtype=np.float32"):
        interop.from_torch_state_dict({k: v.half() for k, v in state.items()})


# -- Keras -------------------------------------------------------------------

def _keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")  # reuse the installed CPU torch
    return pytest.importorskip("keras")


def to_numpy(t):
    """A backend tensor as NumPy. Not keras.ops.convert_to_numpy or get_weights():
    with the torch backend they call np.array on a tensor, which warns under NumPy 2."""
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def keras_weights(layer):
    return [to_numpy(v.value) for v in layer.weights]


def keras_stack(keras, num_layers, bidirectional, reset_after, use_bias, seed, input_size=3, units=4):
    """Built Keras layers with random nonzero weights (Keras would start biases at zero)."""
    rng = np.random.default_rng(seed)
    layers = []
    x = np.zeros((1, 2, input_size), np.float32)
    for k in range(num_layers):
        last = k == num_layers - 1
        gru = keras.layers.GRU(units, reset_after=reset_after, use_bias=use_bias,
                               return_sequences=True, return_state=last)
        layer = keras.layers.Bidirectional(gru) if bidirectional else gru
        out = layer(x)
        x = out[0] if last else out
        layer.set_weights([rng.uniform(-0.8, 0.8, w.shape).astype(np.float32) for w in keras_weights(layer)])
        layers.append(layer)
    return layers


KERAS_FORMS = [  # (num_layers, bidirectional, reset_after, use_bias)
    (1, False, True, True),
    (1, False, False, True),
    (2, False, True, True),
    (2, False, False, True),
    (2, True, True, True),
    (2, True, False, True),
    (1, False, True, False),
    (2, True, False, False),
]


@pytest.mark.parametrize("num_layers,bidirectional,reset_after,use_bias", KERAS_FORMS)
def test_keras_round_trips_are_bitwise(num_layers, bidirectional, reset_after, use_bias):
    keras = _keras()
    layers = keras_stack(keras, num_layers, bidirectional, reset_after, use_bias, seed=num_layers)
    g = interop.from_keras(layers)
    assert (g.num_layers, g.bidirectional, g.reset_after, g.bias) == (num_layers, bidirectional, reset_after, use_bias)
    back = interop.to_keras_weights(g)
    assert len(back) == num_layers
    for layer, ws in zip(layers, back):
        orig = keras_weights(layer)
        assert len(ws) == len(orig)
        for a, b in zip(ws, orig):
            assert bits_equal(a, b)

    # grumpy -> Keras -> grumpy. Keras' reset-before layer has no recurrent bias,
    # so only a grumpy layer whose recurrent biases are zero comes back bit for bit.
    g2 = randomise(GRU(3, 4, num_layers, bidirectional=bidirectional, reset_after=reset_after, bias=use_bias), 9)
    if use_bias and not reset_after:
        g2.load_state_dict({k: (np.zeros_like(v) if k.startswith("bias_hh") else v) for k, v in g2.params.items()})
    interop.to_keras(g2, layers)
    g3 = interop.from_keras(layers)
    for k in g2.params:
        assert bits_equal(g3.params[k], g2.params[k]), k


def run_keras(layers, x):
    out = x
    for layer in layers:
        out = layer(out)
    y, *states = out
    return to_numpy(y), [to_numpy(s) for s in states]


@pytest.mark.parametrize("num_layers,bidirectional,reset_after,use_bias", KERAS_FORMS)
def test_keras_outputs_agree(num_layers, bidirectional, reset_after, use_bias):
    keras = _keras()
    layers = keras_stack(keras, num_layers, bidirectional, reset_after, use_bias, seed=11)
    x = np.random.default_rng(2).standard_normal((3, 6, 3)).astype(np.float32)  # Keras is batch-major
    ky, kstates = run_keras(layers, x)
    g = interop.from_keras(layers).eval()
    g.batch_first = True
    y, h_n = g(x)
    np.testing.assert_allclose(y, ky, atol=TOL, rtol=0)
    D = 2 if bidirectional else 1
    for d in range(D):  # the last layer's final states, forward then backward
        np.testing.assert_allclose(h_n[(num_layers - 1) * D + d], kstates[d], atol=TOL, rtol=0)


def test_keras_from_grumpy_with_recurrent_bias_is_the_same_model():
    """A grumpy reset-before GRU's two biases go into Keras' one: same outputs."""
    keras = _keras()
    g = randomise(GRU(3, 4, 2, bidirectional=True, reset_after=False, batch_first=True), seed=4)
    layers = [keras.layers.Bidirectional(keras.layers.GRU(4, reset_after=False, return_sequences=True)),
              keras.layers.Bidirectional(keras.layers.GRU(4, reset_after=False, return_sequences=True,
                                                          return_state=True))]
    interop.to_keras(g, layers)  # builds the unbuilt layers
    x = np.random.default_rng(5).standard_normal((2, 5, 3)).astype(np.float32)
    ky, _ = run_keras(layers, x)
    y, _ = g.eval()(x)
    np.testing.assert_allclose(y, ky, atol=TOL, rtol=0)


def test_keras_weights_without_keras_layers():
    """from_keras_weights takes plain arrays: nothing of Keras needs importing."""
    rng = np.random.default_rng(0)
    H, I = 2, 3
    ws = [[rng.standard_normal((I, 3 * H)), rng.standard_normal((H, 3 * H)), rng.standard_normal((2, 3 * H))]]
    g = interop.from_keras_weights(ws, reset_after=True)
    assert g.dtype == np.float64
    # Keras' z block (first) is grumpy's second block; its r block (second) is grumpy's first.
    assert bits_equal(g.params["weight_ih_l0"][H : 2 * H], ws[0][0][:, :H].T)
    assert bits_equal(g.params["weight_ih_l0"][:H], ws[0][0][:, H : 2 * H].T)
    assert bits_equal(g.params["bias_hh_l0"][2 * H :], ws[0][2][1, 2 * H :])


def test_keras_bad_input():
    rng = np.random.default_rng(0)
    H, I = 2, 3
    k, r = rng.standard_normal((I, 3 * H)), rng.standard_normal((H, 3 * H))
    b_after, b_before = rng.standard_normal((2, 3 * H)), rng.standard_normal(3 * H)
    with pytest.raises(ValueError, match=r"layer 0: expected 3 arrays .* found 2 arrays"):
        interop.from_keras_weights([[k, r]], reset_after=True)
    with pytest.raises(ValueError, match=r"expected 6 arrays .*forward then the backward.* found 3 arrays"):
        interop.from_keras_weights([[k, r, b_after]], reset_after=True, bidirectional=True)
    with pytest.raises(ValueError, match=r"bias has shape \(6,\), expected \(2, 6\) for reset_after=True "
                                         r"\(that is a reset_after=False layer's bias\)"):
        interop.from_keras_weights([[k, r, b_before]], reset_after=True)
    with pytest.raises(ValueError, match=r"expected \(6,\) for reset_after=False \(that is a reset_after=True"):
        interop.from_keras_weights([[k, r, b_after]], reset_after=False)
    # A PyTorch-oriented (3H, I) kernel is refused, not transposed.
    with pytest.raises(ValueError, match=r"kernel has shape \(6, 3\), expected \(input size, 3H\) = \(I, 6\)"):
        interop.from_keras_weights([[k.T, r, b_after]], reset_after=True)
    with pytest.raises(ValueError, match=r"recurrent_kernel has shape \(6, 2\), expected \(H, 3H\)"):
        interop.from_keras_weights([[k, r.T, b_after]], reset_after=True)
    with pytest.raises(ValueError, match=r"layer 1: kernel has shape \(3, 6\), expected .* = \(2, 6\)"):
        interop.from_keras_weights([[k, r, b_after], [k, r, b_after]], reset_after=True)
    with pytest.raises(ValueError, match=r"found ndarray \(wrap a single layer's get_weights\(\) in a list\)"):
        interop.from_keras_weights([k, r, b_after], reset_after=True)
    with pytest.raises(ValueError, match="one list of arrays per layer"):
        interop.from_keras_weights([], reset_after=True)


def test_keras_layer_mismatches():
    keras = _keras()
    after = keras_stack(keras, 1, False, True, True, seed=0)
    before = keras_stack(keras, 1, False, False, True, seed=0)
    with pytest.raises(ValueError, match=r"mix forms"):
        interop.from_keras(after + before)
    with pytest.raises(ValueError, match=r"the GRU has \(num_layers, reset_after, bidirectional, bias\) = "
                                         r"\(1, True, False, True\), the Keras layers have \(1, False, False, True\)"):
        interop.to_keras(GRU(3, 4, reset_after=True), before)
    with pytest.raises(ValueError, match=r"units \[4\], expected 5"):
        interop.to_keras(GRU(3, 5), after)
    with pytest.raises(ValueError, match=r"\('tanh', 'hard_sigmoid'\), expected \('tanh', 'sigmoid'\)"):
        interop.from_keras(keras.layers.GRU(4, recurrent_activation="hard_sigmoid"))
    with pytest.raises(ValueError, match="go_backwards=True"):
        interop.from_keras(keras.layers.GRU(4, go_backwards=True))
    with pytest.raises(ValueError, match="merge_mode='sum'"):
        interop.from_keras(keras.layers.Bidirectional(keras.layers.GRU(4), merge_mode="sum"))
    with pytest.raises(ValueError, match="expected a keras.layers.GRU, got LSTM"):
        interop.from_keras([keras.layers.LSTM(4)])
    with pytest.raises(ValueError, match="not built yet"):
        interop.from_keras(keras.layers.GRU(4))
