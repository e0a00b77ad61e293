"""The paper's experiments beyond plain leave-one-patient-out, with controls.

* `run_ae_study`: the three autoencoder variants (pool, relu, relu_bn) trained on the same tiles; curves,
  reconstruction grids and final MSE per variant.
* `run_external`: train one head on all (chosen) patients of store A, evaluate on store B on the shared genes,
  with the mean-profile, untrained-head and random-encoder controls; spatial maps of named genes; overlap
  check between the stores (patients, image hashes, tile hashes); exports the deployable model for predict.
* `pathology_clustering`: K-means (k=2) on predicted expression vs the pathologist's cancer / non-cancer
  labels: contingency table, agreement count and adjusted Rand index, with a labels-beside-clusters figure.
* `plot_spatial_maps`: truth beside prediction on the spot grid.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from histospace_jax import checkpointing, features, metrics, reporting, stats, steps
from histospace_jax.data import open_store

# HER2ST patients E-H are the STNet patients below (same tissue, re-released): evaluating a HER2ST-trained
# model on STNet (or the reverse) on those patients is not an external test.
HER2ST_STNET_SAME_PATIENT = {"E": "BC23567", "F": "BC23810", "G": "BC23903", "H": "BC24044"}
PAPER_AE_MSE = {"pool": 0.0048, "relu": 0.0034, "relu_bn": 0.002}


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def _with(config, **updates):
    """A copy of `config` with dotted keys changed, e.g. _with(c, **{"model.variant": "pool"})."""
    c = copy.deepcopy(config)
    for key, value in updates.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def count_params(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


def dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


# ------------------------------------------------------------------------------------------------ figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid_xy(obs: dict, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return obs["array_x"][rows].astype(float), obs["array_y"][rows].astype(float)


def plot_spatial_maps(path: str, obs: dict, rows: np.ndarray, genes: list[str], truth: np.ndarray,
                      pred: np.ndarray, title: str = "", max_sections: int = 4) -> None:
    """Per named gene (rows of panels) and per section: measured beside predicted expression on the spot grid.

    truth/pred: [len(rows), len(genes)]. Each panel has its own colour scale (predictions are shrunk towards
    the mean; a shared scale would hide their spatial pattern); r over the shown spots is in the title.
    """
    plt = _plt()
    sections = list(dict.fromkeys(obs["section"][rows].tolist()))
    if len(sections) > max_sections:
        title = (title + "; " if title else "") + f"first {max_sections} of {len(sections)} sections shown"
        sections = sections[:max_sections]
    ncol = 2 * len(sections)
    fig, axes = plt.subplots(len(genes), ncol, figsize=(2.6 * ncol, 2.5 * len(genes) + 0.4), dpi=100,
                             squeeze=False)
    for gi, g in enumerate(genes):
        for si, s in enumerate(sections):
            sel = obs["section"][rows] == s
            x, y = _grid_xy(obs, rows[sel])
            r_sec = metrics.pearson_per_gene(truth[sel, gi:gi + 1], pred[sel, gi:gi + 1])[0]
            for k, (name, vals) in enumerate((("measured", truth[sel, gi]), ("predicted", pred[sel, gi]))):
                ax = axes[gi, 2 * si + k]
                sc = ax.scatter(x, y, c=vals, s=_marker_size(x, y), marker="s", cmap="viridis")
                ax.set_aspect("equal")
                ax.invert_yaxis()
                ax.set_xticks([])
                ax.set_yticks([])
                label = f"{g} {name}\n{s}" + (f" (r={r_sec:.2f})" if k == 1 and np.isfinite(r_sec) else "")
                ax.set_title(label, fontsize=8)
                fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    reporting.save_figure(fig, path)


def _marker_size(x, y, panel_pt: float = 150.0) -> float:
    """Square-marker area (pt^2) so neighbouring grid spots nearly touch in a ~2 inch panel."""
    extent = max(float(np.ptp(x)) if len(x) else 1.0, float(np.ptp(y)) if len(y) else 1.0, 1.0) + 1.0
    return float(np.clip((panel_pt / extent * 0.85) ** 2, 4.0, 400.0))


def plot_reconstructions(path: str, images: np.ndarray, recons: dict, title: str) -> None:
    """Top row: input tiles; one row per variant: its reconstructions."""
    plt = _plt()
    n = len(images)
    rows = 1 + len(recons)
    fig, axes = plt.subplots(rows, n, figsize=(1.3 * n, 1.4 * rows + 0.3), dpi=100, squeeze=False)
    for j in range(n):
        axes[0, j].imshow(images[j])
        for i, (name, rec) in enumerate(recons.items()):
            axes[i + 1, j].imshow(np.clip(rec[j], 0, 1))
    for i, name in enumerate(["input"] + list(recons)):
        axes[i, 0].set_ylabel(name, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    reporting.save_figure(fig, path)


def plot_clusters(path: str, x, y, is_cancer: np.ndarray, clusters: np.ndarray, title: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), dpi=100)
    for ax, vals, name, names in ((axes[0], is_cancer.astype(int), "pathologist", ("non-cancer", "cancer")),
                                  (axes[1], clusters, "K-means (k=2) on predicted expression",
                                   ("cluster matched to non-cancer", "cluster matched to cancer"))):
        for v, colour in ((0, "tab:blue"), (1, "tab:red")):
            sel = vals == v
            ax.scatter(np.asarray(x)[sel], np.asarray(y)[sel], s=_marker_size(x, y, 250.0), marker="s", c=colour,
                       label=names[v])
        ax.set_aspect("equal")
        ax.invert_yaxis()
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=2, frameon=False)
    fig.suptitle(title, fontsize=9)
    reporting.save_figure(fig, path)


# ------------------------------------------------------------------------------------------------ clustering


def is_cancer_label(labels, cancer_labels: str) -> tuple[np.ndarray, np.ndarray]:
    """(labelled mask, cancer mask) from free-text labels; `cancer_labels` is comma-separated, case-insensitive."""
    wanted = {s.strip().lower() for s in cancer_labels.split(",") if s.strip()}
    lab = np.array([str(v).strip().lower() for v in labels])
    labelled = (lab != "") & (lab != "undetermined") & (lab != "nan")
    return labelled, np.isin(lab, list(wanted)) & labelled


def pathology_clustering(workdir: str, obs: dict, rows: np.ndarray, pred: np.ndarray, *, truth=None,
                         cancer_labels: str, seed: int = 0, prefix: str = "clustering") -> dict:
    """Per labelled section among `rows`: K-means (k=2) on the predicted expression of its labelled spots vs
    cancer / non-cancer. `pred` (and `truth`, the same on measured expression, as a reference) are
    [len(rows), G]. Returns {'sections': {...}} or {'skipped': reason}."""
    if "label" not in obs:
        return {"skipped": "the store has no label column"}
    labelled, cancer = is_cancer_label(obs["label"][rows], cancer_labels)
    if not labelled.any():
        return {"skipped": "no spot carries a pathologist label (none of the evaluated sections is annotated)"}
    out = {"cancer_labels": cancer_labels, "seed": seed, "sections": {}}
    sections = obs["section"][rows]
    for s in dict.fromkeys(sections[labelled].tolist()):
        sel = np.flatnonzero((sections == s) & labelled)
        if len(sel) < 4:
            continue
        y = cancer[sel].astype(int)
        entry = {"n_spots": int(len(sel)), "n_cancer": int(y.sum())}
        for name, mat in (("predicted", pred), ("measured", truth)):
            if mat is None:
                continue
            clusters, _, _ = stats.kmeans(np.asarray(mat)[sel], 2, seed=seed)
            table, classes, cl = stats.contingency_table(y, clusters)
            agree, mapping = stats.best_agreement(y, clusters)
            entry[name] = {"contingency": {"rows (truth)": ["non-cancer", "cancer"][:len(classes)]
                                           if classes == [0, 1] else classes,
                                           "columns (cluster)": cl, "table": table.tolist()},
                           "agreement": agree, "agreement_fraction": agree / len(sel),
                           "adjusted_rand_index": stats.adjusted_rand_index(y, clusters)}
            if name == "predicted":
                # Show clusters coloured by the class each is matched to, so agreeing spots share a colour.
                shown = np.array([int(mapping.get(c, c)) for c in clusters])
                x, yy = _grid_xy(obs, rows[sel])
                fname = f"{prefix}_{_safe(s)}.png"
                plot_clusters(os.path.join(workdir, "figures", fname), x, yy, y, shown,
                              f"{s}: agreement {agree}/{len(sel)}, ARI {entry[name]['adjusted_rand_index']:.3f}")
                entry["figure"] = f"figures/{fname}"
        out["sections"][s] = entry
    return out


def _safe(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(s))


# ------------------------------------------------------------------------------------------------ AE study


def run_ae_study(config, workdir: str, image_store: str, writer) -> dict:
    """Trains each variant of config.ae_study.variants into WORKDIR/ae_<variant>/ (resumable) and compares."""
    from histospace_jax import train

    variants = [v for v in config.ae_study.variants]
    results, curves, recons = {}, {}, {}
    store = open_store(image_store)
    n = store.n_spots
    # The same validation tiles pretrain_autoencoder holds out (same seed, same permutation).
    perm = np.random.default_rng(config.seed).permutation(n)
    n_val = int(round(config.ae.val_fraction * n)) if n > 20 else 0
    val_rows = np.sort(perm[:n_val]) if n_val else np.arange(min(n, 8))
    show = val_rows[np.linspace(0, len(val_rows) - 1, min(config.ae_study.n_grid_tiles, len(val_rows))).astype(int)]
    images = store.tiles[show]
    for v in variants:
        c = _with(config, **{"model.variant": v, "ae.checkpoint": ""})
        sub = os.path.join(workdir, f"ae_{v}")
        os.makedirs(sub, exist_ok=True)
        _log(f"[ae_study] variant {v} -> {sub}")
        res = train.pretrain_autoencoder(c, sub, image_store, writer)
        summ = {k: val for k, val in res["summary"].items() if k != "curve"}
        summ["encoder_params"] = count_params(res["variables"]["params"])
        if "state" in res:
            state = res["state"]
            summ["autoencoder_params"] = count_params(state.params)
            recon = np.asarray(jax.jit(steps.ae_reconstruct)(state, jnp.asarray(images)))
            recons[v] = recon
            summ["grid_mse"] = float(np.mean((recon - images / 255.0) ** 2))
        summ["paper_mse_iciar"] = PAPER_AE_MSE.get(v)
        summ["checkpoint_bytes"] = dir_bytes(os.path.join(sub, "checkpoints", "ae"))
        results[v] = summ
        curves[v] = res["summary"].get("curve", [])
    if jax.process_index() == 0:
        rows = [{"variant": v, **r} for v in variants for r in curves[v]]
        if rows:
            reporting.write_csv_atomic(os.path.join(workdir, "curves", "ae_study.csv"), rows,
                                       ["variant", "epoch", "train_mse", "val_mse"])
            series = {}
            for v in variants:
                ep = [r["epoch"] for r in curves[v]]
                series[f"{v} train"] = (ep, [r["train_mse"] for r in curves[v]])
                series[f"{v} validation"] = (ep, [r["val_mse"] for r in curves[v]])
            reporting.plot_curves(os.path.join(workdir, "figures", "ae_study_curves.png"), series,
                                  title="Autoencoder variants: reconstruction MSE", xlabel="epoch", ylabel="MSE",
                                  logy=True)
        if recons:
            plot_reconstructions(os.path.join(workdir, "figures", "ae_study_reconstructions.png"), images,
                                 recons, f"Validation tiles and reconstructions ({os.path.basename(image_store)})")
            for v, rec in recons.items():
                plot_reconstructions(os.path.join(workdir, "figures", f"ae_{v}_reconstructions.png"), images,
                                     {v: rec}, f"{v}: validation tiles (top) and reconstructions")
    return {"variants": results, "image_store": image_store, "n_tiles": n, "n_val_tiles": int(n_val),
            "paper_note": "paper's final MSE on ICIAR tiles: pool 0.0048, relu 0.0034, relu_bn 0.002"}


# ------------------------------------------------------------------------------------------------ overlap


def _canonical_patient(p: str, manifest: dict) -> str:
    if manifest.get("source_format") == "her2st" and p in HER2ST_STNET_SAME_PATIENT:
        return HER2ST_STNET_SAME_PATIENT[p]
    return p


def tile_hashes(store, rows: np.ndarray, batch: int = 256) -> list[str]:
    out = []
    for a in range(0, len(rows), batch):
        for t in store.tiles[rows[a:a + batch]]:
            out.append(hashlib.sha1(np.ascontiguousarray(t).tobytes()).hexdigest())
    return out


def compare_stores(store_a, rows_a: np.ndarray, store_b, rows_b: np.ndarray) -> dict:
    """Shared patients (HER2ST E-H == STNet BC23567/BC23810/BC23903/BC24044), shared source images (manifest
    sha256) and identical tiles between the training rows of A and the evaluation rows of B.
    Returns the overlap and, per B row, whether it overlaps."""
    ma, mb = store_a.manifest, store_b.manifest
    pa = {_canonical_patient(p, ma) for p in set(store_a.obs["patient"][rows_a].tolist())}
    pb_rows = np.array([_canonical_patient(p, mb) for p in store_b.obs["patient"][rows_b]])
    shared_patients = sorted(pa & set(pb_rows.tolist()))
    sec_a = set(store_a.obs["section"][rows_a].tolist())
    hashes_a = {s.get("image_sha256") for s in ma.get("sections", []) if s.get("section") in sec_a} - {None, ""}
    sec_hash_b = {s.get("section"): s.get("image_sha256") for s in mb.get("sections", [])}
    shared_image_sections = sorted({s for s in set(store_b.obs["section"][rows_b].tolist())
                                    if sec_hash_b.get(s) and sec_hash_b.get(s) in hashes_a})
    ha = set(tile_hashes(store_a, rows_a))
    hb = tile_hashes(store_b, rows_b)
    same_tile = np.array([h in ha for h in hb], bool)
    overlap_row = (np.isin(pb_rows, shared_patients) | np.isin(store_b.obs["section"][rows_b], shared_image_sections)
                   | same_tile)
    return {"shared_patients": shared_patients, "shared_image_sections_of_B": shared_image_sections,
            "identical_tiles": int(same_tile.sum()), "overlapping_B_spots": int(overlap_row.sum()),
            "compared": "patient ids (HER2ST E-H mapped to STNet ids), source image sha256 from the manifests, "
                        "sha1 of every tile", "_rows": overlap_row}


# ------------------------------------------------------------------------------------------------ external


def _select_patients(store, wanted: str, what: str) -> np.ndarray:
    if not wanted:
        return np.arange(store.n_spots)
    names = [p for p in wanted.split(",") if p]
    unknown = [p for p in names if p not in store.patients]
    if unknown:
        raise ValueError(f"{what}={wanted!r}: patients {unknown} are not in {store.path} "
                         f"(patients: {store.patients})")
    return np.flatnonzero(np.isin(store.obs["patient"], names))


def train_head_on_all(config, workdir: str, feats: np.ndarray, expression: np.ndarray, encoder_variables: dict,
                      writer, tag: str):
    """One head trained on every row (fixed epochs, no held-out rows) through train.train_folds; returns
    (final TrainState, untrained predictions on the training rows, loss curve)."""
    from histospace_jax import train

    n, g = expression.shape
    plan = train.FoldPlan(patients=["(all)", "(none held out)"], spot_patient=np.zeros(n, np.int32), folds=[1])
    res = train.train_folds(config, workdir, columns={"features": feats, "expression": expression},
                            expression=expression, plan=plan,
                            encoder_variables=encoder_variables, fold_group=[0], tag=tag, writer=writer)
    state = _restore_head(config, workdir, tag, g, encoder_variables)
    return state, res["curve"]


def _head_template(config, n_genes: int, encoder_variables: dict):
    from histospace_jax import train

    model = train._head_model(config, n_genes)
    tx = steps.make_regression_optimizer(config.train.learning_rate, config.train.weight_decay)
    return model, steps.create_regression_state(model, jax.random.PRNGKey(config.seed * 1000 + 1),
                                                encoder_variables, tx, config.data.tile_size)


def _restore_head(config, workdir: str, tag: str, n_genes: int, encoder_variables: dict):
    """The final state train_folds checkpointed under checkpoints/loo_<tag> (one fold, stacked axis of 1)."""
    _, state = _head_template(config, n_genes, encoder_variables)
    stacked = jax.tree_util.tree_map(lambda x: np.asarray(x)[None], state)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints", f"loo_{tag}"))
    restored, _ = ckpt.restore(None, checkpointing.state_dict(stacked))
    ckpt.close()
    host = checkpointing.load_state_dict(stacked, restored)
    return jax.tree_util.tree_map(lambda x: x[0], host)


def predict_features(state, feats: np.ndarray, batch: int = 256) -> np.ndarray:
    fn = jax.jit(lambda s, f: steps.predict_step(s, {"features": f}))
    out = [np.asarray(fn(state, jnp.asarray(feats[a:a + batch]))) for a in range(0, len(feats), batch)]
    return np.concatenate(out, 0)


def export_model(workdir: str, config, state, genes: list[str], store, encoder_source: str) -> dict:
    """WORKDIR/model/: Orbax checkpoint of the whole HistoSpace model (encoder + head variables) and model.json
    (genes, architecture, tile size, microns per pixel, colour/stain preprocessing) for predict.py."""
    model_dir = os.path.join(workdir, "model")
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    variables = jax.tree_util.tree_map(np.asarray, variables)
    ckpt = checkpointing.Checkpointer(os.path.join(model_dir, "checkpoint"), max_to_keep=1)
    ckpt.save(0, variables, meta={"genes": len(genes)})
    ckpt.close()
    m = store.manifest
    info = {
        "format": "histospace-model", "version": 1, "genes": list(genes),
        "model": {"variant": config.model.variant, "encoder_features": list(config.model.encoder_features),
                  "head_conv_features": list(config.model.head_conv_features),
                  "head_fc_features": list(config.model.head_fc_features),
                  "dropout_rate": float(config.model.dropout_rate)},
        "tile_size": int(m.get("tile_size", config.data.tile_size)),
        "microns_per_pixel": m.get("microns_per_pixel"),
        "colour_cast": m.get("colour_cast"), "stain_normalisation": m.get("stain_normalisation"),
        "expression": m.get("expression"), "trained_on": {"store": store.path, "synthetic": store.synthetic},
        "encoder": encoder_source,
        "encoder_params": count_params(variables["params"]["encoder"]),
        "head_params": count_params(variables["params"]["head"]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    checkpointing.write_json_atomic(os.path.join(model_dir, "model.json"), info)
    info["checkpoint_bytes"] = dir_bytes(model_dir)
    return info


def run_external(config, workdir: str, store_a_path: str, ae_store: str | None, dataset: dict, writer) -> dict:
    """Train on store A (all, or config.external.train_patients), evaluate on store B (config.external.store,
    default A itself with config.external.test_patients) on the shared genes."""
    from histospace_jax import train

    e = config.external
    store_a = open_store(store_a_path)
    store_b = open_store(e.store or store_a_path)
    rows_a = _select_patients(store_a, e.train_patients, "external.train_patients")
    rows_b = _select_patients(store_b, e.test_patients, "external.test_patients")
    genes = [g for g in store_a.genes if g in set(store_b.genes)]
    if not genes:
        raise ValueError(f"{store_a.path} and {store_b.path} share no genes; prepare B with "
                         f"--genes_from={store_a.path}")
    warnings = []
    overlap = compare_stores(store_a, rows_a, store_b, rows_b)
    over_rows = overlap.pop("_rows")
    if overlap["overlapping_B_spots"]:
        msg = (f"WARNING: the test set overlaps the training set: {overlap['overlapping_B_spots']} of "
               f"{len(rows_b)} evaluation spots (shared patients {overlap['shared_patients']}, shared images "
               f"{overlap['shared_image_sections_of_B']}, identical tiles {overlap['identical_tiles']})")
        if e.exclude_overlap:
            msg += "; they are left out of the evaluation (external.exclude_overlap=True)"
            rows_b = rows_b[~over_rows]
        else:
            msg += "; they are KEPT (external.exclude_overlap=False): the result is not an external test"
        _log(msg)
        warnings.append(msg)
    if len(rows_b) < 3:
        raise ValueError(f"{store_b.path}: only {len(rows_b)} evaluation spots left after removing overlap")
    ga, gb = store_a.gene_index(genes), store_b.gene_index(genes)
    expr_a = np.asarray(store_a.expression, np.float32)[rows_a][:, ga]
    truth = np.asarray(store_b.expression, np.float32)[rows_b][:, gb]
    _log(f"[external] train {store_a.path} ({len(rows_a)} spots) -> test {store_b.path} ({len(rows_b)} spots), "
         f"{len(genes)} shared genes")

    ae = train.pretrain_autoencoder(config, workdir, ae_store or store_a_path, writer)

    def feats_of(store, variables):
        f, _ = features.cached_features(os.path.join(workdir, "cache"), store, variables,
                                        variant=config.model.variant,
                                        encoder_features=tuple(config.model.encoder_features),
                                        batch_size=config.eval_batch_size, log=_log)
        return f

    fdr = config.loo.fdr
    fa, fb = feats_of(store_a, ae["variables"])[rows_a], feats_of(store_b, ae["variables"])[rows_b]
    state, curve = train_head_on_all(config, workdir, fa, expr_a, ae["variables"], writer, "external")
    pred = predict_features(state, fb)
    _, init_state = _head_template(config, len(genes), ae["variables"])
    results = {"model": metrics.full_regression_metrics(truth, pred, fdr)}
    controls = {"mean_predictor": metrics.full_regression_metrics(
                    truth, metrics.mean_profile_prediction(expr_a, len(rows_b)), fdr),
                "untrained_head": metrics.full_regression_metrics(truth, predict_features(init_state, fb), fdr)}
    control_r = {}
    if train.random_encoder_control_on(config):
        rv = train.random_encoder_variables(config, config.loo.random_encoder_seed)
        ra, rb = feats_of(store_a, rv)[rows_a], feats_of(store_b, rv)[rows_b]
        rstate, _ = train_head_on_all(config, workdir, ra, expr_a, rv, writer, "external_random_encoder")
        rpred = predict_features(rstate, rb)
        controls["random_encoder"] = metrics.full_regression_metrics(truth, rpred, fdr)
        control_r["random_encoder"] = metrics.pearson_per_gene(truth, rpred)
    results["controls"] = controls
    gene_r = metrics.pearson_per_gene(truth, pred)

    # Spatial maps of the named genes (those present), else the best-predicted genes.
    named = [g for g in e.map_genes.split(",") if g]
    present = [g for g in named if g in genes]
    missing = [g for g in named if g not in genes]
    if missing:
        warnings.append(f"map genes {missing} are not among the {len(genes)} shared genes")
    if not present:
        order = np.argsort(-np.nan_to_num(gene_r, nan=-2))
        present = [genes[i] for i in order[:2]]
        warnings.append(f"no named map gene available; mapping the two best-predicted genes {present}")
    gi = [genes.index(g) for g in present]
    figures = {}
    if jax.process_index() == 0:
        fname = "figures/external_spatial_maps.png"
        plot_spatial_maps(os.path.join(workdir, fname), store_b.obs, rows_b, present, truth[:, gi], pred[:, gi],
                          title=f"Trained on {os.path.basename(store_a.path)} "
                                f"{e.train_patients or 'all patients'}; tested on "
                                f"{os.path.basename(store_b.path)} {e.test_patients or 'all patients'}")
        figures["spatial_maps"] = fname
        if curve:
            reporting.write_csv_atomic(os.path.join(workdir, "curves", "external.csv"), curve)
            ep = [r["epoch"] for r in curve]
            reporting.plot_curves(os.path.join(workdir, "figures", "external_curve.png"),
                                  {"train Huber": (ep, [r["train_huber"] for r in curve])},
                                  title="External: head training loss (all training spots)", xlabel="epoch",
                                  ylabel="Huber loss", logy=True)
            figures["curve"] = "figures/external_curve.png"
        rows_csv = [{"gene": g, "pearson_r": float(r), **{f"{k}_r": float(v[i]) for k, v in control_r.items()}}
                    for i, (g, r) in enumerate(zip(genes, gene_r))]
        reporting.write_csv_atomic(os.path.join(workdir, "per_gene.csv"), rows_csv)
        checkpointing.save_npz_atomic(os.path.join(workdir, "predictions.npz"), genes=np.array(genes),
                                      rows_B=rows_b, pred=pred, truth=truth)
    clustering = pathology_clustering(workdir, store_b.obs, rows_b, pred, truth=truth,
                                      cancer_labels=config.clustering.cancer_labels, seed=config.seed,
                                      prefix="external_clustering")
    model_info = export_model(workdir, config, state, genes, store_a,
                              ae["summary"].get("loaded_from") or os.path.join(workdir, "checkpoints", "ae"))
    return {
        "train": {"store": store_a.path, "patients": sorted(set(store_a.obs["patient"][rows_a].tolist())),
                  "n_spots": int(len(rows_a)), "synthetic": store_a.synthetic},
        "test": {"store": store_b.path, "patients": sorted(set(store_b.obs["patient"][rows_b].tolist())),
                 "n_spots": int(len(rows_b)), "synthetic": store_b.synthetic},
        "n_shared_genes": len(genes), "overlap": overlap, "warnings": warnings, **results,
        "top_genes": _top(genes, gene_r, True), "bottom_genes": _top(genes, gene_r, False),
        "map_genes": {g: float(gene_r[genes.index(g)]) for g in present},
        "clustering": clustering, "figures": figures, "model_export": model_info,
        "autoencoder": {k: v for k, v in ae["summary"].items() if k != "curve"},
    }


def _top(genes, r, best: bool, k: int = 10) -> list:
    r = np.asarray(r, np.float64)
    ok = np.flatnonzero(np.isfinite(r))
    order = ok[np.argsort(-r[ok] if best else r[ok], kind="stable")][:k]
    return [[genes[i], float(r[i])] for i in order]
