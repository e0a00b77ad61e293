"""Expression: library-size normalisation + log, gene statistics across sections, gene selection, gene IDs.

Normalisation of spot i, gene g:  ``log_b(1 + counts[i, g] / library_size[i] * scale)`` where ``library_size`` is
the spot's total count over ALL genes of its count matrix (before gene selection, after merging genes that share
an ID), so the value of a gene does not depend on which other genes were kept. ``scale`` defaults to 1e4
(counts per 10k) and ``b`` to e; both are recorded in the manifest under "expression".

Gene selection runs over all spots of all sections of one prepare job (pass 1 of the two-pass prepare), so every
section of a store shares one gene list. A gene absent from a section's matrix counts as 0 in those spots.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import sparse

from histospace_jax.data.store import StoreError, open_store
from histospace_jax.ingest.common import CountMatrix, IngestError, read_delimited

GENE_FILTERS = ("expressed", "hvg", "mean", "list")
LOG_BASES = {"e": math.e, "2": 2.0, "10": 10.0, "none": None}
HGNC_SYMBOL = "Approved symbol"
HGNC_ENSEMBL = "Ensembl ID(supplied by Ensembl)"


def normalise(counts: np.ndarray, library_size: np.ndarray, scale: float, log_base: str) -> np.ndarray:
    """counts [n, g] (raw), library_size [n] -> float32 [n, g] normalised (and logged unless log_base='none')."""
    x = np.asarray(counts, dtype=np.float64) / np.asarray(library_size, dtype=np.float64)[:, None] * scale
    base = LOG_BASES[log_base]
    if base is not None:
        x = np.log1p(x) / math.log(base)
    return x.astype(np.float32)


def transform_values(values: np.ndarray, library_size_of_entry: np.ndarray, scale: float, log_base: str):
    """The same transform on sparse entries (zeros stay zero, which is what makes sparse statistics exact)."""
    x = values / library_size_of_entry * scale
    base = LOG_BASES[log_base]
    return np.log1p(x) / math.log(base) if base is not None else x


class GeneStats:
    """Running per-gene statistics over spots of many sections: spots expressing it, sum and sum of squares of
    the normalised value. Genes are keyed by name in order of first appearance."""

    def __init__(self):
        self.genes: list[str] = []
        self._index: dict[str, int] = {}
        self.n_spots = 0
        self.expressed = np.zeros(0)
        self.total = np.zeros(0)
        self.total_sq = np.zeros(0)

    def _grow(self, genes: Sequence[str]) -> np.ndarray:
        idx = np.empty(len(genes), dtype=np.int64)
        for j, g in enumerate(genes):
            i = self._index.get(g)
            if i is None:
                i = len(self.genes)
                self._index[g] = i
                self.genes.append(g)
            idx[j] = i
        extra = len(self.genes) - len(self.expressed)
        if extra:
            self.expressed = np.concatenate([self.expressed, np.zeros(extra)])
            self.total = np.concatenate([self.total, np.zeros(extra)])
            self.total_sq = np.concatenate([self.total_sq, np.zeros(extra)])
        return idx

    def add_partial(self, genes: Sequence[str], n_spots: int, expressed: np.ndarray, total: np.ndarray,
                    total_sq: np.ndarray) -> None:
        idx = self._grow(genes)
        self.n_spots += int(n_spots)
        np.add.at(self.expressed, idx, expressed)
        np.add.at(self.total, idx, total)
        np.add.at(self.total_sq, idx, total_sq)

    @property
    def expressed_fraction(self) -> np.ndarray:
        return self.expressed / max(self.n_spots, 1)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.n_spots, 1)

    @property
    def variance(self) -> np.ndarray:
        m = self.mean
        return np.maximum(self.total_sq / max(self.n_spots, 1) - m * m, 0.0)


def section_gene_stats(counts: CountMatrix, library_size: np.ndarray, scale: float, log_base: str) -> dict:
    """Per-gene (expressed spots, sum, sum of squares of normalised value) of one section's matrix."""
    m = counts.matrix
    # CSC indices are the row (spot) of each stored entry; only stored entries need transforming (zeros stay 0).
    vals = transform_values(m.data, library_size[m.indices], scale, log_base)
    normalised = sparse.csc_array((vals, m.indices, m.indptr), shape=m.shape)
    return {
        "genes": counts.genes,
        "n_spots": counts.n_rows,
        "expressed": counts.nonzero_per_gene().astype(np.float64),
        "total": np.asarray(normalised.sum(axis=0)).ravel(),
        "total_sq": np.asarray((normalised * normalised).sum(axis=0)).ravel(),
    }


def select_genes(stats: GeneStats, mode: str, *, min_expressed_pct: float, n_genes: int,
                 gene_list: Sequence[str] | None = None, where: str = "prepare") -> tuple[list[str], dict]:
    """Chooses genes; returns (genes, info for the manifest). Raises when the selection is empty.

    expressed: genes with counts > 0 in >= min_expressed_pct % of all spots (the paper's filter), input order.
    hvg / mean: the n_genes genes of highest variance / mean of the normalised value, highest first (ties by
      input order).
    list: exactly `gene_list`, in its order (genes absent from the input are kept, as zeros, and reported).
    """
    info: dict = {"mode": mode, "n_spots_considered": stats.n_spots, "n_genes_in_input": len(stats.genes)}
    if mode == "expressed":
        keep = stats.expressed_fraction * 100.0 >= min_expressed_pct - 1e-9
        genes = [g for g, k in zip(stats.genes, keep) if k]
        info["min_expressed_pct"] = min_expressed_pct
        fix = "lower --min_expressed_pct"
    elif mode in ("hvg", "mean"):
        score = stats.variance if mode == "hvg" else stats.mean
        order = np.argsort(-score, kind="stable")[: max(int(n_genes), 0)]
        genes = [stats.genes[i] for i in order if score[i] > 0]
        info["n_genes"] = n_genes
        fix = "raise --n_genes or check that the counts are not all zero"
    elif mode == "list":
        genes = list(dict.fromkeys(gene_list or []))
        fix = "put gene names (one per line) in --gene_list"
    else:
        raise IngestError(f"--gene_filter={mode!r}: unknown; use one of {GENE_FILTERS}.")
    if not genes:
        raise IngestError(
            f"{where}: gene selection {mode!r} kept no genes out of {len(stats.genes)} over {stats.n_spots} spots; "
            f"{fix}."
        )
    present = set(stats.genes)
    info["missing_from_input"] = [g for g in genes if g not in present]
    info["n_genes_selected"] = len(genes)
    return genes, info


def read_gene_list(path: str) -> list[str]:
    """One gene per line (first whitespace/comma/tab-separated field); '#' comments and blank lines ignored."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise IngestError(f"{path}: cannot read gene list ({e}); pass a text file with one gene per line.") from e
    genes = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            genes.append(line.replace(",", "\t").split()[0].strip('"'))
    if not genes:
        raise IngestError(f"{path}: gene list is empty; put one gene name per line.")
    return genes


def strip_version(ensembl_id: str) -> str:
    """ENSG00000141510.16 -> ENSG00000141510 (releases differ in whether they carry the version)."""
    return ensembl_id.split(".", 1)[0] if ensembl_id.startswith("ENS") else ensembl_id


def read_hgnc_map(path: str) -> dict[str, dict[str, str]]:
    """Reads an HGNC custom download TSV -> {"to_symbol": {ensembl: symbol}, "to_ensembl": {symbol: ensembl}}."""
    header, rows = read_delimited(path, "\t")
    for col in (HGNC_SYMBOL, HGNC_ENSEMBL):
        if col not in header:
            raise IngestError(
                f"{path}: gene map lacks column {col!r} (has {header}); download it from HGNC's custom download "
                f"with the columns {HGNC_SYMBOL!r} and {HGNC_ENSEMBL!r}."
            )
    js, je = header.index(HGNC_SYMBOL), header.index(HGNC_ENSEMBL)
    to_symbol: dict[str, str] = {}
    to_ensembl: dict[str, str] = {}
    for r in rows:
        sym = r[js].strip() if js < len(r) else ""
        ens = strip_version(r[je].strip()) if je < len(r) else ""
        if sym and ens:
            to_symbol.setdefault(ens, sym)
            to_ensembl.setdefault(sym, ens)
    if not to_symbol:
        raise IngestError(f"{path}: no row has both a symbol and an Ensembl ID; is this the HGNC download?")
    return {"to_symbol": to_symbol, "to_ensembl": to_ensembl}


def harmonise(counts: CountMatrix, native: str, target: str, gene_map: dict | None, where: str
              ) -> tuple[CountMatrix, dict]:
    """Renames a matrix's genes from its `native` ID type ("symbol"/"ensembl") to `target` ("native" = keep).

    Genes the map does not know keep their original ID (counted as unmapped); genes that map to the same ID are
    summed (counted as merged). Returns (matrix, info).
    """
    info = {"native_ids": native, "ids": native if target == "native" else target, "unmapped": 0, "merged": 0}
    names = [strip_version(g) if native == "ensembl" else g for g in counts.genes]
    if target not in ("native", native):
        if gene_map is None:
            raise IngestError(
                f"{where}: genes are {native} IDs but --gene_ids={target}; pass --gene_map=HGNC.tsv (HGNC columns "
                f"{HGNC_SYMBOL!r}, {HGNC_ENSEMBL!r}) or --gene_ids=native."
            )
        table = gene_map["to_symbol"] if target == "symbol" else gene_map["to_ensembl"]
        mapped = [table.get(g) for g in names]
        info["unmapped"] = sum(m is None for m in mapped)
        names = [m if m is not None else g for g, m in zip(names, mapped)]
    if len(set(names)) != len(names) or names != counts.genes:
        counts, merged = counts.rename_genes(names)
        info["merged"] = merged
    return counts, info


def gene_list_from_store(path: str) -> tuple[list[str], dict]:
    """Genes (and expression settings) of an existing tile store, for --genes_from."""
    try:
        store = open_store(path)
    except StoreError as e:
        raise IngestError(f"--genes_from={path}: {e}") from e
    return store.genes, dict(store.manifest.get("expression", {}))
