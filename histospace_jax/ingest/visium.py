"""10x Visium (Space Ranger `outs/`) reader.

Inputs (--input is the `outs/` folder, or the folder holding it; --image the full-resolution H&E image)::

    filtered_feature_bc_matrix.h5            CSC matrix (matrix/data, indices, indptr, shape, barcodes, features/...)
      or filtered_feature_bc_matrix/         matrix.mtx(.gz) (genes x barcodes), features.tsv(.gz), barcodes.tsv(.gz)
    spatial/tissue_positions.csv             Space Ranger >= 2: header barcode,in_tissue,array_row,array_col,
                                             pxl_row_in_fullres,pxl_col_in_fullres
      or spatial/tissue_positions_list.csv   Space Ranger 1: same columns, no header
    spatial/scalefactors_json.json           spot_diameter_fullres (55 um spots) -> microns per pixel

Only "Gene Expression" features are read (so a spot's library size and genes detected are over its Gene
Expression features; antibody and other feature types are not genes). Spots kept: in_tissue == 1 barcodes with
a matrix column. obs array_x/array_y = array_col/array_row; pixel_x/pixel_y = pxl_col/pxl_row_in_fullres
(full-resolution frame).
Gene IDs: symbols (features "name") natively; --gene_ids=ensembl takes the features "id" column directly.
"""

from __future__ import annotations

import gzip
import json
import os

import h5py
import numpy as np
import scipy.io
from scipy import sparse

from histospace_jax.ingest.common import (VISIUM_SPOT_DIAMETER_UM, CountMatrix, IngestError, SectionSource,
                                          SectionTable, check_unique, open_text, split_lines)

FORMAT = "visium"
POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")


def _outs(input_dir: str) -> str:
    for cand in (input_dir, os.path.join(input_dir, "outs")):
        if os.path.isdir(os.path.join(cand, "spatial")):
            return cand
    raise IngestError(f"{input_dir}: no spatial/ folder here or in outs/; --input must be Space Ranger's outs/.")


def discover(input_dirs: list[str], images: list[str], section_names: list[str] | None,
             patients: list[str] | None) -> list[SectionSource]:
    if len(images) != len(input_dirs):
        raise IngestError(
            f"--image: {len(images)} image(s) for {len(input_dirs)} Visium input(s); give one full-resolution "
            "H&E image per --input, comma-separated in the same order."
        )
    out = []
    for k, (inp, image) in enumerate(zip(input_dirs, images)):
        outs = _outs(inp)
        files = {"scalefactors": os.path.join(outs, "spatial", "scalefactors_json.json")}
        for name in ("tissue_positions.csv", "tissue_positions_list.csv"):
            p = os.path.join(outs, "spatial", name)
            if os.path.isfile(p):
                files["positions"] = p
                break
        else:
            raise IngestError(f"{outs}/spatial: neither tissue_positions.csv nor tissue_positions_list.csv; "
                              "copy Space Ranger's spatial/ folder completely.")
        h5 = os.path.join(outs, "filtered_feature_bc_matrix.h5")
        mtx = os.path.join(outs, "filtered_feature_bc_matrix")
        if os.path.isfile(h5):
            files["h5"] = h5
        elif os.path.isdir(mtx):
            files["mtx"] = mtx
        else:
            raise IngestError(f"{outs}: no filtered_feature_bc_matrix.h5 or filtered_feature_bc_matrix/ folder; "
                              "copy the Space Ranger outputs completely.")
        if not os.path.isfile(files["scalefactors"]):
            raise IngestError(f"{files['scalefactors']}: missing; it gives the spot size (microns per pixel). "
                              "Copy it from Space Ranger's spatial/ or pass --source_mpp.")
        default = os.path.basename(os.path.dirname(os.path.abspath(outs))) or f"visium{k}"
        section = section_names[k] if section_names else default
        patient = patients[k] if patients else section
        out.append(SectionSource(FORMAT, section, patient, image, files))
    return out


def read_positions(path: str) -> dict[str, tuple[int, int, int, float, float]]:
    """{barcode: (in_tissue, array_row, array_col, pxl_row, pxl_col)}; with or without the header line."""
    lines = split_lines(open_text(path))
    if not lines:
        raise IngestError(f"{path}: empty positions file.")
    first = [f.strip() for f in lines[0].split(",")]
    if first[0] == "barcode":
        if tuple(first[:6]) != POSITION_COLUMNS:
            raise IngestError(f"{path}: header {first} is not {list(POSITION_COLUMNS)}.")
        lines = lines[1:]
    out = {}
    for n, line in enumerate(lines, start=1):
        f = [v.strip() for v in line.split(",")]
        if len(f) < 6:
            raise IngestError(f"{path}: line {n} has {len(f)} fields; expected {list(POSITION_COLUMNS)}.")
        if f[0] in out:
            raise IngestError(f"{path}: barcode {f[0]!r} listed twice; the file is corrupt, copy it again.")
        try:
            out[f[0]] = (int(f[1]), int(f[2]), int(f[3]), float(f[4]), float(f[5]))
        except ValueError:
            raise IngestError(f"{path}: line {n} (barcode {f[0]!r}) has non-numeric fields {f[1:6]}.") from None
    return out


def _decode(a) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in a]


def read_h5(path: str, use_ids: bool) -> tuple[list[str], CountMatrix, np.ndarray]:
    """(barcodes, matrix spots x genes, genes detected per barcode) from a Space Ranger feature-barcode h5 (genes x
    barcodes CSC)."""
    try:
        with h5py.File(path, "r") as f:
            g = f["matrix"]
            barcodes = _decode(g["barcodes"][:])
            n_genes, n_barcodes = (int(v) for v in g["shape"][:])
            data, indices, indptr = g["data"][:], g["indices"][:], g["indptr"][:]
            feats = g["features"]
            ids = _decode(feats["id"][:])
            names = _decode(feats["name"][:])
            types = _decode(feats["feature_type"][:]) if "feature_type" in feats else ["Gene Expression"] * n_genes
    except (OSError, KeyError) as e:
        raise IngestError(f"{path}: not a Space Ranger feature-barcode matrix ({e}); copy the file again.") from e
    try:
        genes_by_barcodes = sparse.csc_array((data, indices, indptr), shape=(n_genes, n_barcodes))
    except ValueError as e:
        raise IngestError(f"{path}: matrix/data, indices, indptr and shape disagree ({e}); the file is truncated "
                          "or corrupt, copy it again.") from e
    _check_shape(path, genes_by_barcodes.shape, ids, barcodes)
    return (barcodes, *_finish(path, barcodes, ids, names, types, genes_by_barcodes.T, use_ids))


def read_mtx(folder: str, use_ids: bool) -> tuple[list[str], CountMatrix, np.ndarray]:
    """(barcodes, matrix spots x genes, genes detected per barcode) from a Space Ranger matrix folder (Matrix
    Market, genes x barcodes)."""
    def find(*names):
        for n in names:
            p = os.path.join(folder, n)
            if os.path.isfile(p):
                return p
        raise IngestError(f"{folder}: none of {names}; copy the Space Ranger matrix folder completely.")

    mtx = find("matrix.mtx.gz", "matrix.mtx")
    feat_path = find("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")
    barcodes = [line.split("\t")[0] for line in split_lines(open_text(find("barcodes.tsv.gz", "barcodes.tsv")))]
    feats = [line.split("\t") for line in split_lines(open_text(feat_path))]
    ids = [f[0] for f in feats]
    names = [f[1] if len(f) > 1 else f[0] for f in feats]
    types = [f[2] if len(f) > 2 else "Gene Expression" for f in feats]
    try:
        with (gzip.open(mtx, "rb") if mtx.endswith(".gz") else open(mtx, "rb")) as f:
            genes_by_barcodes = scipy.io.mmread(f)
    except (OSError, EOFError, ValueError) as e:  # bad gzip stream / truncated stream / malformed Matrix Market
        raise IngestError(f"{mtx}: cannot read ({e}); the file is truncated or corrupt, download it again.") from e
    if not sparse.issparse(genes_by_barcodes):
        raise IngestError(f"{mtx}: a dense Matrix Market array, not Space Ranger's 'coordinate' matrix; copy the "
                          "matrix folder from Space Ranger's outs/ again.")
    _check_shape(mtx, genes_by_barcodes.shape, ids, barcodes)
    return (barcodes, *_finish(mtx, barcodes, ids, names, types, genes_by_barcodes.T, use_ids))


def _check_shape(path, shape, ids, barcodes) -> None:
    if tuple(shape) != (len(ids), len(barcodes)):
        raise IngestError(f"{path}: shape {shape[0]}x{shape[1]} does not match {len(ids)} features x "
                          f"{len(barcodes)} barcodes; the counts, features and barcodes come from different runs, copy "
                          "Space Ranger's matrix outputs again.")


def _finish(path, barcodes, ids, names, types, spots_by_features, use_ids) -> tuple[CountMatrix, np.ndarray]:
    """Checks the counts, keeps the Gene Expression features and names the genes. Returns the matrix and, per
    barcode, the number of Gene Expression features with a count > 0 (before features sharing a symbol are
    summed: the raw matrix's genes detected)."""
    check_unique(barcodes, path, "barcode")
    entries = sparse.coo_array(spots_by_features)
    for bad, what in ((~np.isfinite(entries.data), "non-finite count"), (entries.data < 0, "negative count")):
        if bad.any():
            i = int(np.argmax(bad))
            raise IngestError(f"{path}: {what} {entries.data[i]} at barcode {barcodes[entries.row[i]]!r}, gene "
                              f"{names[entries.col[i]]!r}; counts must be raw non-negative UMI counts, copy the "
                              "file again.")
    is_gex = np.array([t == "Gene Expression" for t in types], dtype=bool)
    genes = [(i if use_ids else n) for i, n, g in zip(ids, names, is_gex) if g]
    counts = CountMatrix(genes, sparse.csc_array(spots_by_features)[:, np.flatnonzero(is_gex)])
    detected = counts.nonzero_per_row()
    if len(set(genes)) != len(genes):  # a few symbols name two Ensembl genes in 10x references: sum them
        counts, _ = counts.rename_genes(genes)
    return counts, detected


def read_section(src: SectionSource, missing_counts: str = "drop", source_mpp: float | None = None,
                 use_ids: bool = False) -> SectionTable:
    pos_path = src.files["positions"]
    positions = read_positions(pos_path)
    if "h5" in src.files:
        barcodes, counts, detected = read_h5(src.files["h5"], use_ids)
        counts_path = src.files["h5"]
    else:
        barcodes, counts, detected = read_mtx(src.files["mtx"], use_ids)
        counts_path = src.files["mtx"]
    unknown = [b for b in barcodes if b not in positions]
    if unknown:
        raise IngestError(f"{counts_path}: {len(unknown)} barcode(s) not in {pos_path}, e.g. {unknown[:3]}; the "
                          "matrix and the positions file come from different runs.")
    in_tissue = [b for b, p in positions.items() if p[0] == 1]
    col = {b: i for i, b in enumerate(barcodes)}
    have = np.array([b in col for b in in_tissue], dtype=bool)
    if not have.all() and missing_counts == "error":
        missing = [b for b, h in zip(in_tissue, have) if not h]
        raise IngestError(f"{counts_path}: no counts for {len(missing)} in-tissue barcode(s) of {pos_path}, e.g. "
                          f"{missing[:3]}; pass --missing_counts=drop or use the matching matrix.")
    kept = [b for b, h in zip(in_tissue, have) if h]
    not_in_tissue = sum(1 for b in barcodes if positions[b][0] != 1)
    kept_cols = np.array([col[b] for b in kept], dtype=np.int64)
    counts = counts.take_rows(kept_cols)
    if source_mpp:
        mpp, how = float(source_mpp), "given by --source_mpp"
    else:
        try:
            with open(src.files["scalefactors"]) as f:
                diameter = float(json.load(f)["spot_diameter_fullres"])
        except (OSError, ValueError, KeyError) as e:
            raise IngestError(f"{src.files['scalefactors']}: no usable spot_diameter_fullres ({e}); "
                              "pass --source_mpp.") from e
        mpp, how = VISIUM_SPOT_DIAMETER_UM / diameter, "spot_diameter_fullres of scalefactors_json.json (55 um spots)"
    p = np.array([positions[b] for b in kept], dtype=np.float64).reshape(-1, 5)
    return SectionTable(
        source=src,
        spot_ids=np.array(kept, dtype=object).astype(str),
        array_x=p[:, 2].astype(np.int32),
        array_y=p[:, 1].astype(np.int32),
        pixel_x=p[:, 4],
        pixel_y=p[:, 3],
        labels=np.array([""] * len(kept), dtype=object).astype(str),
        counts=counts,
        microns_per_pixel=mpp,
        mpp_method=how,
        dropped={"no_counts": int((~have).sum())},
        notes={"native_ids": "ensembl" if use_ids else "symbol", "spots_in_tissue": len(in_tissue),
               "matrix_barcodes_off_tissue": not_in_tissue},
        n_genes_detected=detected[kept_cols],
    )
