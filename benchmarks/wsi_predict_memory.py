"""Peak memory and speed of `predict --grid_step_um` on a whole-slide image far larger than memory would allow
decoding whole.

    python benchmarks/wsi_predict_memory.py                 # 51,200 x 51,200 px, in a temporary directory
    python benchmarks/wsi_predict_memory.py --workdir=DIR --keep --size=102400
    python benchmarks/wsi_predict_memory.py --smoothing_weight=1    # without the smoothing pass
    python benchmarks/wsi_predict_memory.py --size=25600 --architecture=standard --members=5 --views=8

Builds a synthetic tiled pyramidal TIFF (512-px tiles; levels 1x to 64x in steps of 2; JPEG when imagecodecs is
installed, else zlib) of H&E-like tissue blobs on tinted glass, written tile by tile from generators so that building
it needs no more memory than a tile; a tiny model directory (128-px tiles at 0.78125 um/px, colour-cast removal and
Macenko normalisation, as a model exported from a real store); then runs predict in a child process on a grid, and
prints its tiles per second and the child's peak resident memory (ru_maxrss). Decoded whole, the slide would take
size^2 * 3 bytes (7.9 GB at 51,200 px). Exits 1 when the peak exceeds --max_rss_gb.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

TILE = 512
LEVELS = (1, 2, 4, 8, 16, 32, 64)  # a 2x pyramid, as vips and bfconvert write by default
MASK_CELL = 64  # level-0 pixels per cell of the tissue layout: a divisor of TILE * every downsample above
GLASS = np.array([236, 226, 236], np.float32)  # slightly pink glass, as scanned
HE_STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]], np.float32)


def tissue_layout(size: int, seed: int) -> np.ndarray:
    """Boolean tissue cells [size / MASK_CELL]^2: a few irregular blobs covering about a quarter of the slide."""
    n = size // MASK_CELL
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n].astype(np.float32) / n
    field = np.full((n, n), -1.0, np.float32)
    for _ in range(6):
        cx, cy = rng.uniform(0.2, 0.8, 2)
        rx, ry = rng.uniform(0.06, 0.14, 2)
        field = np.maximum(field, 1.0 - ((xx - cx) / rx) ** 2 - ((yy - cy) / ry) ** 2)
    # Ragged edges: low-frequency noise added before thresholding.
    coarse = rng.normal(0, 0.25, (n // 16 + 2, n // 16 + 2)).astype(np.float32)
    field += np.kron(coarse, np.ones((16, 16), np.float32))[:n, :n]
    return field > 0.0


def texture_bank(k: int, seed: int) -> np.ndarray:
    """k H&E-like RGB textures [k, TILE, TILE, 3]: Beer-Lambert mixes of haematoxylin (nuclei) and eosin."""
    rng = np.random.default_rng(seed)
    out = np.empty((k, TILE, TILE, 3), np.uint8)
    for i in range(k):
        # Texture at every scale (the same bank fills every level): per-pixel stain plus 8-px nuclei.
        nuclei = np.kron(rng.random((TILE // 8, TILE // 8)) > 0.85, np.ones((8, 8)))
        h = 0.15 + 0.4 * rng.random((TILE, TILE)) + 1.2 * nuclei
        e = 0.3 + 0.8 * rng.random((TILE, TILE))
        conc = np.stack([h, e], -1).astype(np.float32)
        rgb = GLASS * np.exp(-(conc @ HE_STAINS)) + rng.normal(0, 2.0, (TILE, TILE, 3))
        out[i] = np.clip(np.rint(rgb), 0, 255)
    return out


def level_tiles(layout: np.ndarray, size: int, downsample: int, bank: np.ndarray):
    """Tiles of one level, row by row, each TILE x TILE (edge tiles padded with glass)."""
    glass = np.broadcast_to(GLASS.astype(np.uint8), (TILE, TILE, 3))
    side = -(-size // downsample)
    cells_per_tile = TILE * downsample // MASK_CELL
    cell_px = MASK_CELL // downsample if downsample <= MASK_CELL else None
    for ty in range(-(-side // TILE)):
        for tx in range(-(-side // TILE)):
            cells = layout[ty * cells_per_tile:(ty + 1) * cells_per_tile, tx * cells_per_tile:(tx + 1) * cells_per_tile]
            if not cells.any():
                yield glass
                continue
            full = np.zeros((cells_per_tile, cells_per_tile), bool)
            full[:cells.shape[0], :cells.shape[1]] = cells
            mask = np.kron(full, np.ones((cell_px, cell_px), bool)) if cell_px else full
            texture = bank[(ty * 7919 + tx * 104729 + downsample) % len(bank)]
            yield np.where(mask[..., None], texture, glass)


def build_slide(path: str, size: int, mpp: float, seed: int) -> dict:
    import tifffile

    import importlib.util

    # tifffile encodes JPEG through imagecodecs; zlib needs nothing beyond the standard library.
    compression = ("jpeg", {"level": 90}) if importlib.util.find_spec("imagecodecs") else ("zlib", {"level": 6})
    layout = tissue_layout(size, seed)
    bank = texture_bank(16, seed)
    t0 = time.time()
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, d in enumerate(LEVELS):
            side = -(-size // d)
            extra = ({"subifds": len(LEVELS) - 1, "resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
                     if i == 0 else {"subfiletype": 1})
            tw.write(level_tiles(layout, size, d, bank), shape=(side, side, 3), dtype=np.uint8, tile=(TILE, TILE),
                     photometric="rgb", compression=compression[0], compressionargs=compression[1], **extra)
    return {"path": path, "size_px": size, "levels": list(LEVELS), "compression": compression[0],
            "tissue_fraction": float(layout.mean()), "file_gb": os.path.getsize(path) / 1e9,
            "build_s": time.time() - t0}


# (encoder features, head conv features, head FC features, genes): a tiny model, and the standard recipe's
# (the paper's architecture with the 1,443 genes of the four shared HER2ST sections).
ARCHITECTURES = {"tiny": ((4, 4, 8), (8,), (16,), 8), "standard": ((32, 64, 128), (128,), (256,), 1443)}


def build_model(path: str, smoothing_weight: float, architecture: str = "tiny", members: int = 1,
                views: int = 1) -> None:
    """A HistoSpace exported the way model_export writes one (model.json + Orbax checkpoint): `members` heads
    sharing one frozen encoder, `views` dihedral views averaged, smoothing its predictions over adjacent grid
    tiles with `smoothing_weight` on each tile's own (1 = not smoothed), as a standard-recipe model does when its
    inner validation chose smoothing."""
    import jax
    import jax.numpy as jnp

    from histospace_jax import checkpointing, models
    from histospace_jax.ingest import stain

    enc, conv, fc, n_genes = ARCHITECTURES[architecture]
    genes = [f"G{i}" for i in range(n_genes)]
    model = models.HistoSpace(n_genes=len(genes), variant="relu_bn", encoder_features=enc, conv_features=conv,
                              fc_features=fc)
    stacked = [jax.tree_util.tree_map(np.asarray, dict(model.init(jax.random.PRNGKey(k), jnp.zeros((1, 128, 128, 3)))))
               for k in range(members)]
    # One frozen encoder for every member, as training leaves it.
    stacked = [{c: {**v, "encoder": stacked[0][c]["encoder"]} if "encoder" in v else v for c, v in m.items()}
               for m in stacked]
    os.makedirs(path, exist_ok=True)
    shutil.rmtree(os.path.join(path, "checkpoint"), ignore_errors=True)  # a reused --workdir: write it afresh
    ck = checkpointing.Checkpointer(os.path.join(path, "checkpoint"), max_to_keep=1)
    ck.save(0, jax.tree_util.tree_map(lambda *xs: np.stack(xs), *stacked))
    ck.close()
    ref = stain.builtin_reference()
    info = {"format": "histospace-model", "version": 2, "genes": genes,
            "model": {"variant": "relu_bn", "encoder_features": list(enc), "head_conv_features": list(conv),
                      "head_fc_features": list(fc), "dropout_rate": 0.0,
                      "smoothing": ({"radius": 1.5, "self_weight": smoothing_weight} if smoothing_weight < 1
                                    else None)},
            "ensemble": members, "views": views, "target_mean": [0.0] * len(genes), "target_sd": [1.0] * len(genes),
            "tile_size": 128, "microns_per_pixel": 100.0 / 128,
            "colour_cast": {"enabled": True, "percentile": 99.0},
            "stain_normalisation": {"method": "macenko", **ref.to_json()}}
    with open(os.path.join(path, "model.json"), "w") as f:
        json.dump(info, f)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="where to build the slide and model (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the workdir (default: removed when temporary)")
    p.add_argument("--size", type=int, default=51200, help="slide side in pixels (>= 50,000 for the acceptance)")
    p.add_argument("--mpp", type=float, default=0.25, help="slide microns per pixel (40x)")
    p.add_argument("--grid_step_um", type=float, default=100.0)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--max_rss_gb", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoothing_weight", type=float, default=0.75,
                   help="the model's neighbour smoothing (a second pass over the predictions); 1 = none")
    p.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="tiny",
                   help="tiny (memory of the slide path), or standard (the paper's architecture, 1,443 genes)")
    p.add_argument("--members", type=int, default=1, help="ensemble heads (the standard recipe: 5)")
    p.add_argument("--views", type=int, default=1, help="dihedral views averaged (the standard recipe: 8)")
    args = p.parse_args()

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, repo)
    work = args.workdir or tempfile.mkdtemp(prefix="wsi_bench_")
    os.makedirs(work, exist_ok=True)
    try:
        slide = os.path.join(work, f"synthetic_{args.size}.tif")
        if os.path.exists(slide):
            print(f"[bench] reusing {slide}")
            info = {"path": slide, "size_px": args.size, "file_gb": os.path.getsize(slide) / 1e9}
        else:
            print(f"[bench] writing a {args.size}x{args.size} px pyramidal TIFF to {slide} ...", flush=True)
            info = build_slide(slide + ".part", args.size, args.mpp, args.seed)
            os.replace(slide + ".part", slide)
            print(f"[bench] slide: {info['compression']}, levels {info['levels']}, {info['file_gb']:.2f} GB, tissue "
                  f"{info['tissue_fraction']:.0%} of the area, built in {info['build_s']:.0f} s", flush=True)
        model = os.path.join(work, "model")
        build_model(model, args.smoothing_weight, args.architecture, args.members, args.views)
        out = os.path.join(work, "prediction")
        cmd = [sys.executable, "-m", "histospace_jax.predict", f"--checkpoint={model}", f"--image={slide}",
               f"--grid_step_um={args.grid_step_um}", f"--batch_size={args.batch_size}", f"--output={out}",
               "--overwrite", "--genes=G0"]
        print("[bench] " + " ".join(cmd[1:]), flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
        wall = time.time() - t0
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9  # Linux: kilobytes
        print(proc.stdout[-4000:], end="")
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        summary = json.load(open(os.path.join(out, "prediction.json")))
        rates = re.findall(r"([0-9.]+) tiles/s", proc.stdout)
        n = summary["n_predicted"]
        print(f"[bench] slide {args.size}x{args.size} px ({args.size ** 2 * 3 / 1e9:.1f} GB decoded), "
              f"{summary['n_positions']} grid positions, {n} on tissue predicted")
        print(f"[bench] predict: {wall:.1f} s wall incl. start-up -> {n / wall:.1f} tiles/s overall; "
              f"{rates[-1] if rates else '?'} tiles/s in the prediction loop")
        print(f"[bench] model: {args.architecture}, {args.members} head(s) on one encoder, {args.views} view(s); "
              f"neighbour smoothing: {summary.get('smoothing') or 'none'}")
        print(f"[bench] peak RSS of predict: {peak_gb:.2f} GB (limit {args.max_rss_gb} GB): "
              f"{'PASS' if peak_gb <= args.max_rss_gb else 'FAIL'}")
        return 0 if peak_gb <= args.max_rss_gb else 1
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
