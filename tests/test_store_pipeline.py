"""Tile store round trip, atomic writes, and the Grain pipeline's shuffling, sharding and resumable state."""

import os

import numpy as np
import pytest

from histospace_jax.data import StoreError, StoreWriter, open_store, pipeline, write_store


def make_obs(n, patient="P1", section="S1"):
    return {"section": [section] * n, "patient": [patient] * n, "array_x": np.arange(n),
            "array_y": np.arange(n) * 2, "pixel_x": np.arange(n) * 10.5, "pixel_y": np.arange(n) * 3.25,
            "label": ["tumour" if i % 2 else "" for i in range(n)]}


@pytest.fixture
def small_store(tmp_path):
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    expr = rng.random((40, 6), dtype=np.float32)
    path = tmp_path / "store"
    with StoreWriter(path, genes=[f"G{i}" for i in range(6)], tile_size=32, manifest={"note": "test"}) as w:
        w.append(tiles[:25], expr[:25], make_obs(25, "P1", "S1"))
        w.append(tiles[25:], expr[25:], make_obs(15, "P2", "S2"))
    return str(path), tiles, expr


def test_round_trip(small_store):
    path, tiles, expr = small_store
    s = open_store(path)
    assert s.n_spots == 40 and s.genes == [f"G{i}" for i in range(6)]
    np.testing.assert_array_equal(np.asarray(s.tiles), tiles)
    np.testing.assert_array_equal(s.expression[:], expr)
    np.testing.assert_array_equal(s.tiles[[7, 3, 7]], tiles[[7, 3, 7]])
    assert s.patients == ["P1", "P2"]
    assert list(s.obs["section"][24:26]) == ["S1", "S2"]
    np.testing.assert_array_equal(s.obs["pixel_x"][:25], np.arange(25) * 10.5)
    assert s.obs["spot_id"][3] == "3x6"
    assert s.obs["label"][1] == "tumour" and s.obs["label"][0] == ""
    assert s.manifest["note"] == "test" and s.manifest["synthetic"] is False
    np.testing.assert_array_equal(s.gene_index(["G3", "G0"]), [3, 0])
    with pytest.raises(StoreError, match="GX"):
        s.gene_index(["G1", "GX"])


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "bad"
    with pytest.raises(StoreError, match="non-finite expression"):
        with StoreWriter(path, genes=["A", "B"], tile_size=8) as w:
            w.append(np.zeros((2, 8, 8, 3), np.uint8), np.array([[1, 2], [np.nan, 0]], np.float32), make_obs(2))
    assert os.listdir(tmp_path) == []


def test_existing_store_needs_overwrite(small_store, tmp_path):
    path, tiles, expr = small_store
    with pytest.raises(StoreError, match="overwrite"):
        write_store(path, tiles[:2], expr[:2], [f"G{i}" for i in range(6)], make_obs(2))
    write_store(path, tiles[:2], expr[:2], [f"G{i}" for i in range(6)], make_obs(2), overwrite=True)
    assert open_store(path).n_spots == 2
    assert sorted(os.listdir(tmp_path)) == ["store"]


def test_open_store_errors_name_the_file(tmp_path):
    with pytest.raises(StoreError, match="no such tile store"):
        open_store(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(StoreError, match="manifest.json: missing"):
        open_store(tmp_path / "half")


def test_wrong_shapes_rejected(tmp_path):
    with pytest.raises(StoreError, match="expression shape"):
        with StoreWriter(tmp_path / "s", genes=["A"], tile_size=8) as w:
            w.append(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((3, 1), np.float32), make_obs(2))
    with pytest.raises(StoreError, match="tiles must be uint8"):
        with StoreWriter(tmp_path / "s", genes=["A"], tile_size=8) as w:
            w.append(np.zeros((2, 8, 8, 4), np.uint8), np.zeros((2, 1), np.float32), make_obs(2))


def _source(path):
    s = open_store(path)
    return pipeline.ArraySource({"image": pipeline.LazyStoreColumn(path, "tiles"), "expression": s.expression},
                                patient_idx=pipeline.patient_indices(s)[1])


def test_loader_epochs_shuffle_and_cover(small_store):
    path, tiles, _ = small_store
    src = _source(path)
    it = iter(pipeline.train_loader(src, global_batch_size=8, seed=3, num_epochs=2))
    batches = list(it)
    assert len(batches) == 10  # 80 elements, batch 8, drop remainder
    idx = np.concatenate([b["index"] for b in batches])
    first, second = idx[:40], idx[40:]
    assert sorted(first) == list(range(40)) and sorted(second) == list(range(40))
    assert not np.array_equal(first, second)  # reshuffled each epoch
    b = batches[0]
    np.testing.assert_array_equal(b["image"], tiles[b["index"]])
    np.testing.assert_array_equal(b["patient_idx"], (b["index"] >= 25).astype(np.int32))


def test_loader_state_restores_at_same_element(small_store):
    path, _, _ = small_store
    src = _source(path)
    it = iter(pipeline.train_loader(src, global_batch_size=8, seed=5, num_epochs=3))
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it)["index"] for _ in range(4)]
    it2 = iter(pipeline.train_loader(src, global_batch_size=8, seed=5, num_epochs=3))
    it2.set_state(state)
    got = [next(it2)["index"] for _ in range(4)]
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


def test_ordered_batches_pad_and_mask(small_store):
    path, tiles, _ = small_store
    batches = list(pipeline.ordered_batches(_source(path), 16, pad_to_multiple=4))
    assert [len(b["mask"]) for b in batches] == [16, 16, 8]
    assert batches[-1]["mask"].tolist() == [1] * 8
    batches = list(pipeline.ordered_batches(_source(path), 12, pad_to_multiple=8))
    assert [len(b["mask"]) for b in batches] == [16, 16, 16, 8]
    assert batches[-1]["mask"].tolist() == [1] * 4 + [0] * 4
    idx = np.concatenate([b["index"][b["mask"] > 0] for b in batches])
    np.testing.assert_array_equal(idx, np.arange(40))


# --------------------------------------------------------------------------------- optional obs: sequencing depth

def test_depth_obs_round_trip_as_numbers(tmp_path):
    obs = dict(make_obs(3), library_size=np.array([648.0, 1.5e4, 151.0]), n_genes_detected=np.array([401, 5210, 97]))
    path = write_store(tmp_path / "s", np.zeros((3, 8, 8, 3), np.uint8), np.zeros((3, 1), np.float32), ["A"], obs)
    s = open_store(path)
    assert s.obs["library_size"].dtype == np.float64 and s.obs["n_genes_detected"].dtype == np.int64
    np.testing.assert_array_equal(s.obs["library_size"], [648.0, 1.5e4, 151.0])
    np.testing.assert_array_equal(s.obs["n_genes_detected"], [401, 5210, 97])
    with open(os.path.join(path, "obs.csv")) as f:
        assert f.readline().strip().endswith(",label,library_size,n_genes_detected")


def test_store_without_depth_columns_still_opens(small_store):
    path, _, _ = small_store
    with open(os.path.join(path, "obs.csv")) as f:
        assert f.readline().strip() == "spot_id,section,patient,array_x,array_y,pixel_x,pixel_y,label"  # old layout
    s = open_store(path)
    assert "library_size" not in s.obs and "n_genes_detected" not in s.obs and s.n_spots == 40


def test_declared_depth_columns_are_required_and_checked(tmp_path):
    tiles, expr = np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 1), np.float32)
    with pytest.raises(StoreError, match="extra obs columns"):
        StoreWriter(tmp_path / "s", genes=["A"], tile_size=8, extra_obs=("depth",))
    cases = [({"library_size": [10.0, 20.0]}, "'n_genes_detected' missing"),
             ({"library_size": [10.0, -1.0], "n_genes_detected": [3, 4]}, "'library_size' has -1.0 at spot row 1"),
             ({"library_size": [10.0, 20.0], "n_genes_detected": [3, 4.5]}, "'n_genes_detected' has 4.5"),
             ({"library_size": ["many", 20.0], "n_genes_detected": [3, 4]}, "'library_size' must be numeric")]
    for extra, match in cases:
        with pytest.raises(StoreError, match=match):
            with StoreWriter(tmp_path / "s", genes=["A"], tile_size=8,
                             extra_obs=("library_size", "n_genes_detected")) as w:
                w.append(tiles, expr, dict(make_obs(2), **extra))
    assert os.listdir(tmp_path) == []


def test_damaged_depth_column_names_file_and_column(tmp_path):
    obs = dict(make_obs(2), library_size=[5.0, 6.0], n_genes_detected=[1, 2])
    path = write_store(tmp_path / "s", np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 1), np.float32), ["A"], obs)
    obs_path = os.path.join(path, "obs.csv")
    with open(obs_path) as f:
        text = f.read()
    with open(obs_path, "w") as f:
        f.write(text.replace(",6.0,2", ",6.0,two"))
    with pytest.raises(StoreError, match=r"obs.csv: column 'n_genes_detected', data row 2: 'two' is not a int64"):
        open_store(path)


# ------------------------------------------------------------------------------------------------ demo store depth

# The commit whose demo.py predates the depth columns: its stores' tiles and expression must stay bit-identical.
DEMO_REFERENCE_COMMIT = "6b22024b9bb700b5aa0f2458848bfcdb1c5f2bab"
TINY_DEMO = dict(n_patients=2, sections_per_patient=2, grid=(4, 5), n_genes=8, tile_size=32, n_pretrain_patients=1,
                 pretrain_grid=(3, 3))


def _reference_demo_module(tmp_path):
    import importlib.util
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        src = subprocess.run(["git", "show", f"{DEMO_REFERENCE_COMMIT}:histospace_jax/data/demo.py"], cwd=repo,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"reference demo.py of commit {DEMO_REFERENCE_COMMIT[:10]} not available from git ({e})")
    path = tmp_path / "demo_reference.py"
    path.write_bytes(src)
    spec = importlib.util.spec_from_file_location("demo_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["demo_reference"] = module  # dataclasses look their module up while the class is created
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["demo_reference"]
    return module


def test_demo_depth_columns_leave_tiles_and_expression_bit_identical(tmp_path):
    from histospace_jax.data import demo
    old = _reference_demo_module(tmp_path)
    old_paths = old.build_demo(str(tmp_path / "old"), old.DemoSpec(**TINY_DEMO))
    new_paths = demo.build_demo(str(tmp_path / "new"), demo.DemoSpec(**TINY_DEMO))
    for a, b in zip(old_paths, new_paths):
        sa, sb = open_store(a), open_store(b)
        np.testing.assert_array_equal(np.asarray(sb.tiles), np.asarray(sa.tiles))
        np.testing.assert_array_equal(sb.expression[:], sa.expression[:])
        for name in sa.obs:
            np.testing.assert_array_equal(sb.obs[name], sa.obs[name])
    reg, pre = (open_store(p) for p in new_paths)
    assert "library_size" not in pre.obs  # image-only pretraining store
    lib, det = reg.obs["library_size"], reg.obs["n_genes_detected"]
    assert lib.dtype == np.float64 and det.dtype == np.int64 and len(lib) == reg.n_spots == 80
    assert lib.min() >= 100 and 1000 < np.median(lib) < 10000 and (det <= lib).all() and (det > 0).all()
    rank = lambda v: np.argsort(np.argsort(v))
    assert np.corrcoef(rank(lib), rank(det))[0, 1] > 0.8  # more UMIs, more genes detected
    assert len(set(lib.tolist())) > 60  # drawn per spot


def test_demo_rebuilds_a_cached_store_without_depth_columns(tmp_path):
    from histospace_jax.data import demo
    spec = demo.DemoSpec(**TINY_DEMO)
    old = _reference_demo_module(tmp_path)
    assert old.DemoSpec(**TINY_DEMO).key() != spec.key()  # a cache of the old layout is never picked up
    reg, _ = demo.build_demo(str(tmp_path), spec)
    reference = open_store(reg).expression[:]
    # A store of the old layout at the current key (e.g. written by a half-updated checkout) is rebuilt too.
    s = open_store(reg)
    write_store(reg, np.asarray(s.tiles), reference, s.genes, {k: v for k, v in s.obs.items()
                                                               if k not in demo.DEPTH_OBS}, overwrite=True)
    assert "library_size" not in open_store(reg).obs
    reg2, _ = demo.build_demo(str(tmp_path), spec)
    assert reg2 == reg and "library_size" in open_store(reg).obs
    np.testing.assert_array_equal(open_store(reg).expression[:], reference)


def test_fingerprint_follows_the_data_not_the_path(tmp_path):
    """What checkpoints record of their store: the same data anywhere gives the same fingerprint; another
    manifest, obs, sampled tile or expression row gives another."""
    import shutil

    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (9, 8, 8, 3), dtype=np.uint8)
    expr = rng.random((9, 3), dtype=np.float32)
    genes = ["A", "B", "C"]
    base = open_store(write_store(tmp_path / "s", tiles, expr, genes, make_obs(9))).fingerprint
    assert len(base) == 16 and open_store(tmp_path / "s").fingerprint == base
    shutil.copytree(tmp_path / "s", tmp_path / "moved")
    assert open_store(tmp_path / "moved").fingerprint == base
    middle_tile, middle_row = tiles.copy(), expr.copy()
    middle_tile[4, 0, 0, 0] ^= 1
    middle_row[4, 1] += 1
    obs = make_obs(9)
    obs["array_x"] = obs["array_x"] + 1
    others = [write_store(tmp_path / "t", middle_tile, expr, genes, make_obs(9)),
              write_store(tmp_path / "e", tiles, middle_row, genes, make_obs(9)),
              write_store(tmp_path / "o", tiles, expr, genes, obs),
              write_store(tmp_path / "m", tiles, expr, genes, make_obs(9), manifest={"stain": "vahadane"})]
    prints = [open_store(p).fingerprint for p in others]
    assert base not in prints and len(set(prints)) == len(prints)
