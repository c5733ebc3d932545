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


def parse_arch(arch):
    """`mlp:784-128-10` -> [784, 128, 10]."""
    kind, sep, rest = arch.partition(":")
    if kind.strip() != "mlp" or not sep:
        raise CheckError(f"architecture {arch!r} is not mlp:IN-H1-...-OUT")
    try:
        dims = [int(t) for t in rest.split("-")]
    except ValueError as e:
        raise CheckError(f"architecture {arch!r}: {e}") from e
    if len(dims) < 2 or any(d <= 0 for d in dims):
        raise CheckError(f"architecture {arch!r} needs at least two positive sizes")
    return dims


def layers(tensors, dims):
    """The (weight [out, in], bias [out]) of each Linear, in order, checked
    against the nn.Sequential names and shapes of `dims`."""
    out = []
    expected = set()
    for i in range(len(dims) - 1):
        index = 2 * i  # Linear, ReLU, Linear, ...: ReLUs take the odd places.
        w_name, b_name = f"{index}.weight", f"{index}.bias"
        expected.update((w_name, b_name))
        for name, shape in ((w_name, [dims[i + 1], dims[i]]), (b_name, [dims[i + 1]])):
            if name not in tensors:
                raise CheckError(f"tensor {name} is missing")
            if list(tensors[name].shape) != shape:
                raise CheckError(f"tensor {name} has shape {list(tensors[name].shape)}, expected {shape}")
        out.append((tensors[w_name], tensors[b_name]))
    extra = sorted(set(tensors) - expected)
    if extra:
        raise CheckError(f"unexpected tensors {extra}")
    return out


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


def forward(params, x):
    """Linear, ReLU, ..., Linear (PyTorch: y = x W^T + b), in float64."""
    h = x.astype(np.float64)
    for i, (w, b) in enumerate(params):
        h = h @ w.astype(np.float64).T + b.astype(np.float64)
        if i + 1 < len(params):
            h = np.maximum(h, 0.0)
    return h


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
        dims = parse_arch(arch)
        params = layers(tensors, dims)
        if dims[0] != 784:
            raise CheckError(f"{arch} takes {dims[0]} inputs; MNIST images have 784")
        images, labels = mnist_test(mnist_dir)
    except (OSError, CheckError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    logits = forward(params, images)
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
