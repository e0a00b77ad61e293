"""Tile stores at URLs: file:// and memory:// round trips through tensorstore's kvstores, the commit (manifest
last) that hides a half-written store, training reads through the Grain pipeline, and the gs:// / s3:// specs
(built without network)."""

import json
import os
import uuid

import numpy as np
import pytest
import tensorstore as ts

from histospace_jax import datasets
from histospace_jax.data import StoreError, StoreWriter, open_store, pipeline, write_store
from histospace_jax.data import store as store_lib

GENES = ["G1", "G2", "G3"]
FORMAT = store_lib.FORMAT_NAME


def make_spots(n=20, seed=0):
    rng = np.random.default_rng(seed)
    tiles = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    expr = rng.random((n, len(GENES)), dtype=np.float32)
    obs = {"section": ["S1"] * (n // 2) + ["S2"] * (n - n // 2), "patient": ["P1"] * (n // 2) + ["P2"] * (n - n // 2),
           "array_x": np.arange(n), "array_y": np.arange(n) % 3, "pixel_x": np.arange(n) * 12.5,
           "pixel_y": np.arange(n) * 0.75, "label": ["tumour" if i % 3 else "" for i in range(n)],
           "library_size": np.arange(n) * 10.0 + 100, "n_genes_detected": np.arange(n) + 7}
    return tiles, expr, obs


def memory_url() -> str:
    return f"memory://test-{uuid.uuid4().hex[:8]}/stores/s"  # memory stores are per process: a fresh name per test


@pytest.fixture(params=["file", "memory"])
def url(request, tmp_path):
    return f"file://{tmp_path}/s" if request.param == "file" else memory_url()


def test_round_trip_tiles_expression_obs_manifest(url):
    tiles, expr, obs = make_spots()
    assert write_store(url + "/", tiles, expr, GENES, obs, manifest={"note": "url"}) == url
    s = open_store(url)
    assert s.path == url and s.n_spots == 20 and s.genes == GENES and s.patients == ["P1", "P2"]
    np.testing.assert_array_equal(np.asarray(s.tiles), tiles)
    np.testing.assert_array_equal(s.tiles[[5, 1, 5]], tiles[[5, 1, 5]])
    np.testing.assert_array_equal(s.expression[:], expr)
    for name in ("array_x", "pixel_x", "pixel_y", "library_size", "n_genes_detected"):
        np.testing.assert_array_equal(s.obs[name], obs[name])
    assert list(s.obs["label"][:3]) == ["", "tumour", "tumour"] and s.obs["spot_id"][2] == "2x2"
    assert s.manifest["note"] == "url" and s.manifest["n_spots"] == 20 and s.manifest["format"] == FORMAT
    assert repr(s.tiles).startswith(f"ArrayView({url}/tiles")
    # An existing store needs overwrite; overwrite replaces it whole.
    with pytest.raises(StoreError, match="already exists.*overwrite"):
        write_store(url, tiles, expr, GENES, obs)
    write_store(url, tiles[:4], expr[:4], GENES, {k: v[:4] for k, v in obs.items()}, overwrite=True)
    assert open_store(url).n_spots == 4 and len(open_store(url).obs["section"]) == 4


def test_file_url_is_the_same_store_as_its_path(tmp_path):
    tiles, expr, obs = make_spots()
    write_store(f"file://{tmp_path}/s", tiles, expr, GENES, obs)
    assert sorted(os.listdir(tmp_path)) == ["s"]  # written in place, nothing else left beside it
    assert sorted(os.listdir(tmp_path / "s")) == ["expression", "manifest.json", "obs.csv", "tiles"]
    np.testing.assert_array_equal(open_store(tmp_path / "s").expression[:], expr)


def test_half_written_store_is_refused_until_rewritten_with_overwrite(url):
    tiles, expr, obs = make_spots()
    w = StoreWriter(url, genes=GENES, tile_size=16)
    w.append(tiles, expr, obs)  # a prepare killed here: data written, no manifest
    with pytest.raises(StoreError, match=r"manifest.json: missing, but .* holds tile data.*--overwrite"):
        open_store(url)
    with pytest.raises(StoreError, match="already exists"):
        StoreWriter(url, genes=GENES, tile_size=16)
    write_store(url, tiles, expr, GENES, obs, overwrite=True)
    assert open_store(url).n_spots == 20


def test_failed_write_leaves_nothing_and_missing_store_is_named(url):
    tiles, expr, obs = make_spots()
    with pytest.raises(StoreError, match="non-finite"):
        with StoreWriter(url, genes=GENES, tile_size=16) as w:
            w.append(tiles[:4], expr[:4], {k: v[:4] for k, v in obs.items()})
            bad = expr[4:8].copy()
            bad[1, 2] = np.nan
            w.append(tiles[4:8], bad, {k: v[4:8] for k, v in obs.items()})
    assert not store_lib.store_exists(url)
    assert ts.KvStore.open(store_lib.kvstore_spec(url), context=store_lib._CONTEXT).result().list().result() == []
    with pytest.raises(StoreError, match=f"{url}: no such tile store"):
        open_store(url)


def test_staged_side_files_are_uploaded_before_the_commit():
    url = memory_url()
    tiles, expr, obs = make_spots()
    with StoreWriter(url, genes=GENES, tile_size=16) as w:
        w.append(tiles, expr, obs)
        os.makedirs(os.path.join(w.tmp_path, "report"))
        with open(os.path.join(w.tmp_path, "report", "report.json"), "w") as f:  # as ingest's report does
            json.dump({"n_spots": 20}, f)
    kv = ts.KvStore.open(store_lib.kvstore_spec(url), context=store_lib._CONTEXT).result()
    assert json.loads(kv.read("report/report.json").result().value) == {"n_spots": 20}
    assert not os.path.exists(w.tmp_path)


def test_grain_pipeline_trains_from_a_file_url_store(tmp_path):
    tiles, expr, obs = make_spots(24)
    url = write_store(f"file://{tmp_path}/s", tiles, expr, GENES, obs)
    s = open_store(url)
    column = pipeline.LazyStoreColumn(url + "/", "tiles")
    assert column.store_path == url
    source = pipeline.ArraySource({"image": column, "expression": s.expression},
                                  patient_idx=pipeline.patient_indices(s)[1])
    batches = list(pipeline.train_loader(source, global_batch_size=8, seed=1, num_epochs=1))
    assert len(batches) == 3
    for b in batches:
        np.testing.assert_array_equal(b["image"], tiles[b["index"]])
        np.testing.assert_array_equal(b["expression"], expr[b["index"]])
    assert sorted(np.concatenate([b["index"] for b in batches]).tolist()) == list(range(24))


def test_gs_and_s3_specs_without_network():
    assert store_lib.kvstore_spec("gs://bucket/x") == {"driver": "gcs", "bucket": "bucket", "path": "x/"}
    assert store_lib.kvstore_spec("gs://bucket/stores/her2st/", "tiles/") == {
        "driver": "gcs", "bucket": "bucket", "path": "stores/her2st/tiles/"}
    assert store_lib.kvstore_spec("s3://bkt/a/s") == {"driver": "s3", "bucket": "bkt", "path": "a/s/"}
    assert store_lib._array_spec("gs://bucket/x", "expression") == {
        "driver": "zarr3", "kvstore": {"driver": "gcs", "bucket": "bucket", "path": "x/expression/"}}
    # The same specs tensorstore itself parses from the URLs (no I/O happens building a spec).
    for url in ("gs://bucket/x", "s3://bkt/a/s", f"file://{os.sep}tmp/s", "memory://m/s"):
        assert store_lib.kvstore_spec(url) == ts.KvStore.Spec(url + "/").to_json()
    assert store_lib.kvstore_spec("/data/s") == {"driver": "file", "path": "/data/s/"}
    with pytest.raises(StoreError, match="http://x/s: unsupported URL scheme"):
        store_lib.kvstore_spec("http://x/s")
    with pytest.raises(StoreError, match="no bucket name"):
        store_lib.kvstore_spec("gs:///x")


def test_locations_are_not_mangled_like_paths(monkeypatch, tmp_path):
    assert store_lib.normalise_location("gs://bucket/a/b/") == "gs://bucket/a/b"
    assert store_lib.normalise_location("file://rel/s") == f"file://{os.getcwd()}/rel/s"
    assert store_lib.normalise_location("rel/s") == os.path.join(os.getcwd(), "rel", "s")
    assert store_lib.is_url("s3://b/x") and not store_lib.is_url("/data/gs:/x")
    assert store_lib.location_name("gs://bucket/stores/her2st/") == "her2st"
    assert store_lib.join_location("gs://bucket/s", "obs.csv") == "gs://bucket/s/obs.csv"
    # The run's dataset record keeps the URL (one spelling) and names it by its last component.
    from histospace_jax import config as config_lib

    config = config_lib.get_config()
    config.data.store, config.ae.store = "gs://bucket/stores/her2st/", "gs://bucket/bach"
    store, ae_store, dataset = datasets.resolve_stores(config)
    assert (store, ae_store, dataset["name"]) == ("gs://bucket/stores/her2st", "gs://bucket/bach", "her2st")


def test_prepare_output_check_takes_urls(tmp_path):
    """prepare refuses an existing --output URL before reading any input (the check at its start)."""
    from histospace_jax.ingest import build
    from histospace_jax.ingest.common import IngestError

    url = f"file://{tmp_path}/s"
    tiles, expr, obs = make_spots()
    write_store(url, tiles, expr, GENES, obs)
    opts = build.PrepareOptions(format="images", input=str(tmp_path / "no_input"), output=url + "/", source_mpp=0.5)
    with pytest.raises(IngestError, match=f"{url}: already exists"):
        build.prepare(opts)
