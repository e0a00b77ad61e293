"""Helpers shared by the ingest tests: synthetic H&E images and writers of small releases in the exact public layouts.

(Named test_*.py so it sits with the tests; it holds a few self-checks of the helpers themselves.)
"""

from __future__ import annotations

import gzip
import math
import os

import numpy as np
from PIL import Image

# The fixtures' spots hold tens of UMIs (a few genes at Poisson 2-4), far below prepare's default --min_umi floor
# for real ST/Visium spots; tests that are not about that filter pass this (keeps every non-empty spot).
FIXTURE_MIN_UMI = 1

# Ground-truth stains for synthetic slides (rows H, E; unit norm), deliberately not the built-in reference.
TRUE_STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
TRUE_STAINS = TRUE_STAINS / np.linalg.norm(TRUE_STAINS, axis=1, keepdims=True)


def synth_he(height: int, width: int, seed: int = 0, stains: np.ndarray = TRUE_STAINS,
             tissue: tuple[int, int, int, int] | None = None, cast=(0.0, 0.0, 0.0)) -> np.ndarray:
    """H&E-like RGB uint8: glass everywhere, Beer-Lambert mixed H and E stains inside the `tissue` box
    (x0, y0, x1, y1; default: the whole image but a 5% border), nuclei as dark H blobs. `cast` adds OD per channel
    everywhere (a tint of the glass)."""
    rng = np.random.default_rng(seed)
    block = 8
    hb, wb = math.ceil(height / block), math.ceil(width / block)
    h_conc = 0.15 + 0.5 * rng.random((hb, wb)) + 1.2 * (rng.random((hb, wb)) > 0.85)
    e_conc = 0.3 + 0.9 * rng.random((hb, wb))
    conc = np.stack([np.kron(h_conc, np.ones((block, block))), np.kron(e_conc, np.ones((block, block)))], -1)
    conc = conc[:height, :width]
    x0, y0, x1, y1 = tissue or (width // 20, height // 20, width - width // 20, height - height // 20)
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    conc[~mask] = 0.0
    od = conc @ stains + np.asarray(cast)[None, None, :]
    rgb = 256.0 * np.exp(-od) - 1.0 + rng.normal(0, 1.0, od.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def write_gz(path: str, text: str) -> None:
    with gzip.open(path, "wb") as f:
        f.write(text.encode())


def write_10x_h5(path: str, counts: np.ndarray, barcodes, ids, names, types) -> None:
    """A Space Ranger filtered_feature_bc_matrix.h5: `counts` [genes, barcodes] stored as its CSC matrix."""
    import h5py

    data, indices, indptr = [], [], [0]
    for c in range(counts.shape[1]):
        nz = np.flatnonzero(counts[:, c])
        data += counts[nz, c].tolist()
        indices += nz.tolist()
        indptr.append(len(data))
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["barcodes"] = np.asarray(barcodes, dtype="S")
        g["data"], g["indices"], g["indptr"] = np.array(data, np.int32), np.array(indices), np.array(indptr)
        g["shape"] = np.array(counts.shape, np.int32)
        fg = g.create_group("features")
        fg["id"], fg["name"] = np.array(ids, dtype="S"), np.array(names, dtype="S")
        fg["feature_type"] = np.array(types, dtype="S")


def st_grid(n_x: int, n_y: int, step: float, origin: float):
    """Spot grid of the ST platform: array (x, y) in 1..n and pixel centres `origin + (a - 1) * step`."""
    xs, ys = np.meshgrid(np.arange(1, n_x + 1), np.arange(1, n_y + 1), indexing="ij")
    xs, ys = xs.ravel(), ys.ravel()
    return xs, ys, origin + (xs - 1) * step, origin + (ys - 1) * step


def write_stnet(root: str, *, seed: int = 0, n_genes: int = 12, patients=(("BC1", "C1"), ("BC2", "D1")),
                image_px: int = 900, step: float = 100.0):
    """A two-section STNet release in its public layout. Returns a dict of what was written, for checks."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    genes = [f"ENSG{1000 + j:011d}" for j in range(n_genes)]
    truth = {}
    meta = ["patient,replicate,type,histology_image,count_matrix,spot_coordinates,tumor_annotation"]
    for k, (pat, rep) in enumerate(patients):
        sec = f"{pat}_{rep}"
        os.makedirs(os.path.join(root, pat), exist_ok=True)
        xs, ys, px, py = st_grid(7, 7, step, origin=150.0)
        px = px + rng.normal(0, 0.3, px.shape)  # scanner registration jitter, as in the release
        py = py + rng.normal(0, 0.3, py.shape)
        under = rng.random(len(xs)) > 0.2  # off-tissue spots are in the count matrix, not in the spots file
        counts = rng.poisson(3.0, (len(xs), n_genes)).astype(int)
        counts[:, 0] = 0  # an unexpressed gene
        counts[: len(xs) // 3, 1] = 0  # a gene expressed in ~2/3 of spots
        keys = [f"{x}x{y}" for x, y in zip(xs, ys)]
        lines = ["\t" + "\t".join(genes)] + [k_ + "\t" + "\t".join(map(str, c)) for k_, c in zip(keys, counts)]
        write_gz(os.path.join(root, pat, f"{sec}_stdata.tsv.gz"), "\n".join(lines) + "\n")
        # One under-tissue spot has no count row: it must be dropped ("no_counts").
        missing_key = keys[int(np.flatnonzero(under)[0])]
        spot_lines = [",X,Y"] + [f"{kk},{a:.2f},{b:.2f}" for kk, a, b, u in zip(keys, px, py, under) if u]
        write_gz(os.path.join(root, pat, f"spots_{sec}.csv.gz"), "\n".join(spot_lines) + "\n")
        # Remove the missing key's count row after writing the spots file.
        kept_lines = [ln for ln in lines if not ln.startswith(missing_key + "\t")]
        write_gz(os.path.join(root, pat, f"{sec}_stdata.tsv.gz"), "\n".join(kept_lines) + "\n")
        # Tumour annotation: CR line endings, header shifted one column left of the data, fractional x/y.
        tumour = rng.random(len(xs)) > 0.5
        ann = ["xcoord\tycoord\tlab\ttumor"]
        for x, y, t in zip(xs, ys, tumour):
            ann.append(f"{x}x{y}\t{x + rng.uniform(-0.3, 0.3):.3f}\t{y + rng.uniform(-0.3, 0.3):.3f}\t"
                       f"{'1' if t else '0'}\t{'tumor' if t else 'non'}")
        write_gz(os.path.join(root, pat, f"{sec}_Coords.tsv.gz"), "\r".join(ann) + "\r")
        img = synth_he(image_px, image_px, seed=seed + k)
        Image.fromarray(img).save(os.path.join(root, pat, f"HE_{sec}.jpg"), quality=95)
        meta.append(f"{pat},{rep},Luminal_A,{pat}/HE_{sec}.jpg,{pat}/{sec}_stdata.tsv.gz,{pat}/spots_{sec}.csv.gz,"
                    f"{pat}/{sec}_Coords.tsv.gz")
        truth[sec] = dict(keys=keys, counts=counts, under=under, px=px, py=py, tumour=tumour, missing=missing_key,
                          xs=xs, ys=ys)
    with open(os.path.join(root, "metadata.csv"), "w") as f:
        f.write("\n".join(meta) + "\n")
    return {"genes": genes, "sections": truth, "mpp": 200.0 / step}


def test_synth_he_is_stained_inside_the_box_only():
    img = synth_he(64, 64, tissue=(16, 16, 48, 48))
    assert img[:8, :8].min() >= 250  # glass
    assert img[20:44, 20:44].mean() < 200  # stained tissue


def test_write_stnet_layout(tmp_path):
    info = write_stnet(str(tmp_path))
    assert os.path.isfile(tmp_path / "metadata.csv")
    raw = gzip.open(tmp_path / "BC1" / "BC1_C1_Coords.tsv.gz").read()
    assert b"\r" in raw and b"\n" not in raw
    assert len(info["sections"]) == 2
