"""A synthetic dataset from the linear generative model (docs/method.md §4): ground truth for tests, demos.

Class ``c`` has a latent mean ``mu_c``; every sample draws its own latent ``z = mu_c + noise``.
The target modality ``image`` sees ``x = A_x z + noise_x * eps`` and each auxiliary modality
(``text``, ``aux2``, ...) sees ``y_m = A_m z + noise_aux * eps`` from its OWN draws of z: rows are
never paired across modalities, they share only the class structure.

``A_x`` sees part of the latent space poorly (those singular values are scaled down), so in X the
noise hides class information that Y carries; with few labelled target rows, that is the case UML
is meant to help. ``aux_pure_noise=True`` replaces every auxiliary modality by
pure noise with random labels: the control case where Y carries nothing.

Sequences (``kind='sequence'``) use a linear dynamical system driven by the same z: from a random
initial state, ``s_t = R s_{t-1} + z`` (R stable), observed as ``x_t = A_x s_t + noise``. The next
step is predictable from the history, and the class lives in the drive z, so a mean-pooled
encoding of a model trained by next-step prediction carries it to the linear probe.
"""

from __future__ import annotations

import numpy as np

from uml_ray.data.format import DEFAULT_LAYOUT, LAYOUTS, write_shards
from uml_ray.data.manifest import KINDS, Manifest, ModalitySpec, write_manifest
from uml_ray.errors import ConfigError
from uml_ray.uri import join_uri

TARGET = "image"
DECAY = 0.8  # |eigenvalues| of the sequence dynamics R


def auxiliary_names(count: int) -> list[str]:
    """Names of ``count`` auxiliary modalities: ``text``, then ``aux2``, ``aux3``, ..."""
    return ["text"] + [f"aux{i}" for i in range(2, count + 1)]


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) matrix with orthonormal columns (rows >= cols) or rows (rows < cols)."""
    q, r = np.linalg.qr(rng.standard_normal((max(rows, cols), min(rows, cols))))
    q = q * np.sign(np.diag(r))  # QR's signs are arbitrary; fixing them keeps the draw a function of the seed
    return q if rows >= cols else q.T


def _mixing(rng: np.random.Generator, dim: int, latent_dim: int, singular_values: np.ndarray) -> np.ndarray:
    """``A = U diag(s) V^T``: a (dim, latent_dim) map with the given singular values."""
    rank = min(dim, latent_dim)
    u = _orthonormal(rng, dim, rank)
    v = _orthonormal(rng, latent_dim, rank)
    return (u * singular_values[:rank]) @ v.T


def _balanced_labels(rng: np.random.Generator, n: int, n_classes: int) -> np.ndarray:
    """``n`` labels with every class as equally often as possible, in random order."""
    return rng.permutation(np.arange(n) % n_classes).astype(np.int32)


def _draw(rng, labels, means, mixing, noise, kind, dynamics, seq_len, spread=1.0):
    """One row per label, each from its own latent ``z = mu_label + spread * eps``.

    Vectors: ``A z + noise * eps``. Sequences of random length in ``seq_len``:
    ``s_0`` random, ``s_t = R s_{t-1} + z``, ``x_t = A s_t + noise * eps``.
    """
    z = means[labels] + spread * rng.standard_normal((len(labels), means.shape[1]))
    if kind == "vector":
        return (z @ mixing.T + noise * rng.standard_normal((len(labels), mixing.shape[0]))).astype(np.float32)
    lengths = rng.integers(seq_len[0], seq_len[1] + 1, size=len(labels))
    rows = []
    # a random initial state gives every sequence a transient the dynamics make predictable
    initial = rng.standard_normal(z.shape)
    for drive, state, length in zip(z, initial, lengths):
        states = np.empty((length, len(drive)))
        for t in range(length):
            state = dynamics @ state + drive
            states[t] = state
        rows.append(
            (states @ mixing.T + noise * rng.standard_normal((length, mixing.shape[0]))).astype(np.float32)
        )
    return rows


def write_synthetic(
    out_dir: str,
    *,
    n_classes: int = 5,
    latent_dim: int = 8,
    dim_x: int = 32,
    dims_aux: tuple[int, ...] = (16,),
    n_train: int = 50,
    n_val: int = 100,
    n_test: int = 500,
    n_aux: int = 1000,
    noise_x: float = 0.5,
    noise_aux: float = 0.5,
    class_sep: float = 2.0,
    weak_fraction: float = 0.5,
    weak_scale: float = 0.1,
    aux_pure_noise: bool = False,
    aux_shared_mixing: bool = False,
    aux_spread: float = 1.0,
    kind: str = "vector",
    seq_len: tuple[int, int] = (8, 16),
    seed: int = 0,
    rows_per_shard: int = 4096,
    layout: str = DEFAULT_LAYOUT,
) -> str:
    """Write a synthetic UML dataset (Parquet shards + manifest.yaml) and return the manifest path.

        ``n_train``/``n_val``/``n_test`` are target rows per split; ``n_aux`` is the train rows of each
        auxiliary modality (auxiliary modalities have a train split only). ``weak_fraction`` of the
        latent directions reach X scaled by ``weak_scale``. ``aux_shared_mixing`` observes the
        auxiliary modalities through X's own mixing matrix (aligned feature spaces, as CLIP's image and
        text towers are): then a head shared across modalities is a shared parameter in the strict
        sense, and the auxiliary's labelled rows inform X's classifier directly. ``aux_spread`` scales
        the auxiliary rows' within-class latent spread (``z = mu_c + aux_spread * eps``): with shared
        mixing and ``noise_aux = aux_spread * noise_x``, an auxiliary row is a target row whose scatter
        around its class mean is shrunk by ``aux_spread`` — the same classifier, each row pinning its
        class down more tightly (below 1) than a target row does. ``layout`` is the vector shards' payload
    layout (``format.LAYOUTS``; sequences have one). The same seed gives byte-identical shards.
    """
    if kind not in KINDS:
        raise ConfigError(f"synthetic data: kind must be one of {list(KINDS)}, got {kind!r}")
    if layout not in LAYOUTS:
        raise ConfigError(
            f"synthetic data: layout (--feature-layout) must be one of {list(LAYOUTS)}, got {layout!r}"
        )
    if not 1 <= seq_len[0] <= seq_len[1]:
        raise ConfigError(
            f"synthetic data: seq_len must be (min, max) with 1 <= min <= max, got {tuple(seq_len)}"
        )
    # refused here rather than written: `data validate` rejects a dataset with an empty split
    sizes = {
        "n_classes (--classes)": n_classes,
        "latent_dim (--latent-dim)": latent_dim,
        "dim_x (--dim-x)": dim_x,
        "n_train (--n-train)": n_train,
        "n_val (--n-val)": n_val,
        "n_test (--n-test)": n_test,
        "rows_per_shard (--rows-per-shard)": rows_per_shard,
    }
    for what, value in sizes.items():
        if value < 1:
            raise ConfigError(f"synthetic data: {what} must be >= 1, got {value}")
    if any(dim < 1 for dim in dims_aux):
        raise ConfigError(
            f"synthetic data: every auxiliary dim (--dims-aux) must be >= 1, got {list(dims_aux)}"
        )
    if dims_aux and n_aux < n_classes:
        # balanced labels give every class an auxiliary row only when there are at least as many
        # rows as classes
        raise ConfigError(
            f"synthetic data: n_aux (--n-aux) must be >= n_classes={n_classes} so every class has "
            f"auxiliary rows, got {n_aux}"
        )
    if seed < 0:
        raise ConfigError(f"synthetic data: seed (--seed) must be >= 0, got {seed}")
    if not aux_spread > 0:
        raise ConfigError(f"synthetic data: aux_spread (--aux-spread) must be > 0, got {aux_spread}")
    rng = np.random.default_rng(seed)
    means = class_sep * rng.standard_normal((n_classes, latent_dim))
    n_weak = int(round(weak_fraction * min(dim_x, latent_dim)))
    x_singular = np.ones(latent_dim)
    x_singular[:n_weak] = weak_scale
    x_mixing = _mixing(rng, dim_x, latent_dim, x_singular)
    modalities = {TARGET: (dim_x, x_mixing, noise_x)}
    for name, dim in zip(auxiliary_names(len(dims_aux)), dims_aux):
        if aux_shared_mixing and dim != dim_x:
            raise ConfigError(
                f"synthetic data: aux_shared_mixing needs every auxiliary dim == dim_x={dim_x}, got {dim}"
            )
        mixing = x_mixing if aux_shared_mixing else _mixing(rng, dim, latent_dim, np.ones(latent_dim))
        modalities[name] = (dim, mixing, noise_aux)
    # eigenvalues of magnitude DECAY < 1 keep the state bounded
    dynamics = DECAY * _orthonormal(rng, latent_dim, latent_dim)

    splits = {TARGET: {"train": n_train, "val": n_val, "test": n_test}}
    splits.update({name: {"train": n_aux} for name in modalities if name != TARGET})
    specs = {}
    for name, (dim, mixing, noise) in modalities.items():
        pure_noise = aux_pure_noise and name != TARGET
        uris = {}
        for split, n in splits[name].items():
            labels = _balanced_labels(rng, n, n_classes)
            if pure_noise:
                # unit Gaussian noise of the same shape; its labels say nothing about it
                features = _draw(
                    rng, labels, np.zeros_like(means), np.zeros_like(mixing), 1.0, kind, dynamics, seq_len
                )
            else:
                features = _draw(
                    rng,
                    labels,
                    means,
                    mixing,
                    noise,
                    kind,
                    dynamics,
                    seq_len,
                    aux_spread if name != TARGET else 1.0,
                )
            uris[split] = write_shards(
                out_dir,
                name,
                split,
                features,
                labels,
                kind=kind,
                dim=dim,
                rows_per_shard=rows_per_shard,
                layout=layout,
            )
        specs[name] = ModalitySpec(kind=kind, dim=dim, encoder="synthetic-linear", splits=uris, layout=layout)
    manifest = Manifest(
        name="synthetic",
        classes=[f"class_{c}" for c in range(n_classes)],
        target=TARGET,
        modalities=specs,
    )
    return write_manifest(manifest, join_uri(out_dir, "manifest.yaml"))
