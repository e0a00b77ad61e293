"""HEST-1k (Jaume et al. 2024, NeurIPS) reader: one layout for every sample of every technology.

Layout (under --input)::

    st/<id>.h5ad          AnnData: X counts (spots x genes), obsm["spatial"] spot centres (x = column, y = row) in
                          full-resolution pixels of the slide; obs array_row/array_col and in_tissue when present
    wsis/<id>.tif         pyramidal generic TIFF (BigTIFF when large); its first page is the full-resolution slide
    metadata/<id>.json    pixel_size_um_estimated / pixel_size_um_embedded, spot_diameter and inter_spot_dist (um),
                          st_technology, patient, organ, dataset_title
    patches/<id>.h5       ignored: tiles are cut from the slide at this package's scale
    tissue_seg/*.pkl      never opened: unpickling a downloaded file can run arbitrary code; tissue is judged by
                          prepare's own per-tile check

Sections are samples (--samples, or --sections). Patients come from the metadata's `patient`, so that
leave-one-patient-out keeps every sample of a patient together; HEST's patient names ("Patient 1") are only
unique within a dataset, so a name that occurs in two datasets of one job is prefixed with its dataset_title.
A sample without a patient is its own patient. Microns per pixel: pixel_size_um_estimated (HEST fits it to the
spot grid), else pixel_size_um_embedded (the scanner's value), else --source_mpp. Spots kept: in_tissue == 1
where obs has that column, else all. X must hold raw counts (they go through the same normalisation and gene
selection as every other format); already-normalised values are refused unless --hest_normalised says how to get
counts back (see `NORMALISED_POLICIES`).
"""

from __future__ import annotations

import glob
import json
import math
import os

import numpy as np
from scipy import sparse

from histospace_jax.ingest import slide_io
from histospace_jax.ingest.common import CountMatrix, IngestError, SectionSource, SectionTable, check_unique

FORMAT = "hest"
# What to do when X is not raw counts: refuse (default); take the raw counts the file also holds (layers["counts"],
# then .raw); or undo log1p (exact for log1p(counts / library * scale): re-normalising expm1(X) by its own row sums
# gives back the same values, since those rows sum to `scale`).
NORMALISED_POLICIES = ("refuse", "raw", "expm1")
METADATA_MPP_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")
ARRAY_COLUMNS = ("array_col", "array_row")
SHOWN_IDS = 20  # available sample ids listed in an error (HEST has over a thousand)


def _root(input_dir: str) -> str:
    if not os.path.isdir(os.path.join(input_dir, "st")):
        raise IngestError(f"{input_dir}: no st/ folder; --input must be the HEST-1k download folder (holding st/, "
                          "wsis/ and metadata/).")
    return input_dir


def _missing(value) -> bool:
    """True for the ways HEST metadata says "unknown": absent, null, NaN, empty or 'nan'."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none", "null")


def read_metadata(path: str) -> dict:
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError as e:
        raise IngestError(f"{path}: metadata file missing; it gives the slide's pixel size and the patient. Restore "
                          "metadata/<id>.json from the HEST-1k download, or leave the sample out with --samples.") from e
    except (OSError, ValueError) as e:
        raise IngestError(f"{path}: unreadable metadata ({e}); download the file again.") from e
    if not isinstance(meta, dict):
        raise IngestError(f"{path}: metadata is a JSON {type(meta).__name__}, not an object of fields; download the "
                          "file again.")
    return meta


def _patients(samples: list[str], metas: dict[str, dict]) -> dict[str, tuple[str, str]]:
    """{sample: (patient id, where it came from)}."""
    named = {}
    for s in samples:
        p = metas[s].get("patient")
        named[s] = (s, "sample id (metadata has no patient)") if _missing(p) else (str(p).strip(), "metadata patient")
    datasets: dict[str, set] = {}
    for s, (p, how) in named.items():
        if how == "metadata patient":
            datasets.setdefault(p, set()).add(str(metas[s].get("dataset_title") or "unknown dataset"))
    out = {}
    for s, (p, how) in named.items():
        if how == "metadata patient" and len(datasets[p]) > 1:
            dataset = str(metas[s].get("dataset_title") or "unknown dataset")
            out[s] = (f"{dataset}/{p}", "metadata patient, prefixed with dataset_title (the name recurs in another "
                                        "dataset of this job)")
        else:
            out[s] = (p, how)
    return out


def discover(input_dir: str, samples: list[str] | None) -> list[SectionSource]:
    root = _root(input_dir)
    available = sorted(os.path.basename(p)[: -len(".h5ad")] for p in glob.glob(os.path.join(root, "st", "*.h5ad")))
    if not available:
        raise IngestError(f"{root}/st: no <id>.h5ad files; is the HEST-1k download complete?")
    chosen = list(samples) if samples else available
    unknown = [s for s in chosen if s not in available]
    if unknown:
        shown = ", ".join(available[:SHOWN_IDS]) + (f" ... ({len(available)} in all)" if len(available) > SHOWN_IDS
                                                    else "")
        raise IngestError(f"--samples: {unknown} have no {root}/st/<id>.h5ad (available: {shown}); fix --samples.")
    images, metas = {}, {}
    for s in chosen:
        tifs = [p for p in (os.path.join(root, "wsis", f"{s}.tif"), os.path.join(root, "wsis", f"{s}.tiff"))
                if os.path.isfile(p)]
        if not tifs:
            raise IngestError(f"{os.path.join(root, 'wsis', s + '.tif')}: slide of sample {s} missing; download "
                              "wsis/<id>.tif from HEST-1k, or leave the sample out with --samples.")
        images[s] = tifs[0]
        metas[s] = read_metadata(os.path.join(root, "metadata", f"{s}.json"))
    patients = _patients(chosen, metas)
    out = []
    for s in chosen:
        meta = metas[s]
        extra = {"patient_source": patients[s][1]}
        for key in ("st_technology", "organ", "dataset_title"):
            if not _missing(meta.get(key)):
                extra[key] = str(meta[key])
        files = {"counts": os.path.join(root, "st", f"{s}.h5ad"), "metadata": os.path.join(root, "metadata",
                                                                                            f"{s}.json")}
        out.append(SectionSource(FORMAT, s, patients[s][0], images[s], files, extra))
    return out


def _positive_number(meta: dict, key: str, path: str) -> float | None:
    value = meta.get(key)
    if _missing(value):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not (math.isfinite(number) and number > 0):
        raise IngestError(f"{path}: {key} = {value!r} is not a positive number; fix it, or remove it (and pass "
                          "--source_mpp where it is the pixel size).")
    return number


def metadata_mpp(meta: dict, path: str) -> tuple[float, str]:
    for key in METADATA_MPP_KEYS:
        mpp = _positive_number(meta, key, path)
        if mpp is not None:
            return mpp, f"{key} of the HEST metadata"
    raise IngestError(f"{path}: neither {' nor '.join(METADATA_MPP_KEYS)} is set; the slide's scale is unknown. Pass "
                      "--source_mpp (microns per pixel of wsis/<id>.tif) or restore the metadata file.")


def slide_size(path: str) -> tuple[int, int]:
    """(width, height) of the full-resolution level, from the TIFF header alone."""
    import tifffile  # only --format=hest needs it

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            return int(page.imagewidth), int(page.imagelength)
    except FileNotFoundError as e:
        raise IngestError(f"{path}: slide not found; download wsis/<id>.tif from HEST-1k.") from e
    except (tifffile.TiffFileError, OSError, ValueError, IndexError) as e:
        raise IngestError(f"{path}: not a readable TIFF ({e}); download the slide again.") from e


def _read_h5ad(path: str):
    try:
        import anndata  # imported here: only --format=hest needs it, and it is slow to import
    except ImportError as e:
        raise IngestError("--format=hest reads .h5ad files with anndata; pip install anndata.") from e
    try:
        return anndata.read_h5ad(path)
    except FileNotFoundError as e:
        raise IngestError(f"{path}: file not found; restore st/<id>.h5ad from the HEST-1k download.") from e
    except Exception as e:  # h5py, anndata and pandas raise many types on a truncated or foreign file
        raise IngestError(f"{path}: not a readable AnnData file ({type(e).__name__}: {e}); download it again.") from e


def count_problem(matrix) -> str | None:
    """Why `matrix` is not raw counts (negative, non-integer or non-finite values), or None when it is."""
    values = np.asarray(matrix.data if sparse.issparse(matrix) else matrix, dtype=np.float64).ravel()
    if not values.size:
        return None
    finite = np.isfinite(values)
    if not finite.all():
        return f"non-finite values ({values[~finite][0]})"
    if (values < 0).any():
        return f"negative values (min {values.min():.4g})"
    fractional = values != np.round(values)
    if fractional.any():
        return f"non-integer values (e.g. {values[fractional][0]:.4g})"
    return None


def _counts(adata, path: str, policy: str) -> tuple[list[str], object, str]:
    """(gene names, spots x genes counts, where they came from) under the --hest_normalised policy."""
    if adata.X is None:
        raise IngestError(f"{path}: X is empty; the file holds no expression. Download st/<id>.h5ad again.")
    problem = count_problem(adata.X)
    genes = [str(g) for g in adata.var_names]
    if problem is None:
        return genes, adata.X, "X (raw counts)"
    others = []
    if "counts" in adata.layers:
        others.append(("layers['counts']", adata.layers["counts"], genes))
    if adata.raw is not None:
        others.append(("raw.X", adata.raw.X, [str(g) for g in adata.raw.var_names]))
    raw_ones = [(name, m, g) for name, m, g in others if count_problem(m) is None]
    if policy == "raw":
        if not raw_ones:
            raise IngestError(f"{path}: X holds {problem}, and neither layers['counts'] nor raw.X holds raw counts; "
                              "--hest_normalised=raw has nothing to take. Pass --hest_normalised=expm1 if X is "
                              "log1p-normalised, or use a file with raw counts.")
        name, matrix, g = raw_ones[0]
        return g, matrix, f"{name} (raw counts; X holds {problem})"
    if policy == "expm1":
        x = sparse.csr_array(adata.X, dtype=np.float64)  # expm1(0) = 0: only stored entries change
        x.data = np.expm1(x.data)
        values = x.data
        if not (np.isfinite(values).all() and (values >= 0).all()):
            raise IngestError(f"{path}: expm1 of X gives negative or non-finite values; X is not log1p-normalised, "
                              "so --hest_normalised=expm1 cannot undo it. Use a file with raw counts.")
        return genes, x, ("expm1 of X (log1p-normalised values undone: library sizes are the normalisation's "
                          f"scale, so --min_umi acts on that; X held {problem})")
    hint = (f"; it also holds raw counts in {raw_ones[0][0]}: pass --hest_normalised=raw to use them" if raw_ones
            else "; pass --hest_normalised=expm1 to undo a log1p(counts / library * scale) transform, or use a file "
                 "with raw counts")
    raise IngestError(f"{path}: X holds {problem}, i.e. already-normalised values, not raw counts; prepare normalises "
                      f"raw counts itself{hint}.")


def _obs_numbers(obs, column: str, path: str) -> np.ndarray:
    try:
        return np.asarray(obs[column], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise IngestError(f"{path}: obs column {column!r} is not numeric ({e}); fix or drop that column.") from e


def _array_coordinates(obs, px: np.ndarray, py: np.ndarray, step_px: float | None, path: str
                       ) -> tuple[np.ndarray, np.ndarray, str]:
    if all(c in obs.columns for c in ARRAY_COLUMNS):
        ax, ay = (_obs_numbers(obs, c, path) for c in ARRAY_COLUMNS)
        if np.isfinite(ax).all() and np.isfinite(ay).all():
            return np.rint(ax), np.rint(ay), "obs array_col / array_row"
    # The grid blocks of the evaluation need grid positions; the spot spacing turns pixels into them.
    how = "pixels / inter_spot_dist of the metadata"
    if step_px is None:
        if len(px) < 2:
            return np.zeros(len(px)), np.zeros(len(px)), "none (a single spot)"
        from scipy.spatial import cKDTree

        dist, _ = cKDTree(np.stack([px, py], axis=1)).query(np.stack([px, py], axis=1), k=2)
        step_px = float(np.median(dist[:, 1]))
        how = "pixels / median nearest-spot distance (no array_row/array_col, no inter_spot_dist)"
    return np.rint((px - px.min()) / step_px), np.rint((py - py.min()) / step_px), how


def read_section(src: SectionSource, missing_counts: str = "drop", source_mpp: float | None = None,
                 normalised: str = "refuse") -> SectionTable:
    """`missing_counts` is accepted for the common reader signature: every obs row of an h5ad has its counts."""
    del missing_counts
    path, meta_path = src.files["counts"], src.files["metadata"]
    meta = read_metadata(meta_path)
    if source_mpp:
        mpp, how = float(source_mpp), "given by --source_mpp"
    else:
        mpp, how = metadata_mpp(meta, meta_path)
    adata = _read_h5ad(path)
    if "spatial" not in adata.obsm:
        raise IngestError(f"{path}: no obsm['spatial'] (spot centres, x = column, y = row, in full-resolution pixels "
                          "of wsis/<id>.tif); HEST writes it. Download the file again, or add it, e.g. "
                          "adata.obsm['spatial'] = adata.obs[['pxl_col_in_fullres', 'pxl_row_in_fullres']].to_numpy().")
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[0] != adata.n_obs or xy.shape[1] < 2:
        raise IngestError(f"{path}: obsm['spatial'] has shape {xy.shape}, expected ({adata.n_obs}, 2) (x, y per "
                          "spot); download the file again.")
    spot_ids = np.array([str(s) for s in adata.obs_names], dtype=object).astype(str)
    check_unique(spot_ids, path)
    genes, matrix, counts_from = _counts(adata, path, normalised)
    if "in_tissue" in adata.obs.columns:
        keep = np.flatnonzero(_obs_numbers(adata.obs, "in_tissue", path) == 1)
    else:
        keep = np.arange(adata.n_obs)
    px, py = xy[keep, 0], xy[keep, 1]
    unplaced = ~(np.isfinite(px) & np.isfinite(py))
    if unplaced.any():
        raise IngestError(f"{path}: spot {spot_ids[keep][np.argmax(unplaced)]!r} has no finite obsm['spatial'] "
                          "position; remove that spot or restore its coordinates.")
    width, height = slide_size(src.image_path)
    i, _ = slide_io.first_outside(px, py, width, height)
    if i is not None:
        raise IngestError(
            f"{path}: spot {spot_ids[keep][i]!r} has its centre at pixel ({px[i]:.1f}, {py[i]:.1f}), outside the "
            f"{width}x{height} slide {src.image_path}; obsm['spatial'] must be full-resolution pixels of that slide "
            "(x = column, y = row). Coordinates of a downscaled image, or swapped x/y, give this: fix obsm['spatial'] "
            "or download the sample again."
        )
    unmerged = CountMatrix(genes, sparse.csr_array(matrix)[keep])
    detected = unmerged.nonzero_per_row()  # before genes sharing a name are merged: genes of the raw matrix
    counts = unmerged.rename_genes(genes)[0] if len(set(genes)) != len(genes) else unmerged
    inter_spot_um = _positive_number(meta, "inter_spot_dist", meta_path)
    ax, ay, array_how = _array_coordinates(adata.obs.iloc[keep], px, py,
                                           inter_spot_um / mpp if inter_spot_um else None, path)
    ensembl = sum(g.startswith("ENS") for g in counts.genes) > len(counts.genes) / 2
    return SectionTable(
        source=src,
        spot_ids=spot_ids[keep],
        array_x=ax.astype(np.int32),
        array_y=ay.astype(np.int32),
        pixel_x=px.astype(np.float64),
        pixel_y=py.astype(np.float64),
        labels=np.array([""] * len(keep), dtype=object).astype(str),
        counts=counts,
        microns_per_pixel=mpp,
        mpp_method=how,
        dropped={"not_in_tissue": int(adata.n_obs - len(keep))},
        notes={"native_ids": "ensembl" if ensembl else "symbol", "counts_from": counts_from,
               "array_coordinates": array_how, "metadata": meta_path,
               "spot_diameter_um": _positive_number(meta, "spot_diameter", meta_path),
               "inter_spot_dist_um": inter_spot_um, **dict(src.extra)},
        n_genes_detected=detected,
    )
