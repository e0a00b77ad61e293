"""Visium reader: fixtures in Space Ranger's layouts (h5 and mtx; both position-file variants) and the real
396A Space Ranger files."""

import gzip
import json
import os

import h5py
import numpy as np
import pytest
from PIL import Image

from histospace_jax.data import open_store
from histospace_jax.ingest import build, visium
from histospace_jax.ingest.common import IngestError
from tests.test_ingest_fixtures import FIXTURE_MIN_UMI, synth_he, write_10x_h5, write_gz

N_BC, N_GENES = 40, 9


def _write_outs(root, *, matrix="h5", positions="v2", seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "outs", "spatial"))
    barcodes = [f"AAAC{i:04d}-1" for i in range(N_BC)]
    ids = [f"ENSG{j:011d}" for j in range(N_GENES)]
    # Feature 7 repeats symbol GENE0 (real references have such duplicates); feature 8 is an antibody tag.
    names = [f"GENE{j}" for j in range(N_GENES - 2)] + ["GENE0", "ADT8"]
    types = ["Gene Expression"] * (N_GENES - 1) + ["Antibody Capture"]
    counts = rng.poisson(2.0, (N_GENES, N_BC))  # genes x barcodes, as Space Ranger stores it
    rows = np.arange(N_BC) // 8
    cols = np.arange(N_BC) % 8
    in_tissue = (np.arange(N_BC) % 5 != 0).astype(int)
    pxl_row = 100 + rows * 60.0
    pxl_col = 100 + cols * 50.0
    # The filtered matrix holds in-tissue barcodes only; one in-tissue barcode lacks a column ("no_counts").
    in_matrix = [i for i in range(N_BC) if in_tissue[i]][1:]
    lines = [f"{barcodes[i]},{in_tissue[i]},{rows[i]},{cols[i]},{pxl_row[i]},{pxl_col[i]}" for i in range(N_BC)]
    name = "tissue_positions.csv" if positions == "v2" else "tissue_positions_list.csv"
    header = ["barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"] if positions == "v2" \
        else []
    with open(os.path.join(root, "outs", "spatial", name), "w") as f:
        f.write("\n".join(header + lines) + "\n")
    with open(os.path.join(root, "outs", "spatial", "scalefactors_json.json"), "w") as f:
        json.dump({"spot_diameter_fullres": 40.0, "tissue_hires_scalef": 0.1}, f)
    sub = counts[:, in_matrix]
    if matrix == "h5":
        write_10x_h5(os.path.join(root, "outs", "filtered_feature_bc_matrix.h5"), sub,
                     [barcodes[i] for i in in_matrix], ids, names, types)
    else:
        d = os.path.join(root, "outs", "filtered_feature_bc_matrix")
        os.makedirs(d)
        write_gz(os.path.join(d, "barcodes.tsv.gz"), "".join(barcodes[i] + "\n" for i in in_matrix))
        write_gz(os.path.join(d, "features.tsv.gz"), "".join(f"{a}\t{b}\t{t}\n" for a, b, t in zip(ids, names, types)))
        nz = np.argwhere(sub > 0)
        body = "".join(f"{g + 1} {c + 1} {sub[g, c]}\n" for g, c in nz)
        write_gz(os.path.join(d, "matrix.mtx.gz"), "%%MatrixMarket matrix coordinate integer general\n%\n"
                 f"{N_GENES} {len(in_matrix)} {len(nz)}\n" + body)
    Image.fromarray(synth_he(600, 600, seed=seed)).save(os.path.join(root, "image.png"))
    return dict(barcodes=barcodes, counts=counts, in_matrix=in_matrix, names=names, ids=ids,
                pxl_row=pxl_row, pxl_col=pxl_col, rows=rows, cols=cols)


@pytest.mark.parametrize("matrix, positions", [("h5", "v2"), ("mtx", "v1"), ("h5", "v1"), ("mtx", "v2")])
def test_visium_layouts_give_the_same_table(tmp_path, matrix, positions):
    truth = _write_outs(str(tmp_path), matrix=matrix, positions=positions)
    src = visium.discover([str(tmp_path)], [str(tmp_path / "image.png")], None, None)[0]
    t = visium.read_section(src)
    assert list(t.spot_ids) == [truth["barcodes"][i] for i in truth["in_matrix"]]
    assert t.dropped["no_counts"] == 1
    i = truth["in_matrix"]
    np.testing.assert_allclose(t.pixel_x, truth["pxl_col"][i])  # column = x
    np.testing.assert_allclose(t.pixel_y, truth["pxl_row"][i])
    np.testing.assert_array_equal(t.array_x, truth["cols"][i])
    assert t.microns_per_pixel == pytest.approx(55.0 / 40.0)
    # Antibody capture dropped; the two "GENE0" features are summed.
    dense, _ = t.counts.dense_columns(["GENE0", "GENE3"])
    np.testing.assert_allclose(dense[:, 0], truth["counts"][0, i] + truth["counts"][7, i])
    np.testing.assert_allclose(dense[:, 1], truth["counts"][3, i])
    assert "ADT8" not in t.counts.genes and len(set(t.counts.genes)) == len(t.counts.genes)
    # Depth over the raw Gene Expression features: the two GENE0 features count as two genes detected.
    gex = truth["counts"][:8, i]
    np.testing.assert_array_equal(t.genes_detected(), (gex > 0).sum(axis=0))
    np.testing.assert_array_equal(t.counts.row_sums(), gex.sum(axis=0))
    assert ((gex[0] > 0) & (gex[7] > 0)).any()


def test_visium_prepare_end_to_end_ensembl_ids(tmp_path):
    truth = _write_outs(str(tmp_path), matrix="mtx", positions="v1")
    out = tmp_path / "store"
    build.prepare(build.PrepareOptions(format="visium", input=str(tmp_path / "outs"), output=str(out),
                                       image=(str(tmp_path / "image.png"),), section_name=("S1",), patient=("P1",),
                                       gene_ids="ensembl", gene_filter="mean", n_genes=3, min_umi=FIXTURE_MIN_UMI))
    store = open_store(out)
    assert store.n_spots == len(truth["in_matrix"])
    assert all(g.startswith("ENSG") for g in store.genes) and len(store.genes) == 3
    assert set(store.obs["patient"]) == {"P1"} and set(store.obs["section"]) == {"S1"}
    j = truth["ids"].index(store.genes[0])
    c = truth["counts"][:8, truth["in_matrix"]]  # gene-expression features only
    expected = np.log1p(c[j] / c.sum(axis=0) * 1e4)
    np.testing.assert_allclose(store.expression[:][:, 0], expected, rtol=1e-5)
    np.testing.assert_array_equal(store.obs["library_size"], c.sum(axis=0))
    np.testing.assert_array_equal(store.obs["n_genes_detected"], (c > 0).sum(axis=0))
    assert store.obs["n_genes_detected"].dtype == np.int64
    # The top-mean gene really has the highest mean normalised expression.
    means = np.log1p(c / c.sum(axis=0) * 1e4).mean(axis=1)
    assert j == int(np.argmax(means))


def test_visium_needs_image_and_rejects_foreign_barcodes(tmp_path):
    _write_outs(str(tmp_path))
    with pytest.raises(IngestError, match="--image"):
        build.prepare(build.PrepareOptions(format="visium", input=str(tmp_path), output=str(tmp_path / "s")))
    pos = tmp_path / "outs" / "spatial" / "tissue_positions.csv"
    lines = pos.read_text().splitlines()
    pos.write_text("\n".join(lines[:3] + lines[5:]) + "\n")  # drop two barcodes the matrix still has
    src = visium.discover([str(tmp_path)], [str(tmp_path / "image.png")], None, None)[0]
    with pytest.raises(IngestError, match="different runs"):
        visium.read_section(src)


def _rewrite_gz(path, edit):
    with gzip.open(path, "rt") as f:
        text = f.read()
    write_gz(path, edit(text))


@pytest.mark.parametrize("damage", ["truncated_gz", "not_gzip", "missing_entries", "non_numeric", "dense_array"])
def test_damaged_matrix_mtx_names_the_file_and_the_fix(tmp_path, damage):
    _write_outs(str(tmp_path), matrix="mtx")
    path = os.path.join(tmp_path, "outs", "filtered_feature_bc_matrix", "matrix.mtx.gz")
    if damage == "truncated_gz":
        raw = open(path, "rb").read()
        open(path, "wb").write(raw[: len(raw) // 2])
    elif damage == "not_gzip":
        open(path, "wb").write(b"%%MatrixMarket but not gzipped")
    elif damage == "missing_entries":
        _rewrite_gz(path, lambda t: "".join(t.splitlines(keepends=True)[:-3]))
    elif damage == "non_numeric":
        _rewrite_gz(path, lambda t: t.rstrip("\n").rsplit(" ", 1)[0] + " many\n")
    else:
        write_gz(path, "%%MatrixMarket matrix array integer general\n2 2\n1\n2\n3\n4\n")
    src = visium.discover([str(tmp_path)], [str(tmp_path / "image.png")], None, None)[0]
    fix = "copy the matrix folder" if damage == "dense_array" else "truncated or corrupt, download it again"
    with pytest.raises(IngestError, match=fix) as e:
        visium.read_section(src)
    assert str(e.value).startswith(path)


def test_mtx_shape_must_match_features_and_barcodes(tmp_path):
    _write_outs(str(tmp_path), matrix="mtx")
    folder = os.path.join(tmp_path, "outs", "filtered_feature_bc_matrix")
    _rewrite_gz(os.path.join(folder, "barcodes.tsv.gz"), lambda t: "".join(t.splitlines(keepends=True)[:-1]))
    src = visium.discover([str(tmp_path)], [str(tmp_path / "image.png")], None, None)[0]
    with pytest.raises(IngestError, match="different runs"):
        visium.read_section(src)


def test_inconsistent_h5_matrix_names_the_file(tmp_path):
    _write_outs(str(tmp_path), matrix="h5")
    path = os.path.join(tmp_path, "outs", "filtered_feature_bc_matrix.h5")
    with h5py.File(path, "a") as f:
        indptr = f["matrix/indptr"][:]
        del f["matrix/indptr"]
        f["matrix/indptr"] = indptr[:-5]  # fewer columns than matrix/shape says
    src = visium.discover([str(tmp_path)], [str(tmp_path / "image.png")], None, None)[0]
    with pytest.raises(IngestError, match="truncated or corrupt, copy it again") as e:
        visium.read_section(src)
    assert str(e.value).startswith(path)


def test_negative_count_in_mtx_names_barcode_and_gene(tmp_path):
    truth = _write_outs(str(tmp_path), matrix="mtx")
    path = os.path.join(tmp_path, "outs", "filtered_feature_bc_matrix", "matrix.mtx.gz")
    _rewrite_gz(path, lambda t: t.replace("integer", "real", 1).rstrip("\n").rsplit(" ", 1)[0] + " -3\n")
    src = visium.discover([str(tmp_path)], [str(tmp_path / "image.png")], None, None)[0]
    with pytest.raises(IngestError, match="negative count -3.0 at barcode") as e:
        visium.read_section(src)
    # The last line of the file is the last non-zero entry in (gene, barcode) order.
    g, c = np.argwhere(truth["counts"][:, truth["in_matrix"]] > 0)[-1]
    barcode, gene = truth["barcodes"][truth["in_matrix"][c]], truth["names"][g]
    assert str(e.value).startswith(path) and f"barcode {barcode!r}, gene {gene!r}" in str(e.value)


def test_real_space_ranger_files(shared_data):
    outs = os.path.join(shared_data, "visium-tnbc-396a", "outs")
    src = visium.discover([outs], ["unused.png"], None, None)[0]
    t = visium.read_section(src)
    with h5py.File(os.path.join(outs, "filtered_feature_bc_matrix.h5")) as f:
        indptr = f["matrix/indptr"][:]
        data = f["matrix/data"][:]
        barcodes = [b.decode() for b in f["matrix/barcodes"][:]]
        types = [x.decode() for x in f["matrix/features/feature_type"][:]]
    assert set(types) == {"Gene Expression"}  # so every stored entry is a gene count
    totals = dict(zip(barcodes, np.add.reduceat(data.astype(float), indptr[:-1])))
    detected = dict(zip(barcodes, np.add.reduceat((data > 0).astype(int), indptr[:-1])))
    assert t.n_spots == 554 and t.dropped["no_counts"] == 0
    np.testing.assert_allclose(t.counts.row_sums(), [totals[b] for b in t.spot_ids])
    np.testing.assert_array_equal(t.genes_detected(), [detected[b] for b in t.spot_ids])
    assert t.counts.row_sums().min() >= build.DEFAULT_MIN_UMI  # the default floor keeps every spot of 396A
    assert t.microns_per_pixel == pytest.approx(55.0 / 150.21964981443412)
    with open(os.path.join(outs, "spatial", "tissue_positions_list.csv")) as f:
        first = {ln.split(",")[0]: ln.strip().split(",") for ln in f}
    b = t.spot_ids[0]
    assert t.pixel_x[0] == float(first[b][5]) and t.pixel_y[0] == float(first[b][4])
