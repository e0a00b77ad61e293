"""HER2ST (Andersson et al. 2021, Nat. Commun. 12:6012) release reader.

Layout (under --input, or under --input/data)::

    ST-cnts/<SEC>.tsv.gz                    spots x gene symbols, raw counts; first column "XxY" (array x, y)
    ST-spotfiles/<SEC>_selection.tsv        x y new_x new_y pixel_x pixel_y selected
    ST-imgs/<P>/<SEC>/<file>.jpg            the section's H&E image (one per folder)
    ST-pat/lbl/<SEC>_labeled_coordinates.tsv  optional pathologist labels: Row.names x y pixel_x pixel_y label

Spots kept: `selected == 1` rows of the spot file that have a row in the count matrix (others are dropped as
"no_counts", or raise with --missing_counts=error). Pixel coordinates come from the spot file and are in the
full-resolution image frame. Labels join on rounded (x, y); the label file's own pixel columns are in another
frame and are ignored. Microns per pixel: fitted from the spot grid (new_x/new_y vs pixel), 200 um per step.
"""

from __future__ import annotations

import glob
import os
import re

import numpy as np

from histospace_jax.ingest.common import (CountMatrix, IngestError, SectionSource, SectionTable, check_unique,
                                          column, fit_st_mpp, read_count_table, read_delimited, spot_key)

FORMAT = "her2st"


def _root(input_dir: str) -> str:
    for cand in (input_dir, os.path.join(input_dir, "data")):
        if os.path.isdir(os.path.join(cand, "ST-cnts")):
            return cand
    raise IngestError(
        f"{input_dir}: no ST-cnts/ folder here or in data/; --input must be the HER2ST release folder "
        "(holding ST-cnts, ST-spotfiles, ST-imgs)."
    )


def discover(input_dir: str, sections: list[str] | None) -> list[SectionSource]:
    root = _root(input_dir)
    available = sorted(os.path.basename(p)[: -len(".tsv.gz")] for p in glob.glob(os.path.join(root, "ST-cnts",
                                                                                            "*.tsv.gz")))
    if not available:
        raise IngestError(f"{root}/ST-cnts: no <SEC>.tsv.gz count matrices; is the download complete?")
    chosen = available if not sections else sections
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise IngestError(f"--sections: {unknown} not in {root}/ST-cnts (available: {available}); fix --sections.")
    out = []
    for sec in chosen:
        patient = re.match(r"[A-Za-z]+", sec)
        patient = patient.group(0) if patient else sec
        img_dir = os.path.join(root, "ST-imgs", patient, sec)
        images = sorted(glob.glob(os.path.join(img_dir, "*.jpg")) + glob.glob(os.path.join(img_dir, "*.tif*"))
                        + glob.glob(os.path.join(img_dir, "*.png")))
        if len(images) != 1:
            raise IngestError(
                f"{img_dir}: expected exactly one H&E image for section {sec}, found {len(images)} {images[:3]}; "
                "restore the release's ST-imgs/<patient>/<section>/ folder or leave the section out with --sections."
            )
        files = {
            "counts": os.path.join(root, "ST-cnts", f"{sec}.tsv.gz"),
            "spots": os.path.join(root, "ST-spotfiles", f"{sec}_selection.tsv"),
        }
        if not os.path.isfile(files["spots"]):
            raise IngestError(f"{files['spots']}: spot file for section {sec} missing; restore ST-spotfiles/.")
        lbl = os.path.join(root, "ST-pat", "lbl", f"{sec}_labeled_coordinates.tsv")
        if os.path.isfile(lbl):
            files["labels"] = lbl
        out.append(SectionSource(FORMAT, sec, patient, images[0], files))
    return out


def _float_col(header, rows, name, path, offset=0) -> np.ndarray:
    values = column(header, rows, name, path, offset)
    try:
        return np.array([float(v) if v not in ("", "NA") else np.nan for v in values])
    except ValueError:
        bad = next(v for v in values if not _is_float(v))
        raise IngestError(f"{path}: column {name!r} has non-numeric value {bad!r}; fix that row.") from None


def _is_float(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def read_labels(path: str) -> dict[str, str]:
    """{ "XxY": label } from a HER2ST labeled_coordinates file, joining on rounded array coordinates."""
    header, rows = read_delimited(path, "\t")
    # R writes row names without a header cell; then every data row is one field longer than the header.
    offset = 1 if rows and len(rows[0]) == len(header) + 1 else 0
    xs = _float_col(header, rows, "x", path, offset)
    ys = _float_col(header, rows, "y", path, offset)
    labels = column(header, rows, "label", path, offset)
    out = {}
    for x, y, lab in zip(xs, ys, labels):
        if np.isfinite(x) and np.isfinite(y):
            out[spot_key(round(x), round(y))] = "" if lab in ("NA", "") else lab
    return out


def read_section(src: SectionSource, missing_counts: str = "drop", source_mpp: float | None = None) -> SectionTable:
    spots_path = src.files["spots"]
    header, rows = read_delimited(spots_path, "\t")
    xs = _float_col(header, rows, "x", spots_path)
    ys = _float_col(header, rows, "y", spots_path)
    px = _float_col(header, rows, "pixel_x", spots_path)
    py = _float_col(header, rows, "pixel_y", spots_path)
    selected = _float_col(header, rows, "selected", spots_path) == 1
    if "new_x" in header:  # registered (sub-step) array positions fit the pixel grid better than integer ones
        gx, gy = _float_col(header, rows, "new_x", spots_path), _float_col(header, rows, "new_y", spots_path)
    else:
        gx, gy = xs, ys
    ok = np.isfinite(gx) & np.isfinite(gy) & np.isfinite(px) & np.isfinite(py)
    if source_mpp:
        mpp, how = float(source_mpp), "given by --source_mpp"
    else:
        mpp = fit_st_mpp(gx[ok], gy[ok], px[ok], py[ok], spots_path)
        how = "fitted to the spot grid of the spot file (200 um spot spacing)"
    sel = np.flatnonzero(selected)
    bad = sel[~(np.isfinite(px[sel]) & np.isfinite(py[sel]) & np.isfinite(xs[sel]) & np.isfinite(ys[sel]))]
    if len(bad):
        raise IngestError(f"{spots_path}: selected spot on data row {bad[0] + 1} has missing coordinates; fix it.")
    keys = [spot_key(round(xs[i]), round(ys[i])) for i in sel]
    check_unique(keys, spots_path)
    row_keys, genes, dense = read_count_table(src.files["counts"], wanted_rows=set(keys))
    index = {k: i for i, k in enumerate(row_keys)}
    have = np.array([k in index for k in keys], dtype=bool)
    if not have.all():
        missing = [k for k, h in zip(keys, have) if not h]
        if missing_counts == "error":
            raise IngestError(
                f"{src.files['counts']}: no count row for {len(missing)} selected spot(s) of {spots_path}, e.g. "
                f"{missing[:5]}; pass --missing_counts=drop to leave them out, or restore the rows."
            )
    keep = np.flatnonzero(have)
    order = np.array([index[keys[i]] for i in keep], dtype=np.int64)
    counts = CountMatrix.from_dense(dense[order] if len(order) else dense[:0], genes)
    kept_rows = sel[keep]
    labels = read_labels(src.files["labels"]) if "labels" in src.files else {}
    kept_keys = [keys[i] for i in keep]
    return SectionTable(
        source=src,
        spot_ids=np.array(kept_keys, dtype=object).astype(str),
        array_x=np.rint(xs[kept_rows]).astype(np.int32),
        array_y=np.rint(ys[kept_rows]).astype(np.int32),
        pixel_x=px[kept_rows].astype(np.float64),
        pixel_y=py[kept_rows].astype(np.float64),
        labels=np.array([labels.get(k, "") for k in kept_keys], dtype=object).astype(str),
        counts=counts,
        microns_per_pixel=mpp,
        mpp_method=how,
        dropped={"no_counts": int((~have).sum())},
        notes={"native_ids": "symbol", "spots_selected": int(len(sel)), "spots_in_spot_file": int(len(rows)),
               "labels_file": src.files.get("labels", "")},
    )
