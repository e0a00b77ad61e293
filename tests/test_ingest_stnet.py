"""STNet reader on a small release written in the exact public layout (CR line endings, shifted header)."""

import gzip
import json
import os

import numpy as np
import pytest

from histospace_jax.data import open_store
from histospace_jax.ingest import build, stnet
from histospace_jax.ingest.common import IngestError
from tests.test_ingest_fixtures import FIXTURE_MIN_UMI, write_gz, write_stnet


def _opts(root, out, **kw):
    kw.setdefault("stain", "none")
    kw.setdefault("min_umi", FIXTURE_MIN_UMI)
    return build.PrepareOptions(format="stnet", input=str(root), output=str(out), **kw)


def _hgnc(path, genes):
    # Genes 2 and 3 share one symbol: their counts must be summed. Gene 5 is unmapped and keeps its Ensembl ID.
    rows = ["HGNC ID\tApproved symbol\tEnsembl ID(supplied by Ensembl)"]
    for j, g in enumerate(genes):
        if j == 5:
            continue
        sym = "SHARED" if j in (2, 3) else f"SYM{j}"
        rows.append(f"HGNC:{j}\t{sym}\t{g}")
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def stnet_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("stnet")
    info = write_stnet(str(root / "release"))
    _hgnc(str(root / "hgnc.tsv"), info["genes"])
    opts = _opts(root / "release", root / "store", gene_map=str(root / "hgnc.tsv"), gene_ids="symbol",
                 min_expressed_pct=50.0)
    rep = build.prepare(opts)
    return info, open_store(root / "store"), rep


def test_spots_are_under_tissue_spots_with_counts(stnet_store):
    info, store, rep = stnet_store
    for sec, t in info["sections"].items():
        expected = {k for k, u in zip(t["keys"], t["under"]) if u and k != t["missing"]}
        got = set(store.obs["spot_id"][store.obs["section"] == sec])
        assert got == expected
    assert rep["dropped"]["no_counts"] == 2


def test_pixel_coordinates_and_tumour_labels(stnet_store):
    info, store, _ = stnet_store
    for sec, t in info["sections"].items():
        rows = np.flatnonzero(store.obs["section"] == sec)
        lookup = {k: i for i, k in enumerate(t["keys"])}
        for r in rows:
            i = lookup[store.obs["spot_id"][r]]
            assert store.obs["pixel_x"][r] == pytest.approx(round(t["px"][i], 2))
            assert store.obs["pixel_y"][r] == pytest.approx(round(t["py"][i], 2))
            assert (store.obs["array_x"][r], store.obs["array_y"][r]) == (t["xs"][i], t["ys"][i])
            # Fractional annotation coordinates rounded back onto the grid; flags tumor|non.
            assert store.obs["label"][r] == ("tumor" if t["tumour"][i] else "non_tumor")


def test_expression_matches_independent_recomputation(stnet_store):
    info, store, _ = stnet_store
    genes = info["genes"]
    symbol = {g: ("SHARED" if j in (2, 3) else (g if j == 5 else f"SYM{j}")) for j, g in enumerate(genes)}
    expr = store.expression[:]
    n_total, expressed = 0, {}
    for sec, t in info["sections"].items():
        lookup = {k: i for i, k in enumerate(t["keys"])}
        rows = np.flatnonzero(store.obs["section"] == sec)
        for r in rows:
            c = t["counts"][lookup[store.obs["spot_id"][r]]]
            merged = {}
            for j, g in enumerate(genes):
                merged[symbol[g]] = merged.get(symbol[g], 0) + c[j]
            lib = c.sum()
            for name, v in merged.items():
                expressed[name] = expressed.get(name, 0) + (v > 0)
            for col, name in enumerate(store.genes):
                assert expr[r, col] == pytest.approx(np.log1p(merged[name] / lib * 1e4), rel=1e-5)
        n_total += len(rows)
    assert store.genes == [g for g in dict.fromkeys(symbol[x] for x in genes) if expressed[g] / n_total >= 0.5]
    assert "SHARED" in store.genes and genes[5] in store.genes and "SYM0" not in store.genes


def test_manifest_scale_and_hashes(stnet_store):
    info, store, _ = stnet_store
    m = store.manifest
    assert m["source_format"] == "stnet" and m["synthetic"] is False
    assert m["microns_per_pixel"] == pytest.approx(build.DEFAULT_TILE_UM / store.tiles.shape[1])  # the default field
    for s in m["sections"]:
        assert s["source_microns_per_pixel"] == pytest.approx(info["mpp"], rel=0.01)
        assert len(s["image_sha256"]) == 64
    assert os.path.isfile(os.path.join(store.path, "report", "report.json"))
    assert store.tiles[0].shape == (128, 128, 3)


def test_tumour_annotation_parser_handles_cr_and_shifted_header(tmp_path):
    p = str(tmp_path / "a_Coords.tsv.gz")
    write_gz(p, "xcoord\tycoord\tlab\ttumor\r10x13\t10.4\t12.6\t1\ttumor\r11x13\t10.6\t13.2\t0\tnon\r")
    assert stnet.read_tumour_annotation(p) == {"10x13": "tumor", "11x13": "non_tumor"}
    write_gz(p, "xcoord\tycoord\tlab\ttumor\r10x13\t10.4\t12.6\t1\tmaybe\r")
    with pytest.raises(IngestError, match="tumor' or 'non'"):
        stnet.read_tumour_annotation(p)


def _rewrite_counts(root, sec, fn):
    path = os.path.join(root, sec.split("_")[0], f"{sec}_stdata.tsv.gz")
    lines = gzip.open(path).read().decode().splitlines()
    write_gz(path, "\n".join(fn(lines)) + "\n")
    return path


@pytest.mark.parametrize("kind, match", [
    ("non_numeric", r"is not a number"),
    ("negative", r"negative count"),
    ("duplicate", r"appears twice"),
    ("nan", r"is not a finite number"),
])
def test_bad_counts_name_file_row_and_fix(tmp_path, kind, match):
    root = str(tmp_path / "rel")
    write_stnet(root)

    def corrupt(lines):
        fields = lines[5].split("\t")
        if kind == "non_numeric":
            fields[3] = "n/a"
        elif kind == "negative":
            fields[3] = "-2"
        elif kind == "nan":
            fields[3] = "nan"
        lines[5] = "\t".join(fields)
        if kind == "duplicate":
            lines.append(lines[5])
        return lines

    path = _rewrite_counts(root, "BC1_C1", corrupt)
    with pytest.raises(IngestError, match=match) as e:
        build.prepare(_opts(root, tmp_path / "store"))
    assert path in str(e.value)
    assert not os.path.exists(tmp_path / "store")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".store")], "temporary store left behind"


def test_missing_counts_error_mode(tmp_path):
    root = str(tmp_path / "rel")
    write_stnet(root)
    with pytest.raises(IngestError, match="--missing_counts=drop"):
        build.prepare(_opts(root, tmp_path / "store", missing_counts="error"))


def test_coordinates_outside_image_raise(tmp_path):
    root = str(tmp_path / "rel")
    write_stnet(root)
    path = os.path.join(root, "BC2", "spots_BC2_D1.csv.gz")
    lines = gzip.open(path).read().decode().splitlines()
    k, _, y = lines[-1].split(",")  # (the first spot has no count row and is dropped before the check)
    lines[-1] = f"{k},5000.0,{y}"
    write_gz(path, "\n".join(lines) + "\n")
    with pytest.raises(IngestError, match=r"outside the 900x900 image"):
        build.prepare(_opts(root, tmp_path / "store"))


def test_edge_drop_and_pad_are_counted(tmp_path):
    root = str(tmp_path / "rel")
    write_stnet(root)
    # Outer spot centres sit ~150 px from the border; at 5 um/px a 128-px tile needs a 320-px box at the source's
    # 2 um/px (half-width 160), so the outer ring of boxes leaves the image.
    rep_pad = build.prepare(_opts(root, tmp_path / "pad", target_mpp=5.0))
    rep_drop = build.prepare(_opts(root, tmp_path / "drop", target_mpp=5.0, edge="drop"))
    assert rep_pad["padded"] > 0 and rep_pad["dropped"]["tile_outside_image"] == 0
    assert rep_drop["dropped"]["tile_outside_image"] == rep_pad["padded"]
    assert rep_drop["n_spots"] == rep_pad["n_spots"] - rep_pad["padded"]
    # Padding is white (glass) in the stored tile.
    store = open_store(tmp_path / "pad")
    corner = store.obs["pixel_x"].argmin()
    assert (store.tiles[int(corner)][:, 0] >= 250).all()


def test_existing_store_needs_overwrite(stnet_store, tmp_path):
    info, store, _ = stnet_store
    before = json.load(open(os.path.join(store.path, "manifest.json")))
    rel = os.path.join(os.path.dirname(store.path), "release")
    with pytest.raises(IngestError, match="--overwrite"):
        build.prepare(_opts(rel, store.path))
    assert json.load(open(os.path.join(store.path, "manifest.json"))) == before


def test_truncated_gz_names_file_and_leaves_no_store(tmp_path):
    root = str(tmp_path / "rel")
    write_stnet(root)
    path = os.path.join(root, "BC1", "BC1_C1_stdata.tsv.gz")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(IngestError, match="truncated or corrupt, download it again") as e:
        build.prepare(_opts(root, tmp_path / "store"))
    assert path in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["rel"]


def test_all_zero_spot_is_dropped_and_counted(tmp_path):
    root = str(tmp_path / "rel")
    write_stnet(root)
    zeroed = {}

    def zero_one_spot(lines):
        fields = lines[5].split("\t")
        zeroed["key"] = fields[0]
        lines[5] = "\t".join([fields[0]] + ["0"] * (len(fields) - 1))
        return lines

    _rewrite_counts(root, "BC1_C1", zero_one_spot)
    rep = build.prepare(_opts(root, tmp_path / "store"))
    section = [e for e in rep["sections"] if e.get("section") == "BC1_C1"][0]
    assert section["dropped"].get("zero_library") == 1
    store = open_store(tmp_path / "store")
    ids = set(store.obs["spot_id"][store.obs["section"] == "BC1_C1"])
    assert zeroed["key"] not in ids and len(ids) > 0
    assert np.isfinite(store.expression[:]).all()


def test_depth_obs_equal_recomputation_from_raw_counts(stnet_store):
    """library_size and n_genes_detected are over all genes of the RAW matrix: the HGNC map merges genes 2 and 3
    into SHARED, but a spot expressing both still detects two genes."""
    info, store, _ = stnet_store
    assert store.obs["library_size"].dtype == np.float64 and store.obs["n_genes_detected"].dtype == np.int64
    merged_differs = 0
    for sec, t in info["sections"].items():
        lookup = {k: i for i, k in enumerate(t["keys"])}
        rows = np.flatnonzero(store.obs["section"] == sec)
        raw = t["counts"][[lookup[k] for k in store.obs["spot_id"][rows]]]
        np.testing.assert_array_equal(store.obs["library_size"][rows], raw.sum(axis=1))
        np.testing.assert_array_equal(store.obs["n_genes_detected"][rows], (raw > 0).sum(axis=1))
        merged_differs += int(((raw[:, 2] > 0) & (raw[:, 3] > 0)).sum())
    assert merged_differs > 0  # the raw-vs-merged distinction is exercised
    assert store.manifest["obs_depth"].keys() == {"library_size", "n_genes_detected"}


def test_gene_selection_records_its_pool(stnet_store):
    _, store, rep = stnet_store
    sel = store.manifest["gene_selection"]
    assert sel["pooled_over"] == build.GENE_POOL and "held-out patients" in sel["pooled_over"]
    assert sel["patients_pooled"] == ["BC1", "BC2"] and sel["sections_pooled"] == ["BC1_C1", "BC2_D1"]
    assert sel["n_spots_considered"] == store.n_spots
    assert rep["genes"]["selection"]["pooled_over"] == build.GENE_POOL


def test_min_umi_drops_exactly_the_shallow_spots_and_counts_them(tmp_path):
    root = str(tmp_path / "rel")
    info = write_stnet(root)
    zeroed = {}

    def zero_one_spot(lines):  # an empty spot is counted as zero_library only, not also as below_min_umi
        fields = lines[5].split("\t")
        zeroed["key"] = fields[0]
        lines[5] = "\t".join([fields[0]] + ["0"] * (len(fields) - 1))
        return lines

    _rewrite_counts(root, "BC1_C1", zero_one_spot)
    libs = {}
    for sec, t in info["sections"].items():
        for k, c, u in zip(t["keys"], t["counts"], t["under"]):
            if u and k != t["missing"]:
                libs[(sec, k)] = 0 if (sec, k) == ("BC1_C1", zeroed["key"]) else int(c.sum())
    threshold = int(np.median(list(libs.values())))
    rep = build.prepare(_opts(root, tmp_path / "store", min_umi=threshold))
    store = open_store(tmp_path / "store")
    expected = {key for key, lib in libs.items() if lib >= threshold}
    assert set(zip(store.obs["section"], store.obs["spot_id"])) == expected
    assert store.obs["library_size"].min() >= threshold
    total = 0
    for sec in info["sections"]:
        shallow = sum(1 for (s, _), lib in libs.items() if s == sec and 0 < lib < threshold)
        entry = next(e for e in rep["sections"] if e["section"] == sec)
        assert entry["dropped"]["below_min_umi"] == shallow > 0
        total += shallow
    assert rep["dropped"]["below_min_umi"] == total and rep["dropped"]["zero_library"] == 1
    with open(os.path.join(store.path, "report", "report.json")) as f:
        on_disk = json.load(f)
    assert on_disk["dropped"]["below_min_umi"] == total
    assert store.manifest["report"]["dropped"]["below_min_umi"] == total
    assert store.manifest["spot_filters"]["min_umi"] == threshold
    assert store.n_spots == len(expected) == rep["n_spots"]


def test_min_umi_default_and_validation(tmp_path):
    assert build.PrepareOptions(format="stnet", input="x", output="y").min_umi == build.DEFAULT_MIN_UMI == 100
    root = str(tmp_path / "rel")
    write_stnet(root)
    with pytest.raises(IngestError, match="--min_umi=-1"):
        build.prepare(_opts(root, tmp_path / "s", min_umi=-1))
    # The fixture's spots hold tens of UMIs: at the default every spot is below the floor, and nothing is written.
    with pytest.raises(IngestError, match=r"below --min_umi=100 UMIs: lower --min_umi") as e:
        build.prepare(build.PrepareOptions(format="stnet", input=root, output=str(tmp_path / "s"), stain="none"))
    assert str(e.value).startswith(root) and "'below_min_umi': " in str(e.value)
    assert not os.path.exists(tmp_path / "s")
