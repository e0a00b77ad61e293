"""PyTorch (CPU) reference of the HistoSPACE architecture and training protocol, for benchmarks only.

Same architecture as the JAX models (histospace_jax/models.py):

* Encoder: 3 x [conv3x3 (padding 1) -> BatchNorm -> ReLU -> maxpool 2], channels 3-32-64-128,
  128x128x3 -> 16x16x128.
* Decoder: [ConvTranspose 4x4 stride 2 (padding 1) -> BatchNorm -> ReLU] 128->64, 64->32, then
  ConvTranspose 4x4 stride 2 32->3 -> sigmoid; 16x16 -> 128x128.
* Regressor: frozen encoder (eval mode, no grad) -> head [conv3x3 128->128 -> BN -> ReLU ->
  maxpool 2] -> flatten (8192) -> Linear 256 -> ReLU -> Linear G.

Protocol: Adam; MSE for the autoencoder; Huber (delta 1) for the regressor; leave-one-patient-out
folds run one after the other, each training a fresh head with the encoder recomputed every step
(the original PyTorch code does not cache encoder features).

Tensors are NCHW (PyTorch's default layout); inputs are float32 in [0, 1] (uint8 / 255).
torch is imported here only: the histospace_jax package never imports it.
Run with the separate torch venv, e.g. ``/work/torchvenv/bin/python benchmarks/speed.py``.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

IMAGE_SIZE = 128
ENC_CHANNELS = (32, 64, 128)


def setup_threads(num_threads: int | None = None) -> int:
    """Uses all cores (or ``num_threads``) for torch's intra-op pool; returns torch.get_num_threads()."""
    n = num_threads or os.cpu_count() or 1
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, 2),
    )


class TorchEncoder(nn.Module):
    """(N, 3, 128, 128) in [0, 1] -> (N, 128, 16, 16)."""

    def __init__(self, channels=ENC_CHANNELS):
        super().__init__()
        blocks, cin = [], 3
        for c in channels:
            blocks.append(_conv_block(cin, c))
            cin = c
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(x)


class TorchDecoder(nn.Module):
    """(N, 128, 16, 16) -> (N, 3, 128, 128) in (0, 1)."""

    def __init__(self, channels=ENC_CHANNELS):
        super().__init__()
        layers = []
        rev = list(channels[::-1])  # 128, 64, 32
        for cin, cout in zip(rev[:-1], rev[1:]):
            layers += [
                nn.ConvTranspose2d(cin, cout, kernel_size=4, stride=2, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
        layers += [nn.ConvTranspose2d(rev[-1], 3, kernel_size=4, stride=2, padding=1), nn.Sigmoid()]
        self.layers = nn.Sequential(*layers)

    def forward(self, z):
        return self.layers(z)


class TorchAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = TorchEncoder()
        self.decoder = TorchDecoder()

    def forward(self, x):
        return self.decoder(self.encoder(x))


class TorchHead(nn.Module):
    """(N, 128, 16, 16) encoder features -> (N, G)."""

    def __init__(self, n_genes: int, hidden: int = 256, channels: int = ENC_CHANNELS[-1]):
        super().__init__()
        self.block = _conv_block(channels, channels)
        self.fc1 = nn.Linear(channels * (IMAGE_SIZE // 16) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, n_genes)

    def forward(self, f):
        h = self.block(f).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


class TorchRegressor(nn.Module):
    """Frozen encoder (always eval mode, no grad) -> trainable head."""

    def __init__(self, n_genes: int, encoder: TorchEncoder | None = None):
        super().__init__()
        self.encoder = encoder if encoder is not None else TorchEncoder()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.head = TorchHead(n_genes)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: BatchNorm uses running statistics and never updates them
        return self

    def forward(self, x):
        with torch.no_grad():
            f = self.encoder(x)
        return self.head(f)


def _random_batch(batch_size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)


def torch_ae_train_step_fn(batch_size: int, lr: float = 1e-3, seed: int = 0) -> Callable[[], float]:
    """Closure running one AE train step (fwd + MSE + bwd + Adam) on a fixed random batch; returns the loss."""
    setup_threads()
    torch.manual_seed(seed)
    model = TorchAutoencoder().train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x = _random_batch(batch_size, seed)
    loss_fn = nn.MSELoss()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), x)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def torch_reg_train_step_fn(batch_size: int, n_genes: int, lr: float = 1e-3, seed: int = 0) -> Callable[[], float]:
    """Closure running one regression train step (frozen encoder fwd, head fwd/bwd, Huber, Adam)."""
    setup_threads()
    torch.manual_seed(seed)
    model = TorchRegressor(n_genes).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    x = _random_batch(batch_size, seed)
    y = torch.randn(batch_size, n_genes, generator=torch.Generator().manual_seed(seed + 1))
    loss_fn = nn.HuberLoss(delta=1.0)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def torch_predict_fn(batch_size: int, n_genes: int, seed: int = 0) -> Callable[[], np.ndarray]:
    """Closure running the regressor in eval mode without grad on a fixed random batch; returns (B, G)."""
    setup_threads()
    torch.manual_seed(seed)
    model = TorchRegressor(n_genes).eval()
    x = _random_batch(batch_size, seed)

    def predict() -> np.ndarray:
        with torch.no_grad():
            return model(x).numpy()

    return predict


def _to_input(tiles_uint8: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(tiles_uint8)).permute(0, 3, 1, 2).float().div_(255.0)


def torch_loo_protocol(
    tiles_uint8: np.ndarray,
    expression: np.ndarray,
    patients: np.ndarray,
    epochs: int,
    batch_size: int,
    *,
    encoder: TorchEncoder | None = None,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict:
    """The original PyTorch leave-one-patient-out protocol, folds run sequentially.

    For each held-out patient (in sorted order): a fresh head and Adam optimizer, ``epochs``
    epochs over the other patients' tiles in shuffled mini-batches of ``batch_size`` (last partial
    batch kept), the frozen encoder recomputed on every batch, then prediction of the held-out
    patient's tiles.

    Args:
      tiles_uint8: (N, 128, 128, 3) uint8 tiles (NHWC, as stored).
      expression: (N, G) float targets.
      patients: (N,) patient id per tile.
      encoder: pretrained frozen encoder; a freshly initialised one (seeded) when None.

    Returns:
      dict with ``wall_s`` (total seconds), ``fold_wall_s`` ({patient: seconds}), ``predictions``
      ((N, G) float32, each tile predicted by the fold that held its patient out) and
      ``num_threads``.
    """
    tiles_uint8 = np.asarray(tiles_uint8)
    expression = np.asarray(expression, dtype=np.float32)
    patients = np.asarray(patients)
    if tiles_uint8.ndim != 4 or tiles_uint8.shape[-1] != 3 or tiles_uint8.dtype != np.uint8:
        raise ValueError(
            f"torch_loo_protocol: tiles must be (N, H, W, 3) uint8, got {tiles_uint8.shape} {tiles_uint8.dtype}; "
            "pass the store's raw tiles"
        )
    n, n_genes = expression.shape
    if len(tiles_uint8) != n or len(patients) != n:
        raise ValueError(
            f"torch_loo_protocol: tiles ({len(tiles_uint8)}), expression ({n}) and patients ({len(patients)}) "
            "must have one row per spot"
        )
    num_threads = setup_threads()
    torch.manual_seed(seed)
    if encoder is None:
        encoder = TorchEncoder()
    rng = np.random.default_rng(seed)
    predictions = np.zeros((n, n_genes), np.float32)
    fold_wall = {}
    loss_fn = nn.HuberLoss(delta=1.0)
    t_all = time.perf_counter()
    for fold, patient in enumerate(np.unique(patients)):
        t0 = time.perf_counter()
        test_idx = np.flatnonzero(patients == patient)
        train_idx = np.flatnonzero(patients != patient)
        torch.manual_seed(seed + 1 + fold)
        model = TorchRegressor(n_genes, encoder).train()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        for _ in range(epochs):
            order = rng.permutation(train_idx)
            for s in range(0, len(order), batch_size):
                idx = np.sort(order[s : s + batch_size])
                x = _to_input(tiles_uint8[idx])
                y = torch.from_numpy(expression[idx])
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            for s in range(0, len(test_idx), batch_size):
                idx = test_idx[s : s + batch_size]
                predictions[idx] = model(_to_input(tiles_uint8[idx])).numpy()
        fold_wall[patient.item() if hasattr(patient, "item") else patient] = time.perf_counter() - t0
    return {
        "wall_s": time.perf_counter() - t_all,
        "fold_wall_s": fold_wall,
        "predictions": predictions,
        "num_threads": num_threads,
    }
