"""Expression: normalisation, gene statistics and selection, gene-ID harmonisation, --genes_from."""

import numpy as np
import pytest

from histospace_jax.data import open_store, write_store
from histospace_jax.ingest import build, expression
from histospace_jax.ingest.common import CountMatrix, IngestError
from tests.test_ingest_fixtures import FIXTURE_MIN_UMI, write_stnet


def test_normalise_by_hand():
    counts = np.array([[1, 3, 0], [0, 0, 10]])
    lib = np.array([4.0, 20.0])  # library includes genes not shown
    got = expression.normalise(counts, lib, 1e4, "e")
    np.testing.assert_allclose(got[0], [np.log(1 + 2500), np.log(1 + 7500), 0], rtol=1e-6)
    np.testing.assert_allclose(expression.normalise(counts, lib, 100, "2")[1], [0, 0, np.log2(51)], rtol=1e-6)
    np.testing.assert_allclose(expression.normalise(counts, lib, 100, "none")[1], [0, 0, 50])


def test_count_matrix_operations_match_dense():
    rng = np.random.default_rng(0)
    dense = rng.poisson(0.7, (6, 5)).astype(float)
    m = CountMatrix.from_dense(dense, list("abcde"))
    np.testing.assert_array_equal(m.row_sums(), dense.sum(1))
    np.testing.assert_array_equal(m.nonzero_per_gene(), (dense > 0).sum(0))
    np.testing.assert_array_equal(m.nonzero_per_row(), (dense > 0).sum(1))
    assert m.nonzero_per_row().dtype == np.int64
    np.testing.assert_array_equal(m.gene_sums(), dense.sum(0))
    sub = m.take_rows(np.array([4, 1]))
    np.testing.assert_array_equal(sub.dense_columns(list("abcde"))[0], dense[[4, 1]])
    merged, n = m.rename_genes(["x", "y", "x", "z", "y"])
    assert n == 2 and merged.genes == ["x", "y", "z"]
    np.testing.assert_array_equal(merged.dense_columns(["x", "y"])[0],
                                  np.stack([dense[:, 0] + dense[:, 2], dense[:, 1] + dense[:, 4]], 1))
    out, missing = m.dense_columns(["b", "nope"])
    assert missing == ["nope"] and (out[:, 1] == 0).all()


def test_count_matrix_from_coo_sums_repeats_and_stores_only_nonzeros():
    # (0, a) appears twice and is summed; (1, b) cancels to zero and must not count as "expressed".
    m = CountMatrix.from_coo(["a", "b", "c"], 3, rows=[0, 0, 1, 1, 2], cols=[0, 0, 1, 1, 2],
                             values=[2.0, 3.0, 4.0, -4.0, 1.0])
    np.testing.assert_array_equal(m.dense_columns(["a", "b", "c"])[0], [[5, 0, 0], [0, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(m.nonzero_per_gene(), [1, 0, 1])
    assert m.shape == (3, 3) and m.n_rows == 3
    empty = CountMatrix.from_dense(np.zeros((0, 2)), ["a", "b"])
    assert empty.shape == (0, 2) and empty.row_sums().shape == (0,)


def test_section_gene_stats_match_dense():
    rng = np.random.default_rng(3)
    dense = rng.poisson(1.0, (7, 4)).astype(float)
    dense[:, 2] = 0  # a gene no spot expresses
    lib = dense.sum(1) + 5.0
    s = expression.section_gene_stats(CountMatrix.from_dense(dense, list("abcd")), lib, 1e4, "2")
    norm = np.log2(1 + dense / lib[:, None] * 1e4)
    np.testing.assert_array_equal(s["expressed"], (dense > 0).sum(0))
    np.testing.assert_allclose(s["total"], norm.sum(0), rtol=1e-12)
    np.testing.assert_allclose(s["total_sq"], (norm * norm).sum(0), rtol=1e-12)
    assert s["n_spots"] == 7 and s["genes"] == list("abcd")


def _stats(dense, genes, scale=1e4):
    stats = expression.GeneStats()
    m = CountMatrix.from_dense(dense, genes)
    s = expression.section_gene_stats(m, dense.sum(1), scale, "e")
    stats.add_partial(s["genes"], s["n_spots"], s["expressed"], s["total"], s["total_sq"])
    return stats


def test_selection_modes_against_numpy():
    rng = np.random.default_rng(1)
    dense = rng.poisson(1.0, (40, 8)).astype(float)
    dense[:20, 0] = 0  # expressed in <= 50%
    dense[:, 1] = 0
    genes = [f"g{j}" for j in range(8)]
    st = _stats(dense, genes)
    frac = (dense > 0).mean(0)
    sel, info = expression.select_genes(st, "expressed", min_expressed_pct=50, n_genes=0)
    assert sel == [g for g, f in zip(genes, frac) if f >= 0.5]
    logn = np.log1p(dense / dense.sum(1, keepdims=True) * 1e4)
    sel, _ = expression.select_genes(st, "hvg", min_expressed_pct=0, n_genes=3)
    assert sel == [genes[j] for j in np.argsort(-logn.var(0), kind="stable")[:3]]
    sel, _ = expression.select_genes(st, "mean", min_expressed_pct=0, n_genes=2)
    assert sel == [genes[j] for j in np.argsort(-logn.mean(0), kind="stable")[:2]]
    with pytest.raises(IngestError, match="kept no genes.*--min_expressed_pct"):
        expression.select_genes(st, "expressed", min_expressed_pct=101, n_genes=0)
    sel, info = expression.select_genes(st, "list", min_expressed_pct=0, n_genes=0, gene_list=["g3", "ZZZ"])
    assert sel == ["g3", "ZZZ"] and info["missing_from_input"] == ["ZZZ"]


def test_stats_merge_across_sections_with_different_genes():
    a = np.array([[1, 0], [2, 2]], float)
    b = np.array([[0, 5], [1, 1], [0, 0.0]])
    st = expression.GeneStats()
    for dense, genes in ((a, ["x", "y"]), (b, ["y", "z"])):
        m = CountMatrix.from_dense(dense, genes)
        s = expression.section_gene_stats(m, np.maximum(dense.sum(1), 1), 1.0, "none")
        st.add_partial(s["genes"], s["n_spots"], s["expressed"], s["total"], s["total_sq"])
    assert st.genes == ["x", "y", "z"] and st.n_spots == 5
    np.testing.assert_allclose(st.expressed_fraction, [2 / 5, 2 / 5, 2 / 5])


def test_hgnc_map_and_harmonise(tmp_path):
    p = tmp_path / "hgnc.tsv"
    p.write_text("HGNC ID\tApproved symbol\tEnsembl ID(supplied by Ensembl)\n"
                 "HGNC:1\tERBB2\tENSG00000141736\nHGNC:2\tGAPDH\tENSG00000111640\nHGNC:3\tNOENS\t\n")
    gm = expression.read_hgnc_map(str(p))
    m = CountMatrix.from_dense(np.array([[1, 2, 3]]), ["ENSG00000141736.14", "ENSG00000111640", "ENSG0000099"])
    out, info = expression.harmonise(m, "ensembl", "symbol", gm, "here")
    assert out.genes == ["ERBB2", "GAPDH", "ENSG0000099"] and info["unmapped"] == 1
    with pytest.raises(IngestError, match="--gene_map"):
        expression.harmonise(m, "ensembl", "symbol", None, "here")
    bad = tmp_path / "bad.tsv"
    bad.write_text("symbol\tensembl\nA\tB\n")
    with pytest.raises(IngestError, match="Approved symbol"):
        expression.read_hgnc_map(str(bad))


def test_genes_from_another_store(tmp_path):
    other = tmp_path / "other"
    write_store(other, np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 3)), ["ENSG00000001003", "ENSG00000001004",
                                                                          "MISSING1"],
                {"section": ["s"], "patient": ["p"], "array_x": [0], "array_y": [0], "pixel_x": [0.0],
                 "pixel_y": [0.0]}, manifest={"expression": {"scale": 1e4, "log_base": "e"}})
    write_stnet(str(tmp_path / "rel"))
    rep = build.prepare(build.PrepareOptions(format="stnet", input=str(tmp_path / "rel"), output=str(tmp_path / "s"),
                                             stain="none", genes_from=str(other), min_umi=FIXTURE_MIN_UMI))
    store = open_store(tmp_path / "s")
    assert store.genes == ["ENSG00000001003", "ENSG00000001004", "MISSING1"]
    assert store.manifest["genes_missing_from_input"] == ["MISSING1"]
    assert rep["genes"]["selection"]["missing_from_input"] == ["MISSING1"]
    assert (store.expression[:][:, 2] == 0).all() and (store.expression[:][:, 0] > 0).any()


def test_gene_list_file(tmp_path):
    p = tmp_path / "genes.txt"
    p.write_text("# wanted\nERBB2\n\nGAPDH, extra\n")
    assert expression.read_gene_list(str(p)) == ["ERBB2", "GAPDH"]
    p.write_text("# nothing\n")
    with pytest.raises(IngestError, match="empty"):
        expression.read_gene_list(str(p))
