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
