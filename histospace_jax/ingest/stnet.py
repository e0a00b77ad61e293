"""STNet (He et al. 2020, Nat. Biomed. Eng.) release reader: 23 patients, 68 breast cancer ST sections.

Layout (under --input)::

    metadata.csv          patient, replicate, type, histology_image, count_matrix, spot_coordinates, tumor_annotation
    <...>_stdata.tsv.gz   spots x Ensembl IDs, raw counts; rows "XxY"; includes spots off the tissue
    spots_<...>.csv.gz    ",X,Y" header; rows "XxY", pixel X (column), Y (row) of spots UNDER the tissue
    <...>_Coords.tsv.gz   tumour annotation: CR line endings, a header shifted one column left of its data;
                          data rows: key, x, y, label, tumor|non, with fractional x, y (rounded to join)

File names in metadata.csv are taken relative to --input; when not there, the file is looked up by name anywhere
under --input (the release is distributed both flat and in per-patient folders). Section = "<patient>_<replicate>".
Spots kept: those of the spots file with a count row. Labels: "tumor" / "non_tumor" from the annotation ("" when
the spot is not annotated). Microns per pixel: fitted from the spot grid (200 um steps).
"""

from __future__ import annotations

import os

import numpy as np

from histospace_jax.ingest.common import (CountMatrix, IngestError, SectionSource, SectionTable, check_unique,
                                          column, fit_st_mpp, open_text, parse_spot_key, read_count_table,
                                          read_delimited, spot_key, split_lines)

FORMAT = "stnet"
METADATA_COLUMNS = ("patient", "replicate", "type", "histology_image", "count_matrix", "spot_coordinates",
                    "tumor_annotation")
TUMOUR_FLAGS = {"tumor": "tumor", "non": "non_tumor"}


def _resolver(input_dir: str):
    index: dict[str, str] | None = None

    def resolve(name: str, meta_path: str, row: int, what: str) -> str:
        nonlocal index
        direct = os.path.join(input_dir, name)
        if os.path.isfile(direct):
            return direct
        if index is None:
            index = {}
            for d, _, files in os.walk(input_dir):
                for f in files:
                    index.setdefault(f, os.path.join(d, f))
        found = index.get(os.path.basename(name))
        if found is None:
            raise IngestError(
                f"{meta_path}: row {row}: {what} file {name!r} not found under {input_dir}; download it or remove "
                "the row (or leave the section out with --sections)."
            )
        return found

    return resolve


def discover(input_dir: str, sections: list[str] | None) -> list[SectionSource]:
    meta = os.path.join(input_dir, "metadata.csv")
    if not os.path.isfile(meta):
        raise IngestError(f"{meta}: missing; --input must be the STNet release folder holding metadata.csv.")
    header, rows = read_delimited(meta, ",")
    missing = [c for c in METADATA_COLUMNS if c not in header]
    if missing:
        raise IngestError(f"{meta}: missing column(s) {missing}; expected {list(METADATA_COLUMNS)}.")
    cols = {c: column(header, rows, c, meta) for c in METADATA_COLUMNS}
    resolve = _resolver(input_dir)
    names = [f"{p}_{r}" for p, r in zip(cols["patient"], cols["replicate"])]
    check_unique(names, meta, "section (patient_replicate)")
    wanted = names if not sections else sections
    unknown = [s for s in wanted if s not in names]
    if unknown:
        raise IngestError(f"--sections: {unknown} not in {meta} (available: {names}); fix --sections.")
    out = []
    for s in wanted:
        i = names.index(s)
        row = i + 2  # 1-based line number in the file, header first
        files = {
            "counts": resolve(cols["count_matrix"][i], meta, row, "count_matrix"),
            "spots": resolve(cols["spot_coordinates"][i], meta, row, "spot_coordinates"),
        }
        if cols["tumor_annotation"][i] not in ("", "NA"):
            files["labels"] = resolve(cols["tumor_annotation"][i], meta, row, "tumor_annotation")
        image = resolve(cols["histology_image"][i], meta, row, "histology_image")
        out.append(SectionSource(FORMAT, s, cols["patient"][i], image, files, {"type": cols["type"][i]}))
    return out


def read_tumour_annotation(path: str) -> dict[str, str]:
    """{ "XxY": "tumor" | "non_tumor" } from a `*_Coords.tsv.gz` file.

    The header does not line up with the data (it is shifted one column left), so columns are taken by
    position: key, x, y, [label,] tumor|non (last field). Coordinates are fractional and are rounded.
    """
    lines = split_lines(open_text(path))
    out: dict[str, str] = {}
    for n, line in enumerate(lines[1:], start=2):
        fields = [f.strip().strip('"') for f in line.split("\t")]
        if len(fields) < 4:
            raise IngestError(f"{path}: line {n} has {len(fields)} fields; expected key, x, y, label, tumor|non.")
        flag = fields[-1]
        if flag not in TUMOUR_FLAGS:
            raise IngestError(f"{path}: line {n}: last field {flag!r} is not 'tumor' or 'non'; fix that row.")
        try:
            x, y = float(fields[1]), float(fields[2])
        except ValueError:
            raise IngestError(f"{path}: line {n}: x/y {fields[1:3]} are not numbers; fix that row.") from None
        out[spot_key(round(x), round(y))] = TUMOUR_FLAGS[flag]
    return out


def read_section(src: SectionSource, missing_counts: str = "drop", source_mpp: float | None = None) -> SectionTable:
    spots_path = src.files["spots"]
    header, rows = read_delimited(spots_path, ",")
    keys = [r[0] for r in rows]
    check_unique(keys, spots_path)
    try:
        px = np.array(column(header, rows, "X", spots_path), dtype=np.float64)
        py = np.array(column(header, rows, "Y", spots_path), dtype=np.float64)
    except ValueError:
        raise IngestError(f"{spots_path}: non-numeric X/Y pixel coordinate; fix the row.") from None
    grid = np.array([parse_spot_key(k, spots_path) for k in keys]).reshape(-1, 2)
    if source_mpp:
        mpp, how = float(source_mpp), "given by --source_mpp"
    else:
        mpp = fit_st_mpp(grid[:, 0], grid[:, 1], px, py, spots_path)
        how = "fitted to the spot grid of the spots file (200 um spot spacing)"
    row_keys, genes, dense = read_count_table(src.files["counts"], wanted_rows=set(keys))
    index = {k: i for i, k in enumerate(row_keys)}
    have = np.array([k in index for k in keys], dtype=bool)
    if not have.all() and missing_counts == "error":
        missing = [k for k, h in zip(keys, have) if not h]
        raise IngestError(
            f"{src.files['counts']}: no count row for {len(missing)} spot(s) of {spots_path}, e.g. {missing[:5]}; "
            "pass --missing_counts=drop to leave them out, or restore the rows."
        )
    keep = np.flatnonzero(have)
    order = np.array([index[keys[i]] for i in keep], dtype=np.int64)
    counts = CountMatrix.from_dense(dense[order] if len(order) else dense[:0], genes)
    labels = read_tumour_annotation(src.files["labels"]) if "labels" in src.files else {}
    kept_keys = [keys[i] for i in keep]
    ax = np.rint(grid[keep, 0]).astype(np.int32)
    ay = np.rint(grid[keep, 1]).astype(np.int32)
    return SectionTable(
        source=src,
        spot_ids=np.array(kept_keys, dtype=object).astype(str),
        array_x=ax,
        array_y=ay,
        pixel_x=px[keep],
        pixel_y=py[keep],
        labels=np.array([labels.get(spot_key(x, y), "") for x, y in zip(ax, ay)], dtype=object).astype(str),
        counts=counts,
        microns_per_pixel=mpp,
        mpp_method=how,
        dropped={"no_counts": int((~have).sum())},
        notes={"native_ids": "ensembl", "spots_under_tissue": len(keys), "labels_file": src.files.get("labels", "")},
    )
