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

Visium HD (recognised by --input holding `binned_outputs/`, under outs/ or not, or being one `square_NNNum/`
folder of it)::

    binned_outputs/square_008um/filtered_feature_bc_matrix.h5 (or filtered_feature_bc_matrix/)   bins x genes
    binned_outputs/square_008um/spatial/tissue_positions.parquet   the columns above, one row per bin
    binned_outputs/square_008um/spatial/scalefactors_json.json     microns_per_pixel, bin_size_um

The 8 um bins are read when present (Space Ranger's recommended bins; 16 um, then 2 um otherwise). Bins are summed
into square pseudo-spots of side P um (--pseudo_spot_um, default 100 um), so the model sees spot-sized expression;
the tile centred on a pseudo-spot spans 3P unless --target_mpp sets it, as an ST tile spans its spot and
surroundings. Rule: a bin of side b at array position (row, col) joins
the pseudo-spot (floor((row + 1/2) b / P), floor((col + 1/2) b / P)), the P-square holding its centre; with
b = 8 and P = 100 a pseudo-spot is 12 or 13 bins a side. Counts: the sum over its in-tissue bins. Centre: the
mean of the full-resolution centres of all its bins. Kept: pseudo-spots whose in-tissue bins cover at least half
of the P x P square.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re

import h5py
import numpy as np
import scipy.io
from scipy import sparse

from histospace_jax.ingest.common import (VISIUM_SPOT_DIAMETER_UM, CountMatrix, IngestError, SectionSource,
                                          SectionTable, check_unique, open_text, spot_key, split_lines)

FORMAT = "visium"
POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
HD_BIN_FOLDER = re.compile(r"square_(\d+)um")
HD_PREFERRED_BIN_UM = (8, 16, 2)  # 8 um: Space Ranger's recommended bins; 2 um bins are 16 times as many rows
HD_MIN_TISSUE_AREA = 0.5  # a pseudo-spot is kept when in-tissue bins cover at least this fraction of its square


def _outs(input_dir: str) -> str:
    for cand in (input_dir, os.path.join(input_dir, "outs")):
        if os.path.isdir(os.path.join(cand, "spatial")):
            return cand
    raise IngestError(f"{input_dir}: no spatial/ folder here or in outs/; --input must be Space Ranger's outs/.")


def _hd_bin_folder(input_dir: str) -> str | None:
    """The Visium HD binned-output folder to read, or None when --input is not a Visium HD output."""
    path = os.path.abspath(input_dir)
    if HD_BIN_FOLDER.fullmatch(os.path.basename(path)):
        return path
    for binned in (path, os.path.join(path, "binned_outputs"), os.path.join(path, "outs", "binned_outputs")):
        if os.path.basename(binned) == "binned_outputs" and os.path.isdir(binned):
            sizes = {int(m.group(1)): name for name in os.listdir(binned)
                     if (m := HD_BIN_FOLDER.fullmatch(name)) and os.path.isdir(os.path.join(binned, name))}
            if not sizes:
                raise IngestError(f"{binned}: no square_NNNum/ folder; copy Space Ranger's binned outputs completely.")
            order = [b for b in HD_PREFERRED_BIN_UM if b in sizes] + sorted(set(sizes) - set(HD_PREFERRED_BIN_UM))
            return os.path.join(binned, sizes[order[0]])
    return None


def _section_default(bins: str, k: int) -> str:
    """The folder above outs/ (Space Ranger's sample folder), or above binned_outputs/ when outs/ was renamed."""
    parts = os.path.abspath(bins).split(os.sep)
    for anchor in ("outs", "binned_outputs"):
        if anchor in parts[2:]:
            return parts[len(parts) - 2 - parts[::-1].index(anchor)]
    return f"visium{k}"


def _matrix_files(folder: str) -> dict[str, str]:
    h5 = os.path.join(folder, "filtered_feature_bc_matrix.h5")
    mtx = os.path.join(folder, "filtered_feature_bc_matrix")
    if os.path.isfile(h5):
        return {"h5": h5}
    if os.path.isdir(mtx):
        return {"mtx": mtx}
    raise IngestError(f"{folder}: no filtered_feature_bc_matrix.h5 or filtered_feature_bc_matrix/ folder; "
                      "copy the Space Ranger outputs completely.")


def _hd_files(bins: str) -> dict[str, str]:
    files = {"positions": os.path.join(bins, "spatial", "tissue_positions.parquet"),
             "scalefactors": os.path.join(bins, "spatial", "scalefactors_json.json"), **_matrix_files(bins)}
    for key, what in (("positions", "the bins' positions"), ("scalefactors", "the bin size and microns per pixel")):
        if not os.path.isfile(files[key]):
            raise IngestError(f"{files[key]}: missing; it gives {what}. Copy Space Ranger's binned_outputs/"
                              f"{os.path.basename(bins)}/spatial/ folder completely.")
    return files


def discover(input_dirs: list[str], images: list[str], section_names: list[str] | None,
             patients: list[str] | None, pseudo_spot_um: float | None = None) -> list[SectionSource]:
    """`pseudo_spot_um`: the --pseudo_spot_um the user gave (None: not given); it only applies to Visium HD."""
    if len(images) != len(input_dirs):
        raise IngestError(
            f"--image: {len(images)} image(s) for {len(input_dirs)} Visium input(s); give one full-resolution "
            "H&E image per --input, comma-separated in the same order."
        )
    out = []
    for k, (inp, image) in enumerate(zip(input_dirs, images)):
        bins = _hd_bin_folder(inp)
        if bins is not None:
            files, extra = _hd_files(bins), {"layout": "visium_hd", "bins": os.path.basename(bins)}
            default = _section_default(bins, k)
        else:
            if pseudo_spot_um is not None:
                raise IngestError(f"{inp}: --pseudo_spot_um applies to Visium HD binned outputs (binned_outputs/"
                                  "square_NNNum/), and this is a standard Visium output with real spots; drop "
                                  "--pseudo_spot_um.")
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
            files.update(_matrix_files(outs))
            if not os.path.isfile(files["scalefactors"]):
                raise IngestError(f"{files['scalefactors']}: missing; it gives the spot size (microns per pixel). "
                                  "Copy it from Space Ranger's spatial/ or pass --source_mpp.")
            extra = {}
            default = os.path.basename(os.path.dirname(os.path.abspath(outs))) or f"visium{k}"
        section = section_names[k] if section_names else default
        patient = patients[k] if patients else section
        out.append(SectionSource(FORMAT, section, patient, image, files, extra))
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
    barcodes, features = read_h5_features(path, use_ids)
    return (barcodes, *merge_features(features))


def read_mtx(folder: str, use_ids: bool) -> tuple[list[str], CountMatrix, np.ndarray]:
    """(barcodes, matrix spots x genes, genes detected per barcode) from a Space Ranger matrix folder (Matrix
    Market, genes x barcodes)."""
    barcodes, features = read_mtx_features(folder, use_ids)
    return (barcodes, *merge_features(features))


def merge_features(features: CountMatrix) -> tuple[CountMatrix, np.ndarray]:
    """(matrix with features sharing a name summed, genes detected per row counted before that merge)."""
    detected = features.nonzero_per_row()
    if len(set(features.genes)) != len(features.genes):  # a few symbols name two Ensembl genes in 10x references
        return features.rename_genes(features.genes)[0], detected
    return features, detected


def read_h5_features(path: str, use_ids: bool) -> tuple[list[str], CountMatrix]:
    """(barcodes, barcodes x Gene Expression features, one column per feature: names may repeat)."""
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
    return barcodes, _gene_expression(path, barcodes, ids, names, types, genes_by_barcodes.T, use_ids)


def read_mtx_features(folder: str, use_ids: bool) -> tuple[list[str], CountMatrix]:
    """(barcodes, barcodes x Gene Expression features) from a Matrix Market folder; as `read_h5_features`."""
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
    return barcodes, _gene_expression(mtx, barcodes, ids, names, types, genes_by_barcodes.T, use_ids)


def _check_shape(path, shape, ids, barcodes) -> None:
    if tuple(shape) != (len(ids), len(barcodes)):
        raise IngestError(f"{path}: shape {shape[0]}x{shape[1]} does not match {len(ids)} features x "
                          f"{len(barcodes)} barcodes; the counts, features and barcodes come from different runs, copy "
                          "Space Ranger's matrix outputs again.")


def _gene_expression(path, barcodes, ids, names, types, spots_by_features, use_ids) -> CountMatrix:
    """Checks the counts, keeps the Gene Expression features and names them (ids or symbols; a name may repeat)."""
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
    return CountMatrix(genes, sparse.csc_array(spots_by_features)[:, np.flatnonzero(is_gex)])


def read_section(src: SectionSource, missing_counts: str = "drop", source_mpp: float | None = None,
                 use_ids: bool = False, pseudo_spot_um: float | None = None) -> SectionTable:
    """`pseudo_spot_um`: side of the Visium HD pseudo-spots (required for Visium HD, unused for Visium)."""
    if src.extra.get("layout") == "visium_hd":
        if not pseudo_spot_um:
            raise ValueError("read_section: a Visium HD section needs pseudo_spot_um")
        return read_hd_section(src, float(pseudo_spot_um), missing_counts, source_mpp, use_ids)
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


# ------------------------------------------------------------------------------------------------------ Visium HD

def read_hd_positions(path: str) -> dict[str, np.ndarray]:
    """The columns of a Visium HD tissue_positions.parquet, one entry per bin."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError as e:
        raise IngestError(f"{path}: Visium HD bin positions are Parquet; pip install pyarrow to read them.") from e
    try:
        present = pq.read_schema(path).names
        missing = [c for c in POSITION_COLUMNS if c not in present]
        if missing:
            raise IngestError(f"{path}: no column(s) {missing} (has {present}); expected Space Ranger's "
                              f"{list(POSITION_COLUMNS)}. Copy binned_outputs/square_NNNum/spatial/ again.")
        table = pq.read_table(path, columns=list(POSITION_COLUMNS))
    except (OSError, ValueError, pyarrow.ArrowException) as e:
        raise IngestError(f"{path}: not a readable Parquet file ({e}); copy it from Space Ranger's outputs again.") \
            from e
    out = {"barcode": [str(b) for b in table.column("barcode").to_pylist()]}
    for name in POSITION_COLUMNS[1:]:
        try:
            out[name] = np.asarray(table.column(name).to_numpy(), dtype=np.float64)
        except (TypeError, ValueError, pyarrow.ArrowException) as e:
            raise IngestError(f"{path}: column {name!r} is not numeric ({e}); copy the file again.") from e
    check_unique(out["barcode"], path, "barcode")
    for name in POSITION_COLUMNS[1:4]:
        bad = ~np.isfinite(out[name]) | (out[name] < 0) | (out[name] != np.round(out[name]))
        if bad.any():
            i = int(np.argmax(bad))
            raise IngestError(f"{path}: bin {out['barcode'][i]!r} has {name} = {out[name][i]}, not a whole number "
                              ">= 0; the file is corrupt, copy it again.")
    return out


def pseudo_spot_of_bins(array_row: np.ndarray, array_col: np.ndarray, bin_um: float, pseudo_spot_um: float
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of the pseudo-spot of each bin: the pseudo_spot_um square holding the bin's centre."""
    # The epsilon settles a centre lying exactly on a boundary (exact in decimal, not always in binary) upwards.
    def index(a):
        return np.floor((np.asarray(a, np.float64) + 0.5) * bin_um / pseudo_spot_um + 1e-9).astype(np.int64)
    return index(array_row), index(array_col)


def _hd_scale(src: SectionSource, source_mpp: float | None) -> tuple[float, float, str]:
    """(bin side in um, microns per pixel, how the latter was found)."""
    path = src.files["scalefactors"]
    try:
        with open(path) as f:
            scale = json.load(f)
    except (OSError, ValueError) as e:
        raise IngestError(f"{path}: unreadable ({e}); copy it from Space Ranger's binned outputs again.") from e
    folder = HD_BIN_FOLDER.fullmatch(src.extra.get("bins", ""))
    bin_um = scale.get("bin_size_um", int(folder.group(1)) if folder else None)
    if not (isinstance(bin_um, (int, float)) and math.isfinite(bin_um) and bin_um > 0):
        raise IngestError(f"{path}: no usable bin_size_um ({bin_um!r}); copy it from Space Ranger's outputs again.")
    if source_mpp:
        return float(bin_um), float(source_mpp), "given by --source_mpp"
    mpp = scale.get("microns_per_pixel")
    if isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0:
        return float(bin_um), float(mpp), "microns_per_pixel of scalefactors_json.json (Visium HD)"
    diameter = scale.get("spot_diameter_fullres")
    if isinstance(diameter, (int, float)) and math.isfinite(diameter) and diameter > 0:
        return float(bin_um), float(bin_um) / diameter, "bin_size_um / spot_diameter_fullres of scalefactors_json.json"
    raise IngestError(f"{path}: neither microns_per_pixel nor spot_diameter_fullres is usable; pass --source_mpp.")


def read_hd_section(src: SectionSource, pseudo_spot_um: float, missing_counts: str = "drop",
                    source_mpp: float | None = None, use_ids: bool = False) -> SectionTable:
    """Visium HD bins summed into pseudo-spots (the rule is in the module docstring)."""
    bin_um, mpp, how = _hd_scale(src, source_mpp)
    if pseudo_spot_um < bin_um:
        raise IngestError(f"--pseudo_spot_um={pseudo_spot_um:g} is smaller than the {bin_um:g} um bins of "
                          f"{os.path.dirname(src.files['positions'])}; choose at least {bin_um:g} um, or give finer bins "
                          "(--input=.../binned_outputs/square_002um).")
    pos_path = src.files["positions"]
    pos = read_hd_positions(pos_path)
    counts_path = src.files.get("h5") or src.files["mtx"]
    barcodes, features = (read_h5_features(counts_path, use_ids) if "h5" in src.files
                          else read_mtx_features(counts_path, use_ids))
    row_of = {b: i for i, b in enumerate(pos["barcode"])}
    unknown = [b for b in barcodes if b not in row_of]
    if unknown:
        raise IngestError(f"{counts_path}: {len(unknown)} bin barcode(s) not in {pos_path}, e.g. {unknown[:3]}; the "
                          "matrix and the positions come from different runs or bin sizes.")
    bin_of_row = np.array([row_of[b] for b in barcodes], dtype=np.int64)
    in_tissue = pos["in_tissue"] == 1
    px, py = pos["pxl_col_in_fullres"], pos["pxl_row_in_fullres"]
    placed = np.isfinite(px) & np.isfinite(py)
    if (in_tissue & ~placed).any():
        i = int(np.argmax(in_tissue & ~placed))
        raise IngestError(f"{pos_path}: in-tissue bin {pos['barcode'][i]!r} has no pixel position; copy the file "
                          "again.")
    has_counts = np.zeros(len(in_tissue), dtype=bool)
    has_counts[bin_of_row] = True
    without = np.flatnonzero(in_tissue & ~has_counts)
    if len(without) and missing_counts == "error":
        raise IngestError(f"{counts_path}: no counts for {len(without)} in-tissue bin(s) of {pos_path}, e.g. "
                          f"{[pos['barcode'][i] for i in without[:3]]}; pass --missing_counts=drop or use the matching "
                          "matrix.")
    ps_row, ps_col = pseudo_spot_of_bins(pos["array_row"], pos["array_col"], bin_um, pseudo_spot_um)
    blocks, block_of_bin = np.unique(ps_row * (int(ps_col.max()) + 1) + ps_col, return_inverse=True)
    block_of_bin = block_of_bin.ravel()
    n_placed = np.bincount(block_of_bin[placed], minlength=len(blocks))
    centre_x = np.bincount(block_of_bin[placed], weights=px[placed], minlength=len(blocks)) / np.maximum(n_placed, 1)
    centre_y = np.bincount(block_of_bin[placed], weights=py[placed], minlength=len(blocks)) / np.maximum(n_placed, 1)
    tissue_area = np.bincount(block_of_bin, weights=in_tissue.astype(np.float64), minlength=len(blocks)) * bin_um ** 2
    kept = np.flatnonzero(tissue_area >= HD_MIN_TISSUE_AREA * pseudo_spot_um ** 2 - 1e-9)
    new_index = np.full(len(blocks), -1, dtype=np.int64)
    new_index[kept] = np.arange(len(kept))
    # A 0/1 matrix from matrix rows (bins) to kept pseudo-spots: the product sums each pseudo-spot's in-tissue bins.
    target = new_index[block_of_bin[bin_of_row]]
    joins = np.flatnonzero((target >= 0) & in_tissue[bin_of_row])
    assign = sparse.csr_array((np.ones(len(joins)), (target[joins], joins)), shape=(len(kept), len(barcodes)))
    counts, detected = merge_features(CountMatrix(features.genes, assign @ features.matrix))
    any_tissue = np.bincount(block_of_bin, weights=in_tissue.astype(np.float64), minlength=len(blocks)) > 0
    row_of_kept = blocks[kept] // (int(ps_col.max()) + 1)
    col_of_kept = blocks[kept] % (int(ps_col.max()) + 1)
    return SectionTable(
        source=src,
        spot_ids=np.array([spot_key(c, r) for c, r in zip(col_of_kept, row_of_kept)], dtype=object).astype(str),
        array_x=col_of_kept.astype(np.int32),
        array_y=row_of_kept.astype(np.int32),
        pixel_x=centre_x[kept],
        pixel_y=centre_y[kept],
        labels=np.array([""] * len(kept), dtype=object).astype(str),
        counts=counts,
        microns_per_pixel=mpp,
        mpp_method=how,
        dropped={"little_tissue": int(any_tissue.sum() - len(kept))},
        notes={"native_ids": "ensembl" if use_ids else "symbol",
               "visium_hd": {"bins": src.extra.get("bins", ""), "bin_um": float(bin_um),
                             "pseudo_spot_um": float(pseudo_spot_um), "min_tissue_area": HD_MIN_TISSUE_AREA,
                             "rule": "bin (row, col) joins pseudo-spot (floor((row + 1/2) bin_um / pseudo_spot_um), "
                                     "floor((col + 1/2) bin_um / pseudo_spot_um)); counts summed over its in-tissue "
                                     "bins; centre = mean of all its bins' centres; kept when in-tissue bins cover "
                                     "min_tissue_area of its square",
                             "bins_in_tissue": int(in_tissue.sum()), "bins_without_counts": int(len(without)),
                             "matrix_bins_off_tissue": int((~in_tissue[bin_of_row]).sum())}},
        n_genes_detected=detected,
    )
