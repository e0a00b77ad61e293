"""PyTorch (CPU) reference of the HistoSPACE architecture and of this project's training recipes, for benchmarks.

Same architecture as the JAX models (histospace_jax/models.py):

* Encoder: 3 x [conv3x3 (padding 1) -> BatchNorm -> ReLU -> maxpool 2], channels 3-32-64-128,
  128x128x3 -> 16x16x128.
* Decoder: [ConvTranspose 4x4 stride 2 (padding 1) -> BatchNorm -> ReLU] 128->64, 64->32, then
  ConvTranspose 4x4 stride 2 32->3 -> sigmoid; 16x16 -> 128x128.
* Regressor: frozen encoder (eval mode, no grad) -> head [conv3x3 128->128 -> BN -> ReLU ->
  maxpool 2] -> flatten (8192) -> Linear 256 -> ReLU -> Linear G.

`torch_loo_protocol` is leave-one-patient-out written the way a PyTorch user writes it: folds, then the
ensemble's heads, one after the other; a Dataset that loads each training tile and applies its random dihedral
view; the frozen encoder run (eval mode, no grad) on every batch, for training, inner validation and
prediction alike. It follows one `Recipe` (the JAX side's resolved config, see benchmarks/speed.py):

* "standard": targets standardised per gene on each fold's training rows; output layer initialised to zero;
  dropout on the hidden FC layer at the resolved config's rate (0 by default);
  one of the 8 flips/rotations drawn per example; `ensemble` heads per fold from different seeds; after each
  epoch the inner-validation MSE (untransformed view, standardised units) and each head keeps its best epoch
  (with `refit`, the head is then trained again from its initialisation on the training and inner-validation
  rows up to that epoch); held-out predictions averaged over the 8 views and the heads.
* "paper": raw targets, default initialisation, no augmentation, one head, the final epoch, no dropout.

Both use AdamW (Adam when weight_decay is 0), Huber loss and full batches (drop_last) from the fold's own
training rows. The inner-validation rows come from the JAX side, so both sides split the same way. Layers are
initialised like flax's defaults (LeCun normal, zero biases), so "default init" means the same on both sides.

Tensors are NCHW (PyTorch's default layout); inputs are float32 in [0, 1] (uint8 / 255).
torch is imported here only: the histospace_jax package never imports it, and this module never imports
histospace_jax (it may run in another environment, see speed.py --torch-python).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

IMAGE_SIZE = 128
ENC_CHANNELS = (32, 64, 128)
N_DIHEDRAL_VIEWS = 8


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
    """(N, 128, 16, 16) encoder features -> (N, G) (features of image_size / 8 a side for other tile sizes)."""

    def __init__(self, n_genes: int, hidden: int = 256, channels: int = ENC_CHANNELS[-1],
                 image_size: int = IMAGE_SIZE, dropout_rate: float = 0.0):
        super().__init__()
        self.block = _conv_block(channels, channels)
        self.fc1 = nn.Linear(channels * (image_size // 16) ** 2, hidden)
        self.dropout = nn.Dropout(dropout_rate)
        self.fc2 = nn.Linear(hidden, n_genes)

    def forward(self, f):
        h = self.block(f).flatten(1)
        return self.fc2(self.dropout(torch.relu(self.fc1(h))))


class TorchRegressor(nn.Module):
    """Frozen encoder (always eval mode, no grad) -> trainable head."""

    def __init__(self, n_genes: int, encoder: TorchEncoder | None = None, image_size: int = IMAGE_SIZE,
                 dropout_rate: float = 0.0):
        super().__init__()
        self.encoder = encoder if encoder is not None else TorchEncoder()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.head = TorchHead(n_genes, image_size=image_size, dropout_rate=dropout_rate)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: BatchNorm uses running statistics and never updates them
        return self

    def forward(self, x):
        with torch.no_grad():
            f = self.encoder(x)
        return self.head(f)


def init_like_flax(module: nn.Module, zero_output: nn.Linear | None = None) -> None:
    """flax's default initialisation on every conv and linear layer of `module`: LeCun normal kernels (normal of
    variance 1 / fan_in truncated at 2 sd, rescaled to keep that variance) and zero biases; `zero_output` gets a
    zero kernel too (the standard recipe's output layer, whose first prediction is then the target mean)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            sd = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # sd of a unit normal truncated at +-2
            nn.init.trunc_normal_(m.weight, std=sd, a=-2 * sd, b=2 * sd)
            nn.init.zeros_(m.bias)
    if zero_output is not None:
        nn.init.zeros_(zero_output.weight)
        nn.init.zeros_(zero_output.bias)


def load_encoder_arrays(encoder: TorchEncoder, arrays: dict) -> TorchEncoder:
    """Loads {state_dict name: numpy array} (speed.encoder_arrays_for_torch of the JAX encoder) into `encoder`."""
    state = encoder.state_dict()
    missing = [k for k in state if k not in arrays and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"encoder arrays lack {missing}; export them with speed.encoder_arrays_for_torch")
    encoder.load_state_dict({k: torch.tensor(np.asarray(arrays[k])) if k in arrays else v
                             for k, v in state.items()})
    return encoder


def dihedral_view(x: torch.Tensor, view: int) -> torch.Tensor:
    """View `view` (0-7) of (..., H, W) images, as histospace_jax.features.dihedral on (N, H, W, C): rotation by
    90 * (view % 4) degrees from the H axis towards the W axis, mirrored along W for view >= 4."""
    out = torch.rot90(x, k=view % 4, dims=(-2, -1))
    return out.flip(-1) if view >= 4 else out


def standardisation(expression: torch.Tensor, rows: np.ndarray, on: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, sd) per gene of `expression` on `rows` ((0, 1) when off); a gene constant there gets sd 1."""
    g = expression.shape[1]
    if not on:
        return torch.zeros(g), torch.ones(g)
    x = expression[torch.as_tensor(rows)].double()
    sd = x.std(0, unbiased=False)
    return x.mean(0).float(), torch.where(sd > 1e-6, sd, torch.ones_like(sd)).float()


@dataclasses.dataclass
class Recipe:
    """One recipe's settings, as the JAX side resolved them (speed.py exports them)."""

    epochs: int
    batch_size: int
    ensemble: int               # heads per fold
    views: int                  # 8: a random dihedral view per training example, predictions averaged over 8
    standardise: bool           # targets per gene on each fold's training rows
    zero_output: bool           # output layer starts at zero
    select_epoch: bool          # each head keeps its best epoch on the fold's inner-validation rows
    refit: bool = False         # then trains again from its initialisation on training + inner-validation rows
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    huber_delta: float = 1.0
    dropout_rate: float = 0.0   # on the hidden FC layer's output while training
    eval_batch_size: int = 128
    seed: int = 0


@dataclasses.dataclass
class Fold:
    held_out: np.ndarray        # rows of the held-out patient
    train: np.ndarray           # rows the heads learn from
    val: np.ndarray             # inner-validation rows (training patients; empty without epoch selection)


class SpotTiles(torch.utils.data.Dataset):
    """(tile in [0, 1], CHW; standardised target) of `rows`, each tile in a random dihedral view when augmenting
    (drawn from torch's global generator, which the protocol seeds per head)."""

    def __init__(self, tiles_uint8: np.ndarray, targets: torch.Tensor, rows: np.ndarray, views: int):
        self.tiles, self.targets, self.rows, self.views = tiles_uint8, targets, rows, views

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        r = int(self.rows[i])
        x = torch.from_numpy(self.tiles[r]).permute(2, 0, 1).float().div_(255.0)
        if self.views > 1:
            x = dihedral_view(x, int(torch.randint(self.views, ())))
        return x, self.targets[r]


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


def _predict_rows(model: TorchRegressor, tiles_uint8: np.ndarray, rows: np.ndarray, batch_size: int,
                  views: int) -> torch.Tensor:
    """Standardised predictions (len(rows), G) of `model` in eval mode, averaged over the first `views` views."""
    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            x = _to_input(tiles_uint8[rows[s:s + batch_size]])
            out.append(sum(model(dihedral_view(x, v)) for v in range(views)) / views)
    return torch.cat(out)


def _train_head(model: TorchRegressor, tiles_uint8: np.ndarray, targets: torch.Tensor, fold: Fold,
                recipe: Recipe) -> tuple[TorchRegressor, int]:
    """Trains `model`'s head on the fold's training rows; returns it at its chosen epoch, and that epoch."""
    head_params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(head_params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
           if recipe.weight_decay else torch.optim.Adam(head_params, lr=recipe.learning_rate))
    loss_fn = nn.HuberLoss(delta=recipe.huber_delta)
    loader = torch.utils.data.DataLoader(SpotTiles(tiles_uint8, targets, fold.train, recipe.views),
                                         batch_size=recipe.batch_size, shuffle=True, drop_last=True)
    select = recipe.select_epoch and len(fold.val) > 0
    val_truth = targets[torch.as_tensor(fold.val)] if select else None
    best_score, best_state, best_epoch = math.inf, None, recipe.epochs
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
        if select:
            # The untransformed view only, as the JAX side chooses its epochs.
            z = _predict_rows(model, tiles_uint8, fold.val, recipe.eval_batch_size, views=1)
            score = float(torch.mean((z - val_truth) ** 2))
            if score < best_score:
                best_score, best_state, best_epoch = score, copy.deepcopy(model.head.state_dict()), epoch
    if best_state is not None:  # None: not selecting, or no finite validation score (keep the final epoch)
        model.head.load_state_dict(best_state)
    return model, best_epoch


def torch_loo_protocol(tiles_uint8: np.ndarray, expression: np.ndarray, folds: list[Fold], recipe: Recipe, *,
                       encoder: TorchEncoder | None = None, log: Callable[[str], None] | None = None,
                       num_threads: int | None = None) -> dict:
    """Leave-one-patient-out with `recipe`, every fold and every head of a fold one after the other.

    Per fold: target statistics on its training rows; per head (seeded from recipe.seed, the fold and the
    head): a fresh head and optimizer, `epochs` epochs of shuffled full batches of the training rows (random
    dihedral view per tile when recipe.views = 8), the frozen encoder run on every batch; the inner-validation
    MSE after each epoch when selecting epochs; then its held-out predictions (mean over the views), mapped
    back to expression units and averaged over the fold's heads.

    Args:
      tiles_uint8: (N, T, T, 3) uint8 tiles (NHWC, as stored; T = 128, the architecture's tile size).
      expression: (N, G) float targets.
      folds: the folds' row sets (from the JAX side: same held-out patients and inner-validation rows).
      encoder: the frozen encoder; a freshly initialised one (seeded) when None.
      num_threads: torch's intra-op threads; all cores when None.

    Returns:
      dict with ``wall_s`` (total seconds), ``fold_wall_s`` (seconds per fold, in order), ``predictions``
      ((N, G) float32, each held-out row predicted by its fold), ``best_epoch`` ((folds, ensemble) int) and
      ``num_threads``.
    """
    tiles_uint8 = np.asarray(tiles_uint8)
    if tiles_uint8.ndim != 4 or tiles_uint8.shape[-1] != 3 or tiles_uint8.dtype != np.uint8:
        raise ValueError(
            f"torch_loo_protocol: tiles must be (N, H, W, 3) uint8, got {tiles_uint8.shape} {tiles_uint8.dtype}; "
            "pass the store's raw tiles")
    expression_t = torch.from_numpy(np.ascontiguousarray(expression, np.float32))
    n, n_genes = expression_t.shape
    if len(tiles_uint8) != n:
        raise ValueError(f"torch_loo_protocol: tiles ({len(tiles_uint8)}) and expression ({n}) must have one row "
                         "per spot")
    if recipe.views not in (1, N_DIHEDRAL_VIEWS):
        raise ValueError(f"torch_loo_protocol: recipe.views must be 1 or {N_DIHEDRAL_VIEWS}, got {recipe.views}")
    num_threads = setup_threads(num_threads)
    if encoder is None:
        torch.manual_seed(recipe.seed)
        encoder = TorchEncoder()
        init_like_flax(encoder)
    encoder.eval()
    predictions = np.zeros((n, n_genes), np.float32)
    fold_wall, best_epochs = [], []
    t_all = time.perf_counter()
    for f, fold in enumerate(folds):
        t0 = time.perf_counter()
        mean, sd = standardisation(expression_t, fold.train, recipe.standardise)
        targets = (expression_t - mean) / sd
        fold_pred, fold_best = torch.zeros(len(fold.held_out), n_genes), []
        for k in range(recipe.ensemble):
            def new_head() -> TorchRegressor:
                """Head k of fold f, freshly initialised (the same weights on every call)."""
                torch.manual_seed(recipe.seed * 100003 + f * 1000 + k + 1)
                model = TorchRegressor(n_genes, encoder, image_size=tiles_uint8.shape[1],
                                       dropout_rate=recipe.dropout_rate)
                init_like_flax(model.head, zero_output=model.head.fc2 if recipe.zero_output else None)
                return model

            model, best = _train_head(new_head(), tiles_uint8, targets, fold, recipe)
            head_mean, head_sd = mean, sd
            if recipe.refit and recipe.select_epoch and len(fold.val):
                every = np.union1d(fold.train, fold.val)
                head_mean, head_sd = standardisation(expression_t, every, recipe.standardise)
                model, _ = _train_head(new_head(), tiles_uint8, (expression_t - head_mean) / head_sd,
                                       Fold(fold.held_out, every, every[:0]), dataclasses.replace(recipe, epochs=best))
            z = _predict_rows(model, tiles_uint8, fold.held_out, recipe.eval_batch_size, recipe.views)
            fold_pred += head_mean + head_sd * z
            fold_best.append(best)
            if log:
                log(f"[torch] fold {f + 1}/{len(folds)} head {k + 1}/{recipe.ensemble}: epoch {best} "
                    f"({time.perf_counter() - t0:.1f} s)")
        predictions[fold.held_out] = (fold_pred / recipe.ensemble).numpy()
        best_epochs.append(fold_best)
        fold_wall.append(time.perf_counter() - t0)
    return {
        "wall_s": time.perf_counter() - t_all,
        "fold_wall_s": fold_wall,
        "predictions": predictions,
        "best_epoch": np.asarray(best_epochs, np.int32),
        "num_threads": num_threads,
    }


# ------------------------------------------------------------------------------------------ inputs from speed.py

ENCODER_PREFIX = "encoder."


def read_protocol(path: str) -> tuple[list[Fold], Recipe, dict]:
    """(folds, recipe, encoder arrays) from a protocol .npz that speed.write_protocol wrote."""
    with np.load(path) as z:
        folds = [Fold(z[f"held_out_{f}"], z[f"train_{f}"], z[f"val_{f}"]) for f in range(int(z["n_folds"]))]
        values = {f.name: z[f.name].item() for f in dataclasses.fields(Recipe)}
        recipe = Recipe(**{k: bool(v) if k in ("standardise", "zero_output", "select_epoch", "refit") else v
                           for k, v in values.items()})
        encoder = {k[len(ENCODER_PREFIX):]: z[k] for k in z.files if k.startswith(ENCODER_PREFIX)}
    return folds, recipe, encoder
