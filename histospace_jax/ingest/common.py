"""Shared pieces of the dataset readers: the error type, the per-section data model, count matrices, text parsing.

Every reader turns one section of a public release into a `SectionTable`: the spots under tissue, their
array and pixel coordinates (pixel coordinates always in the ORIGINAL full-resolution image frame), labels,
and a `CountMatrix` of raw counts with one row per kept spot. Everything downstream (gene selection,
normalisation, tiling) works on that table and never looks at the release's own file layout again.
"""

from __future__ import annotations

import dataclasses
import gzip
import re
from typing import Mapping, Sequence

import numpy as np
from scipy import sparse

from histospace_jax.errors import BadInputError

# Centre-to-centre distance of neighbouring spots on the Spatial Transcriptomics (ST) platform, in micrometres
# (Ståhl et al. 2016; 100 um spots on a 200 um grid). Used to derive a slide's microns per pixel.
ST_SPOT_SPACING_UM = 200.0
# Diameter of a Visium spot in micrometres (10x Genomics); Space Ranger reports it in full-res pixels.
VISIUM_SPOT_DIAMETER_UM = 55.0


class IngestError(BadInputError):
    """Bad input to `prepare`; the message names the file, the item and the fix."""


@dataclasses.dataclass(frozen=True)
class SectionSource:
    """Where one section's files are. Picklable, so sections can be handed to worker processes."""

    format: str
    section: str
    patient: str
    image_path: str
    files: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Format-specific facts known from the listing, e.g. a class label for the images format.
    extra: Mapping[str, str] = dataclasses.field(default_factory=dict)


class CountMatrix:
    """Raw counts, spots x genes, with gene names.

    `matrix` is a float64 `scipy.sparse.csc_array` in canonical form (sorted indices, no duplicates, no stored
    zeros): a 36k-gene Visium section stays small, and per-gene statistics are column reductions. Stored
    entries are exactly the non-zero counts, which `nonzero_per_gene` and the sparse expression statistics rely
    on.
    """

    def __init__(self, genes: Sequence[str], matrix):
        self.genes = [str(g) for g in genes]
        m = sparse.csc_array(matrix, dtype=np.float64)
        m.sum_duplicates()
        m.eliminate_zeros()
        if m.shape[1] != len(self.genes):
            raise ValueError(f"CountMatrix: {m.shape[1]} columns for {len(self.genes)} gene names")
        self.matrix = m

    @property
    def shape(self) -> tuple[int, int]:
        return self.matrix.shape

    @property
    def n_rows(self) -> int:
        return self.matrix.shape[0]

    @classmethod
    def from_dense(cls, dense: np.ndarray, genes: Sequence[str]) -> "CountMatrix":
        return cls(genes, np.asarray(dense, dtype=np.float64))

    @classmethod
    def from_coo(cls, genes: Sequence[str], n_rows: int, rows: np.ndarray, cols: np.ndarray,
                 values: np.ndarray) -> "CountMatrix":
        """Builds from (row, gene, value) triplets; repeated (row, gene) pairs are summed."""
        return cls(genes, sparse.coo_array((np.asarray(values, np.float64), (rows, cols)),
                                           shape=(int(n_rows), len(genes))))

    def row_sums(self) -> np.ndarray:
        return np.asarray(self.matrix.sum(axis=1)).ravel()

    def gene_sums(self) -> np.ndarray:
        return np.asarray(self.matrix.sum(axis=0)).ravel()

    def nonzero_per_gene(self) -> np.ndarray:
        return np.diff(self.matrix.indptr)

    def nonzero_per_row(self) -> np.ndarray:
        """int64 [n_rows]: genes with a count > 0 in each row (stored entries are exactly the non-zero counts)."""
        return np.bincount(self.matrix.indices, minlength=self.n_rows).astype(np.int64)

    def take_rows(self, rows: np.ndarray) -> "CountMatrix":
        """The sub-matrix of `rows` (unique row indices), in the given order."""
        return CountMatrix(self.genes, self.matrix[np.asarray(rows, dtype=np.int64)])

    def rename_genes(self, new_names: Sequence[str]) -> tuple["CountMatrix", int]:
        """Renames genes; genes that end up with the same name are summed. Returns (matrix, n merged)."""
        order = list(dict.fromkeys(new_names))
        lookup = {g: i for i, g in enumerate(order)}
        col_map = np.array([lookup[g] for g in new_names], dtype=np.int64)
        # A 0/1 matrix sending each old column to its new one: the product sums the columns that merge.
        merge = sparse.csc_array((np.ones(len(col_map)), (np.arange(len(col_map)), col_map)),
                                 shape=(len(col_map), len(order)))
        return CountMatrix(order, self.matrix @ merge), len(new_names) - len(order)

    def dense_columns(self, genes: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """Dense [n_rows, len(genes)] float64; genes this matrix lacks are zero and returned as `missing`."""
        lookup = {g: i for i, g in enumerate(self.genes)}
        where = [(j, lookup[g]) for j, g in enumerate(genes) if g in lookup]
        out = np.zeros((self.n_rows, len(genes)), dtype=np.float64)
        if where:
            dst, src = (np.array(v, dtype=np.int64) for v in zip(*where))
            out[:, dst] = self.matrix[:, src].toarray()
        return out, [g for g in genes if g not in lookup]


@dataclasses.dataclass
class SectionTable:
    """One section's kept spots. Pixel coordinates are in the original full-resolution image frame."""

    source: SectionSource
    spot_ids: np.ndarray  # str
    array_x: np.ndarray  # int32
    array_y: np.ndarray  # int32
    pixel_x: np.ndarray  # float64, column in the full-resolution image
    pixel_y: np.ndarray  # float64, row in the full-resolution image
    labels: np.ndarray  # str, "" where none
    counts: CountMatrix  # rows aligned with the spots above
    microns_per_pixel: float
    mpp_method: str
    dropped: dict  # reason -> number of spots dropped while reading
    notes: dict = dataclasses.field(default_factory=dict)
    # int64 per spot: genes with a count > 0 over ALL genes of the raw matrix, counted before genes sharing a
    # name are merged (Visium references repeat a few symbols). None: `counts.nonzero_per_row()`, for readers
    # whose matrix is the raw one.
    n_genes_detected: np.ndarray | None = None

    def genes_detected(self) -> np.ndarray:
        if self.n_genes_detected is not None:
            return np.asarray(self.n_genes_detected, dtype=np.int64)
        return self.counts.nonzero_per_row()

    @property
    def n_spots(self) -> int:
        return len(self.spot_ids)


def open_text(path: str) -> str:
    """Reads a text file, gunzipping `.gz`; any line ending (LF, CRLF, CR) is accepted by callers using splitlines."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except FileNotFoundError as e:
        raise IngestError(f"{path}: file not found; check --input and the release layout.") from e
    except (OSError, EOFError) as e:
        raise IngestError(f"{path}: cannot read ({e}); the file is truncated or corrupt, download it again.") from e
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def split_lines(text: str) -> list[str]:
    """Lines without terminators; handles the CR-only endings of some STNet files. Drops blank lines."""
    return [line for line in re.split(r"\r\n|\r|\n", text) if line.strip()]


def parse_numbers(fields: Sequence[str], path: str, row: str, names: Sequence[str], what: str) -> np.ndarray:
    """Parses `fields` as floats; a non-numeric entry raises naming the file, the row and the column."""
    try:
        return np.array(fields, dtype=np.int64).astype(np.float64)  # counts are integers: the fast path
    except ValueError:
        pass
    try:
        return np.array(fields, dtype=np.float64)
    except ValueError:
        for name, value in zip(names, fields):
            try:
                float(value)
            except ValueError:
                raise IngestError(
                    f"{path}: row {row!r}, column {name!r}: {what} {value!r} is not a number; fix or remove "
                    "that entry (counts must be plain non-negative numbers)."
                ) from None
        raise


def read_count_table(path: str, wanted_rows: set[str] | None = None, row_key=lambda k: k) -> tuple[
        list[str], list[str], np.ndarray]:
    """Reads a spots x genes text table (first column the spot key, header = gene names).

    Only rows whose normalised key (`row_key(key)`) is in `wanted_rows` are parsed, so off-tissue spots cost
    nothing. Returns (row keys, gene names, dense counts). Raises on ragged rows, duplicated spot keys,
    non-numeric or negative counts.
    """
    lines = split_lines(open_text(path))
    if not lines:
        raise IngestError(f"{path}: empty count matrix; download the file again.")
    delim = "\t" if "\t" in lines[0] else ","
    header = lines[0].split(delim)
    genes = [g.strip().strip('"') for g in header[1:]]
    if not genes:
        raise IngestError(f"{path}: header has no gene columns; expected 'spot<TAB>gene1<TAB>gene2...'.")
    keys: list[str] = []
    rows: list[np.ndarray] = []
    seen: set[str] = set()
    for n, line in enumerate(lines[1:], start=2):
        key_end = line.find(delim)
        key = row_key(line[:key_end].strip().strip('"'))
        if wanted_rows is not None and key not in wanted_rows:
            continue
        if key in seen:
            raise IngestError(f"{path}: spot {key!r} appears twice (line {n}); remove the duplicated row.")
        seen.add(key)
        fields = line.split(delim)[1:]
        if len(fields) != len(genes):
            raise IngestError(
                f"{path}: line {n} (spot {key!r}) has {len(fields)} values for {len(genes)} genes in the header; "
                "the file is truncated or malformed, download it again."
            )
        values = parse_numbers(fields, path, key, genes, "count")
        if not np.isfinite(values).all():
            j = int(np.argmax(~np.isfinite(values)))
            raise IngestError(
                f"{path}: row {key!r}, gene {genes[j]!r}: count {fields[j]!r} is not a finite number; counts must "
                "be raw non-negative UMI/read counts. Fix the value or remove the row."
            )
        if (values < 0).any():
            j = int(np.argmax(values < 0))
            raise IngestError(
                f"{path}: row {key!r}, gene {genes[j]!r}: negative count {values[j]}; counts must be raw "
                "non-negative UMI/read counts, not normalised values."
            )
        keys.append(key)
        rows.append(values)
    dense = np.stack(rows) if rows else np.zeros((0, len(genes)))
    return keys, genes, dense


def check_unique(ids: Sequence[str], path: str, what: str = "spot") -> None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise IngestError(f"{path}: {what} {i!r} appears more than once; remove the duplicated entry.")
        seen.add(i)


def fit_st_mpp(array_x: np.ndarray, array_y: np.ndarray, pixel_x: np.ndarray, pixel_y: np.ndarray,
               path: str) -> float:
    """Microns per pixel from an ST spot grid: least-squares affine fit of pixel vs array coordinates.

    Neighbouring ST spots are 200 um apart, so pixels per array step is 200 um / mpp. Using the determinant of
    the 2x2 linear part (the geometric mean of the x and y scales) tolerates small rotation and shear.
    """
    a = np.stack([np.asarray(array_x, float), np.asarray(array_y, float), np.ones(len(array_x))], axis=1)
    if len(array_x) < 3 or np.linalg.matrix_rank(a) < 3:
        raise IngestError(
            f"{path}: fewer than 3 non-collinear spots; cannot derive microns per pixel from the spot grid. "
            "Pass --source_mpp to give the slide's scale."
        )
    coef_x = np.linalg.lstsq(a, np.asarray(pixel_x, float), rcond=None)[0]
    coef_y = np.linalg.lstsq(a, np.asarray(pixel_y, float), rcond=None)[0]
    det = abs(coef_x[0] * coef_y[1] - coef_x[1] * coef_y[0])
    if det <= 0:
        raise IngestError(f"{path}: degenerate spot grid; pass --source_mpp.")
    return ST_SPOT_SPACING_UM / float(np.sqrt(det))


def spot_key(x, y) -> str:
    return f"{int(x)}x{int(y)}"


def parse_spot_key(key: str, path: str) -> tuple[float, float]:
    m = re.fullmatch(r"\s*(-?[0-9.]+)x(-?[0-9.]+)\s*", key)
    if not m:
        raise IngestError(f"{path}: spot id {key!r} is not of the form 'XxY' (array x, y); fix the row name.")
    return float(m.group(1)), float(m.group(2))


def read_delimited(path: str, delim: str | None = None) -> tuple[list[str], list[list[str]]]:
    """Header + rows of a small delimited text file (any line ending); delimiter sniffed from the header."""
    lines = split_lines(open_text(path))
    if not lines:
        raise IngestError(f"{path}: empty file.")
    if delim is None:
        delim = "\t" if "\t" in lines[0] else ("," if "," in lines[0] else None)
    split = (lambda s: s.split(delim)) if delim else (lambda s: s.split())
    header = [h.strip().strip('"') for h in split(lines[0])]
    rows = [[v.strip().strip('"') for v in split(line)] for line in lines[1:]]
    return header, rows


def column(header: list[str], rows: list[list[str]], name: str, path: str, offset: int = 0) -> list[str]:
    if name not in header:
        raise IngestError(f"{path}: missing column {name!r} (has {header}); is this the right file?")
    j = header.index(name) + offset
    out = []
    for i, r in enumerate(rows):
        if j >= len(r):
            raise IngestError(f"{path}: data row {i + 1} has {len(r)} fields, too few for column {name!r}.")
        out.append(r[j])
    return out
