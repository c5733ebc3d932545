#!/usr/bin/env python3
"""An independent check of `mixnn export` and `mixnn train --local --save`.

Reads a .safetensors file by hand (no torch, no safetensors package): an
8-byte little-endian header length, the JSON header, then raw
little-endian tensor data. Builds the MLP its metadata's `arch` string
describes, as PyTorch's nn.Sequential lays it out (`0.weight` [out, in],
`0.bias`, ReLU, `2.weight`, ..., no activation after the last Linear),
runs the MNIST test set through it (IDX files, raw or gzipped, pixels
scaled to [0, 1] by /255 exactly as MixNN's loader does) and prints the
test accuracy as one JSON object.

    python3 testnet/check_safetensors.py model.safetensors ../shared/data/mnist

Needs Python 3 and numpy only. Exits 1 with a message on stderr when the
file or the data is not what it should be.

Convolutional architectures (`lenet5`, `seq:1x28x28|conv(6,5,p=2) relu
maxpool(2)|...`) are read the same way: every layer takes its place in the
nn.Sequential (Conv2d `N.weight` [out, in, k, k] and `N.bias`, ReLU, Tanh,
MaxPool2d, AvgPool2d, Flatten, Linear), and the convolutions and poolings
run here in numpy, written from PyTorch's definitions.
"""

import gzip
import json
import os
import struct
import sys

import numpy as np

MAX_HEADER = 1 << 20
DTYPES = {"F32": np.dtype("<f4")}


class CheckError(Exception):
    pass


def read_safetensors(path):
    """Returns (tensors: name -> ndarray, metadata: dict)."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise CheckError(f"{path}: shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > MAX_HEADER or 8 + n > len(blob):
        raise CheckError(f"{path}: header length {n} does not fit the file")
    try:
        header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckError(f"{path}: the header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise CheckError(f"{path}: the header is not a JSON object")
    data = blob[8 + n :]
    metadata = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, info in header.items():
        dtype = DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckError(f"{path}: tensor {name} has dtype {info.get('dtype')}, not F32")
        shape = [int(d) for d in info["shape"]]
        begin, end = (int(o) for o in info["data_offsets"])
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not 0 <= begin <= end <= len(data) or end - begin != count * dtype.itemsize:
            raise CheckError(f"{path}: tensor {name} has offsets {begin}..{end} that do not fit {shape}")
        tensors[name] = np.frombuffer(data, dtype=dtype, count=count, offset=begin).reshape(shape)
    return tensors, metadata


LENET5 = ("seq:1x28x28|conv(6,5,p=2) relu maxpool(2)|conv(16,5) relu maxpool(2)"
          "|flatten linear(120) relu|linear(84) relu|linear(10)")


def parse_arch(arch):
    """The input shape and the nn.Sequential's layers, in order: tuples
    ("linear", out) / ("conv", out, k, stride, padding, bias) /
    ("maxpool" | "avgpool", k, stride) / ("relu",) / ("tanh",) / ("flatten",)."""
    arch = arch.strip()
    if arch == "lenet5":
        arch = LENET5
    kind, sep, rest = arch.partition(":")
    if not sep or kind.strip() not in ("mlp", "seq"):
        raise CheckError(f"architecture {arch!r} is not mlp:IN-...-OUT, lenet5 or seq:...")
    if kind.strip() == "mlp":
        try:
            dims = [int(t) for t in rest.split("-")]
        except ValueError as e:
            raise CheckError(f"architecture {arch!r}: {e}") from e
        if len(dims) < 2 or any(d <= 0 for d in dims):
            raise CheckError(f"architecture {arch!r} needs at least two positive sizes")
        seq = []
        for i, d in enumerate(dims[1:]):
            seq.append(("linear", d))
            if i + 2 < len(dims):
                seq.append(("relu",))
        return [dims[0]], seq
    parts = rest.split("|")
    try:
        shape = [int(t) for t in parts[0].strip().split("x")]
    except ValueError as e:
        raise CheckError(f"architecture {arch!r}: input {parts[0]!r}: {e}") from e
    seq = []
    for part in parts[1:]:
        for token in part.split():
            seq.append(parse_layer(arch, token))
    return shape, seq


def parse_layer(arch, token):
    name, _, args = token.partition("(")
    args = [a.strip() for a in args.rstrip(")").split(",") if a.strip()]
    pos = [int(a) for a in args if "=" not in a]
    named = dict(a.split("=", 1) for a in args if "=" in a)
    if name in ("relu", "tanh", "flatten"):
        return (name,)
    if name == "linear":
        return ("linear", pos[0])
    if name in ("conv", "conv2d"):
        return ("conv", pos[0], pos[1], int(named.get("s", 1)), int(named.get("p", 0)),
                named.get("bias", "true") == "true")
    if name in ("maxpool", "maxpool2d", "avgpool", "avgpool2d"):
        return (name[:7], pos[0], int(named.get("s", pos[0])))
    raise CheckError(f"architecture {arch!r}: unknown layer {token!r}")


def layers(tensors, shape, seq):
    """The layers with their parameters, checked against the nn.Sequential
    names and shapes: (op, params..., weight, bias) in order."""
    out = []
    expected = set()
    shape = list(shape)

    def take(name, want):
        if name not in tensors:
            raise CheckError(f"tensor {name} is missing")
        if list(tensors[name].shape) != want:
            raise CheckError(f"tensor {name} has shape {list(tensors[name].shape)}, expected {want}")
        expected.add(name)
        return tensors[name]

    for index, layer in enumerate(seq):
        op = layer[0]
        if op == "linear":
            if len(shape) != 1:
                raise CheckError(f"layer {index}: linear on a {shape} image")
            w = take(f"{index}.weight", [layer[1], shape[0]])
            b = take(f"{index}.bias", [layer[1]])
            out.append(("linear", w, b))
            shape = [layer[1]]
        elif op == "conv":
            _, oc, k, s, p, has_bias = layer
            c, h, w_ = shape
            w = take(f"{index}.weight", [oc, c, k, k])
            b = take(f"{index}.bias", [oc]) if has_bias else None
            out.append(("conv", w, b, s, p))
            shape = [oc, (h + 2 * p - k) // s + 1, (w_ + 2 * p - k) // s + 1]
        elif op in ("maxpool", "avgpool"):
            _, k, s = layer
            c, h, w_ = shape
            out.append((op, k, s))
            shape = [c, (h - k) // s + 1, (w_ - k) // s + 1]
        elif op == "flatten":
            out.append(("flatten",))
            shape = [int(np.prod(shape))]
        else:
            out.append((op,))
    extra = sorted(set(tensors) - expected)
    if extra:
        raise CheckError(f"unexpected tensors {extra}")
    return out


def windows(x, k, s):
    """[n, c, h, w] -> [n, c, oh, ow, k, k]: every k x k window, s apart."""
    v = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))
    return v[:, :, ::s, ::s]


def forward_batch(params, x):
    h = x.astype(np.float64)
    for layer in params:
        op = layer[0]
        if op == "linear":
            _, w, b = layer
            h = h.reshape(h.shape[0], -1) @ w.astype(np.float64).T + b.astype(np.float64)
        elif op == "conv":
            _, w, b, s, p = layer
            h = np.pad(h, ((0, 0), (0, 0), (p, p), (p, p)))
            # y[n, o, i, j] = sum over c, u, v of x[n, c, i*s+u, j*s+v] * w[o, c, u, v]
            h = np.einsum("ncijuv,ocuv->noij", windows(h, w.shape[2], s), w.astype(np.float64))
            if b is not None:
                h = h + b.astype(np.float64)[None, :, None, None]
        elif op == "maxpool":
            h = windows(h, layer[1], layer[2]).max(axis=(4, 5))
        elif op == "avgpool":
            h = windows(h, layer[1], layer[2]).mean(axis=(4, 5))
        elif op == "flatten":
            h = h.reshape(h.shape[0], -1)
        elif op == "relu":
            h = np.maximum(h, 0.0)
        elif op == "tanh":
            h = np.tanh(h)
    return h


def read_idx(directory, name):
    """The bytes of `name` (raw) or `name.gz` in `directory`, raw first."""
    raw = os.path.join(directory, name)
    for path in (raw, raw + ".gz"):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                blob = f.read()
            if blob[:2] == b"\x1f\x8b":
                blob = gzip.decompress(blob)
            return path, blob
    raise CheckError(f"{directory}: neither {name} nor {name}.gz is there")


def mnist_test(directory):
    """(images [n, 784] float32 in [0, 1], labels [n])."""
    path, blob = read_idx(directory, "t10k-images-idx3-ubyte")
    if len(blob) < 16:
        raise CheckError(f"{path}: too short")
    magic, n, rows, cols = struct.unpack(">IIII", blob[:16])
    if magic != 2051 or len(blob) != 16 + n * rows * cols:
        raise CheckError(f"{path}: not an IDX image file (magic {magic}, {len(blob)} bytes)")
    pixels = np.frombuffer(blob, dtype=np.uint8, offset=16).reshape(n, rows * cols)
    # As MixNN's loader: f32::from(p) / 255.0, in f32.
    images = pixels.astype(np.float32) / np.float32(255.0)
    path, blob = read_idx(directory, "t10k-labels-idx1-ubyte")
    if len(blob) < 8:
        raise CheckError(f"{path}: too short")
    magic, m = struct.unpack(">II", blob[:8])
    if magic != 2049 or len(blob) != 8 + m:
        raise CheckError(f"{path}: not an IDX label file (magic {magic}, {len(blob)} bytes)")
    if m != n:
        raise CheckError(f"{n} test images but {m} labels")
    labels = np.frombuffer(blob, dtype=np.uint8, offset=8)
    return images, labels


def forward(params, shape, x):
    """The logits of images x [n, 784], in float64, 500 at a time."""
    x = x.reshape([x.shape[0]] + list(shape))
    return np.concatenate([forward_batch(params, x[i : i + 500]) for i in range(0, x.shape[0], 500)])


def main(argv):
    if len(argv) != 3:
        print(f"usage: {argv[0]} MODEL.safetensors MNIST_DIR", file=sys.stderr)
        return 2
    model_path, mnist_dir = argv[1], argv[2]
    try:
        tensors, metadata = read_safetensors(model_path)
        arch = metadata.get("arch")
        if not isinstance(arch, str):
            raise CheckError(f"{model_path}: no \"arch\" string in the header's __metadata__")
        shape, seq = parse_arch(arch)
        params = layers(tensors, shape, seq)
        if int(np.prod(shape)) != 784:
            raise CheckError(f"{arch} takes {shape} inputs; MNIST images have 784 values")
        images, labels = mnist_test(mnist_dir)
    except (OSError, CheckError, ValueError, IndexError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    logits = forward(params, shape, images)
    # Ties go to the first class, as the project's argmax does.
    predicted = np.argmax(logits, axis=1)
    correct = int(np.sum(predicted == labels))
    print(
        json.dumps(
            {
                "arch": arch,
                "examples": int(labels.shape[0]),
                "correct": correct,
                "test_accuracy": correct / labels.shape[0],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
