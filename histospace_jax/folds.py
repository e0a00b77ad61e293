"""Fold planning, inner validation splits and the training of every fold's heads in one program.

Members: each fold trains `train.ensemble` heads from different seeds; all members of all folds run in one
compiled program (vmap over stacked member states). Every member draws full batches from its own fold's
training rows (per-fold sampling): a held-out patient's spots are never in a training batch, and BatchNorm
statistics come from real rows only. Features (the frozen encoder's output, cached, with the 8 dihedral
views when augmenting) and expression live on the device and a batch is just row and view indices, gathered
there; or, when the features do not fit in memory (STNet scale with 8 views), the features stay in their on-disk
cache and the input pipeline reads each step's rows from it, a few steps ahead of the device (the same batches,
the same results).

With model.context=neighbours each row also carries its neighbourhood context (context.py; [E, V, N, C], always in
memory, gathered on the device beside the features).

Targets are standardised per gene on each fold's training rows when train.standardise_targets is on; the
heads predict standardised values and predictions are mapped back. With train.select_epoch on, each member
keeps the parameters of its best epoch on the fold's inner validation rows (from training patients only: a
section of a patient with several, else blocks of the spot grid), never on the held-out patient.
"""

from __future__ import annotations

import dataclasses
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np

from histospace_jax import (builders, checkpointing, console, controls, counting_base, evaluation, features, loop,
                            metrics, steps, xla_tuning)
from histospace_jax import context as context_lib
from histospace_jax.data import pipeline
from histospace_jax.errors import BadInputError

BLOCK_CELLS = 4  # inner-validation blocks: 4 x 4 spots of the array grid
# Inner validation by whole patients needs at least this many training patients (one or more held back, two
# or more left to learn from); with fewer it falls back to sections and grid blocks.
MIN_PATIENTS_TO_SPLIT = 3
_NO_SCORE = 1e30  # "not evaluated yet" (checkpoints refuse non-finite arrays)
# Live hidden units are counted on a fold's inner-validation spots, or on this many of its training spots
# (evenly spread) when it has none.
LIVE_UNIT_ROWS = 256
# At or below this share of live hidden units a fold's heads have all but collapsed (console warning): their
# predictions vary along a handful of directions at most, and along none once every unit is dead.
LOW_LIVE_UNITS = 0.02


@dataclasses.dataclass
class FoldPlan:
    patients: list[str]          # all patients in the store
    spot_patient: np.ndarray     # [N] index into patients
    folds: list[int]             # patient indices held out, one per fold

    def held_out_rows(self, fold: int) -> np.ndarray:
        return np.flatnonzero(self.spot_patient == self.folds[fold])

    def training_rows(self, fold: int) -> np.ndarray:
        return np.flatnonzero(self.spot_patient != self.folds[fold])

    def name(self, fold: int) -> str:
        return self.patients[self.folds[fold]]


@dataclasses.dataclass
class InnerValidationPlan(FoldPlan):
    """Folds scored on their inner-validation spots (training patients only), trained on the rest of their
    training rows: loo.evaluate_on=inner_validation. The held-out patient's rows are in neither."""
    held: list = dataclasses.field(default_factory=list)    # per fold: its inner-validation rows
    train: list = dataclasses.field(default_factory=list)   # per fold: the rest of its training rows

    def held_out_rows(self, fold: int) -> np.ndarray:
        return self.held[fold]

    def training_rows(self, fold: int) -> np.ndarray:
        return self.train[fold]

    def name(self, fold: int) -> str:
        return f"{self.patients[self.folds[fold]]} inner"


def inner_validation_plan(config, obs: dict, plan: FoldPlan) -> InnerValidationPlan:
    """`plan`'s folds, each scored on its inner split's validation spots instead of its held-out patient."""
    splits = [inner_split(obs, plan.training_rows(f), config.train.inner_val_fraction, config.seed,
                          config.train.inner_split)
              for f in range(len(plan.folds))]
    return InnerValidationPlan(plan.patients, plan.spot_patient, plan.folds, held=[v for _, v, _ in splits],
                               train=[t for t, _, _ in splits])


def sections_as_patients(store):
    """(`store` with each spot's section as its patient, {section: its real patient}): leave-one-section-out
    (loo.hold_out=section) is leave-one-patient-out on these units, so the folds, the autoencoders (training
    sections' tiles only), the inner split (whole sections, as the outer protocol holds them out) and every
    control follow from the one plan. A section name shared by two patients would merge their spots: refused."""
    sections = np.asarray(store.obs["section"]).astype(str)
    patients = np.asarray(store.obs["patient"]).astype(str)
    owner: dict[str, str] = {}
    for s, p in zip(sections.tolist(), patients.tolist()):
        if owner.setdefault(s, p) != p:
            raise BadInputError(f"{store.path}: section {s!r} belongs to patients {owner[s]!r} and {p!r}; "
                                "loo.hold_out=section needs section names unique across patients (prepare the "
                                "store again with distinct --section_name, or use loo.hold_out=patient)")
    obs = dict(store.obs)
    obs["patient"] = sections
    return dataclasses.replace(store, obs=obs), owner


def plan_leave_one_patient_out(store, only: str = "", unit: str = "patients") -> FoldPlan:
    """The folds of `store`, one per patient in `only` (comma-separated; "" = all); `unit` names what the store's
    patients are in messages ("sections" under loo.hold_out=section, sections_as_patients)."""
    patients, pidx = pipeline.patient_indices(store)
    if len(patients) < 2:
        raise BadInputError(f"{store.path}: leave-one-patient-out needs >= 2 patients, found {patients}; use a store "
                            "with several patients, or --config=configs/train.py to train on all of them")
    wanted = [p for p in only.split(",") if p] if only else patients
    unknown = [p for p in wanted if p not in patients]
    if unknown:
        raise BadInputError(f"loo.patients names {unknown}, not in {store.path} ({unit}: {patients}); give a "
                            f"comma-separated subset of those {unit}, or leave it empty for all")
    return FoldPlan(patients, pidx, [patients.index(p) for p in wanted])


def inner_split(obs: dict, rows: np.ndarray, fraction: float, seed: int, by: str = "patients"
                ) -> tuple[np.ndarray, np.ndarray, str]:
    """(inner-train rows, inner-validation rows, how) of a fold's training rows.

    With `by`="patients" and at least MIN_PATIENTS_TO_SPLIT training patients, units are whole patients (at
    least two always stay in training): the inner split then asks what the held-out patient's fold asks, how
    the heads do on a patient they never saw, so the epochs and settings it chooses are the ones that transfer
    between patients, not between sections of the same patient. Otherwise ("sections", or too few patients)
    units are whole sections of patients with several sections (a patient's last remaining section always stays
    in training) and grid blocks of single-section patients. Units are drawn at random until at least
    `fraction` of the rows are in validation. Spatial units, not random spots: neighbouring spots are
    correlated, so random spots would make validation look better than a new patient will."""
    patients, sections = obs["patient"][rows], obs["section"][rows]
    names = list(dict.fromkeys(patients.tolist()))
    units: list[np.ndarray] = []
    kinds = set()
    by_patient = by == "patients" and len(names) >= MIN_PATIENTS_TO_SPLIT
    if by_patient:
        units = [np.flatnonzero(patients == p) for p in names]
        kinds.add("patients")
    else:
        blocks = controls.grid_blocks(obs["array_x"][rows], obs["array_y"][rows], sections, BLOCK_CELLS)
        for p in names:
            mine = patients == p
            secs = list(dict.fromkeys(sections[mine].tolist()))
            if len(secs) > 1:
                units += [np.flatnonzero(mine & (sections == s)) for s in secs[1:]]
                kinds.add("sections")
            else:
                units += [np.flatnonzero(mine & (blocks == b)) for b in np.unique(blocks[mine])]
                kinds.add("blocks")
    order = np.random.default_rng([seed, 7]).permutation(len(units))
    val, n_val = [], 0
    for u in order:
        if n_val >= fraction * len(rows) or (by_patient and len(val) >= len(units) - 2):
            break
        val.append(units[u])
        n_val += len(units[u])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    keep = np.ones(len(rows), bool)
    keep[val_idx] = False
    how = f"{n_val} of {len(rows)} training spots by " + (" and ".join(sorted(kinds)) or "none")
    return rows[keep], rows[val_idx], how


def training_split(config, obs: dict, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """(rows the heads learn from, inner-validation rows, how) of a fold's training rows: the inner split when
    train.select_epoch is on, else every training row and no validation."""
    if config.train.select_epoch == "on":
        return inner_split(obs, rows, config.train.inner_val_fraction, config.seed, config.train.inner_split)
    return rows, rows[:0], "none (train.select_epoch=off: final epoch, all training spots)"


@dataclasses.dataclass
class HeadData:
    """What the heads of a group of folds learn from."""

    names: list[str]                  # per fold
    train_rows: list[np.ndarray]      # per fold: rows the heads learn from (inner-train)
    val_rows: list[np.ndarray]        # per fold: inner-validation rows (training patients; may be empty)
    encoder_of_fold: list[int]        # per fold: index into `features`
    # [E, V, N, h, w, C] in memory (E encoders, V views: 1, or 8 dihedral), or one features.FeatureStream per
    # encoder (streamed from the on-disk cache)
    features: "np.ndarray | list"
    expression: np.ndarray            # [N, G]
    encoder_variables: list[dict]     # per encoder: {'params', 'batch_stats'} (kept in the states for export)
    context: np.ndarray | None = None  # [E, V, N, C] neighbourhood context (model.context=neighbours), in memory
    # The data's identity, recorded in the heads' checkpoints: the store's fingerprint, with a digest of its
    # rows where `expression` holds a subset of them ("" records none).
    source: str = ""

    def encoder_digests(self) -> list[str]:
        return [checkpointing.tree_digest(v) for v in self.encoder_variables]


def standardisation(expression: np.ndarray, rows: np.ndarray, on: bool | str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) per gene on `rows`: (mean, sd) when on; (mean, 1) for "centre", where the loss on
    the log values weighs each gene by its variance, as raw targets do, while the output still starts at
    the mean; (0, 1) when off. A gene constant on the rows gets sd 1 (predicted at its mean), never a
    division by zero."""
    g = expression.shape[1]
    if on in (False, "off"):
        return np.zeros(g, np.float32), np.ones(g, np.float32)
    mean, sd = metrics.gene_mean_and_sd(expression[rows])
    if on == "centre":
        sd = np.ones(g)
    return mean.astype(np.float32), sd.astype(np.float32)


class MemberBatches:
    """Random access by step to every member's batch: rows of its own fold's training set, reshuffled every
    pass, and a dihedral view per row. Stateless (a function of seed, member and step), so the Grain iterator
    over it resumes exactly from its saved position."""

    def __init__(self, rows_per_member: list[np.ndarray], batch_size: int, n_steps: int, n_views: int, seed: int):
        self.rows = rows_per_member
        self.batch, self.n_steps, self.n_views, self.seed = batch_size, n_steps, n_views, seed

    def __len__(self) -> int:
        return self.n_steps

    def _member(self, m: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.rows[m]
        n = len(rows)
        pos = np.arange(step * self.batch, (step + 1) * self.batch)
        passes, at = pos // n, pos % n
        idx = np.empty(self.batch, np.int32)
        view = np.zeros(self.batch, np.int32)
        for p in np.unique(passes):
            rng = np.random.default_rng([self.seed, m, int(p)])
            perm = rng.permutation(n)
            views = rng.integers(0, self.n_views, n) if self.n_views > 1 else np.zeros(n, np.int64)
            sel = passes == p
            idx[sel] = rows[perm[at[sel]]]
            view[sel] = views[at[sel]]
        return idx, view

    def __getitem__(self, step: int) -> dict:
        pairs = [self._member(m, int(step)) for m in range(len(self.rows))]
        return {"index": np.stack([p[0] for p in pairs]), "view": np.stack([p[1] for p in pairs])}


def member_features(streams: list, encoder_of_member, views: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[M, B, h, w, C]: each member's features of its (view, row) pairs ([M, B] each), read from its encoder's
    on-disk cache."""
    return np.stack([streams[e].rows(v, i) for e, v, i in zip(encoder_of_member, views, rows)])


class StreamedFeatures:
    """Adds each member's features for its batch rows, read from the encoders' on-disk caches, to a MemberBatches
    batch (a Grain map: runs in the pipeline's reader threads, ahead of the device)."""

    def __init__(self, streams: list, encoder_of_member: np.ndarray):
        self.streams, self.encoder_of_member = streams, np.asarray(encoder_of_member)

    def __call__(self, batch: dict) -> dict:
        feats = member_features(self.streams, self.encoder_of_member, batch["view"], batch["index"])
        return {**batch, "features": feats}


def _split_devices(x: np.ndarray, by_process: bool = True) -> np.ndarray:
    """[M, B, ...] global batch -> [D, M, B / (P * D), ...]: this process's slice of every member's batch (P
    processes),
    each local device taking its share. Every process draws the same global batch (MemberBatches is a function
    of the step), so P processes train on exactly the batches one process would. Predictions (by_process=False)
    run every row on every process."""
    p, n_proc = (jax.process_index(), jax.process_count()) if by_process else (0, 1)
    if x.shape[1] % n_proc:
        raise ValueError(f"a batch of {x.shape[1]} rows does not split over {n_proc} processes")
    per = x.shape[1] // n_proc
    x = x[:, p * per:(p + 1) * per]
    d = jax.local_device_count()
    m, b = x.shape[:2]
    if b % d:
        raise ValueError(f"a batch of {b} rows does not split over {d} devices; choose a batch size divisible by "
                         "the device count")
    return np.moveaxis(x.reshape((m, d, b // d) + x.shape[2:]), 1, 0)


def make_member_train_step(huber_delta: float, compiler_options: dict | None = None):
    """`ctx`: the neighbourhood context [E, V, N, C], or None for heads without it."""
    def step(states, feats, ctx, expr, mu, sd, enc_of, fold_of, idx, view):
        def one(state, e, f, i, v):
            batch = {"features": feats[e, v, i], "expression": (expr[i] - mu[f]) / sd[f]}
            if ctx is not None:
                batch["context"] = ctx[e, v, i]
            return steps.regression_train_step(state, batch, huber_delta=huber_delta, axis_name=builders.AXIS)

        return jax.vmap(one)(states, enc_of, fold_of, idx, view)

    return steps.with_compiler_options(jax.pmap(step, axis_name=builders.AXIS, donate_argnums=(0,)),
                                       compiler_options)


def make_member_train_step_on_features(huber_delta: float, compiler_options: dict | None = None):
    """The train step of streamed features: each member's batch arrives with its features [B, h, w, C]; the
    neighbourhood context (small) stays on the device, [E, V, N, C] or None."""
    def step(states, feats, ctx, expr, mu, sd, enc_of, fold_of, idx, view):
        def one(state, x, e, f, i, v):
            batch = {"features": x, "expression": (expr[i] - mu[f]) / sd[f]}
            if ctx is not None:
                batch["context"] = ctx[e, v, i]
            return steps.regression_train_step(state, batch, huber_delta=huber_delta, axis_name=builders.AXIS)

        return jax.vmap(one)(states, feats, enc_of, fold_of, idx, view)

    return steps.with_compiler_options(jax.pmap(step, axis_name=builders.AXIS, donate_argnums=(0,)),
                                       compiler_options)


def make_member_predict_on_features(compiler_options: dict | None = None, with_hidden: bool = False):
    """`ctx`: each member's context rows [M, B, C], or None. With `with_hidden`, each member's
    (prediction, last hidden FC layer before its ReLU) (steps.predict_with_hidden_step)."""
    step_fn = steps.predict_with_hidden_step if with_hidden else steps.predict_step

    def predict(states, feats, ctx):
        def one(state, x, c):
            return step_fn(state, {"features": x} if c is None else {"features": x, "context": c})

        return jax.vmap(one)(states, feats, ctx)

    return steps.with_compiler_options(jax.pmap(predict, axis_name=builders.AXIS), compiler_options)


def make_member_predict(n_views: int, compiler_options: dict | None = None, with_hidden: bool = False):
    """Each member's prediction on its rows, averaged over the first `n_views` dihedral views inside one program
    (one transfer per chunk). With `with_hidden`, (prediction, the last hidden FC layer before its ReLU on view
    0)."""
    def predict(states, feats, ctx, enc_of, idx):
        def one(state, e, i):
            def view_batch(v):
                if ctx is None:
                    return {"features": feats[e, v, i]}
                return {"features": feats[e, v, i], "context": ctx[e, v, i]}

            def add_view(v, total):
                return total + steps.predict_step(state, view_batch(v))

            if with_hidden:
                first, hidden = steps.predict_with_hidden_step(state, view_batch(0))
                return jax.lax.fori_loop(1, n_views, add_view, first) / n_views, hidden
            first = steps.predict_step(state, view_batch(0))
            return jax.lax.fori_loop(1, n_views, add_view, first) / n_views

        return jax.vmap(one)(states, enc_of, idx)

    return steps.with_compiler_options(jax.pmap(predict, axis_name=builders.AXIS), compiler_options)


class MemberProgram:
    """The device-side data and compiled steps shared by training, validation and prediction."""

    def __init__(self, config, data: HeadData, n_members_per_fold: int):
        self.k = n_members_per_fold
        n_folds = len(data.names)
        self.fold_of = np.repeat(np.arange(n_folds, dtype=np.int32), self.k)
        self.enc_of = np.asarray(data.encoder_of_fold, np.int32)[self.fold_of]
        stats = [standardisation(data.expression, r, config.train.standardise_targets) for r in data.train_rows]
        self.mu = np.stack([s[0] for s in stats])
        self.sd = np.stack([s[1] for s in stats])
        # Inner validation scores every recipe in the same units, each gene's SD on the fold's training rows,
        # so recipes that scale their targets differently are compared on one scale.
        self.score_sd = np.stack([standardisation(data.expression, r, "on")[1] for r in data.train_rows])
        self.streamed = not isinstance(data.features, np.ndarray)
        # Every program of the heads is compiled with these options, and the heads' convolutions take the
        # formulation that is fast under them (xla_tuning.conv_impl_for: the states must be built with it).
        self.compiler_options = xla_tuning.conv_step_options()
        self.conv_impl = xla_tuning.conv_impl_for(self.compiler_options)
        self.expr = _replicated(data.expression)
        self.mu_r, self.sd_r = _replicated(self.mu), _replicated(self.sd)
        self.enc_r, self.fold_r = _replicated(self.enc_of), _replicated(self.fold_of)
        self.context = data.context
        self.ctx_r = None if data.context is None else _replicated(data.context)
        if self.streamed:
            self.streams = list(data.features)
            self.n_views = self.streams[0].shape[0]
            self.feats = None
            self.train_step = make_member_train_step_on_features(builders.huber_delta(config), self.compiler_options)
        else:
            self.n_views = data.features.shape[1]
            self.feats = _replicated(data.features)
            self.train_step = make_member_train_step(builders.huber_delta(config), self.compiler_options)
        self.chunk = max(jax.local_device_count(), config.eval_batch_size // jax.local_device_count()
                         * jax.local_device_count())
        self._predict_programs = {}  # (views, with hidden layer) -> compiled prediction program, built on first use

    def step(self, rstates, batch):
        index, view = _split_devices(batch["index"]), _split_devices(batch["view"])
        if self.streamed:
            return self.train_step(rstates, _split_devices(batch["features"]), self.ctx_r, self.expr, self.mu_r,
                                   self.sd_r, self.enc_r, self.fold_r, index, view)
        return self.train_step(rstates, self.feats, self.ctx_r, self.expr, self.mu_r, self.sd_r, self.enc_r,
                               self.fold_r, index, view)

    def _predict_program(self, n_views: int, hidden: bool):
        """The prediction program over n_views views (in memory; streamed features come one view per call)."""
        key = (n_views, hidden)
        if key not in self._predict_programs:
            self._predict_programs[key] = (
                make_member_predict_on_features(self.compiler_options, hidden) if self.streamed
                else make_member_predict(n_views, self.compiler_options, hidden))
        return self._predict_programs[key]

    def _predict_chunk(self, rstates, idx: np.ndarray, n_views: int, hidden: bool = False):
        """[M, chunk, G]: each member's prediction on its chunk of rows, mean over the first n_views views; with
        `hidden`, also [M, chunk, U]: its last hidden FC layer before the ReLU on view 0."""
        def members_first(a):
            a = np.asarray(a)
            return a.transpose(1, 0, 2, 3).reshape(idx.shape[0], idx.shape[1], -1)

        if not self.streamed:
            part = _split_devices(idx, by_process=False)
            out = self._predict_program(n_views, hidden)(rstates, self.feats, self.ctx_r, self.enc_r, part)
            return (members_first(out[0]), members_first(out[1])) if hidden else members_first(out)
        acc, first_hidden = 0.0, None
        for v in range(n_views):
            feats = member_features(self.streams, self.enc_of, np.full(idx.shape, v), idx)
            ctx = None if self.context is None else np.stack(
                [self.context[e, v, i] for e, i in zip(self.enc_of, idx)])
            args = (rstates, _split_devices(feats, by_process=False),
                    None if ctx is None else _split_devices(ctx, by_process=False))
            out = self._predict_program(1, hidden and v == 0)(*args)
            if hidden and v == 0:
                out, first_hidden = out
            acc = acc + np.asarray(out)
        acc = members_first(acc / n_views)
        return (acc, members_first(first_hidden)) if hidden else acc

    def predict_standardised(self, rstates, rows_per_member: list[np.ndarray], views: int | None = None,
                             hidden: bool = False):
        """Each member's predictions (standardised units, mean over the first `views` dihedral views, default
        all) on its rows; with `hidden`, (those, each member's last hidden FC layer before the ReLU on its rows,
        view 0)."""
        n_views = self.n_views if views is None else views
        length = max([len(r) for r in rows_per_member] + [1])
        length = -(-length // self.chunk) * self.chunk
        idx = np.zeros((len(rows_per_member), length), np.int32)
        for m, r in enumerate(rows_per_member):
            idx[m, :len(r)] = r
        parts = [self._predict_chunk(rstates, idx[:, a:a + self.chunk], n_views, hidden)
                 for a in range(0, length, self.chunk)]
        if hidden:
            out, act = (np.concatenate([p[i] for p in parts], 1) for i in (0, 1))
            return ([out[m, :len(r)] for m, r in enumerate(rows_per_member)],
                    [act[m, :len(r)] for m, r in enumerate(rows_per_member)])
        out = np.concatenate(parts, 1)
        return [out[m, :len(r)] for m, r in enumerate(rows_per_member)]

    def live_units(self, rstates, rows_per_member: list[np.ndarray]) -> np.ndarray:
        """Per member, the share of its last hidden FC layer's units that are live: above zero before the ReLU
        on at least one of its rows (view 0). NaN for a member without rows."""
        _, act = self.predict_standardised(rstates, rows_per_member, views=1, hidden=True)
        return live_share(act)

    def to_expression(self, member: int, z: np.ndarray) -> np.ndarray:
        f = self.fold_of[member]
        return self.mu[f] + self.sd[f] * z


def live_share(hidden_per_member: list[np.ndarray]) -> np.ndarray:
    """Per member, from its hidden layer before the ReLU on its rows [n, U]: the share of units above zero on at
    least one row (NaN without rows)."""
    return np.array([float(np.mean(np.any(a > 0, axis=0))) if len(a) else np.nan for a in hidden_per_member])


def live_unit_rows(data: HeadData, fold: int) -> np.ndarray:
    """The rows a fold's live hidden units are counted on: its inner-validation rows, else LIVE_UNIT_ROWS of its
    training rows, evenly spread."""
    if len(data.val_rows[fold]):
        return data.val_rows[fold]
    rows = data.train_rows[fold]
    return rows[np.unique(np.linspace(0, len(rows) - 1, min(len(rows), LIVE_UNIT_ROWS)).astype(int))]


class _EpochEnd(loop.Hook):
    """Per epoch: each fold's training loss (mean over its members), inner-validation MSE and share of live
    hidden units (MemberProgram.live_units: a head whose units die predicts one profile for every spot); with
    select_epoch, every member keeps the state of its best validation epoch."""

    def __init__(self, program: MemberProgram, data: HeadData, select: bool, writer,
                 keep_epoch: np.ndarray | None = None):
        self.program, self.data, self.select, self.writer = program, data, select, writer
        self.val_rows = [data.val_rows[f] for f in program.fold_of]
        self.probe_rows = [live_unit_rows(data, f) for f in program.fold_of]
        self.keep_epoch = keep_epoch  # per member: the epoch whose state it keeps (a refit), instead of the best
        self.warned: set[str] = set()

    def on_epoch_end(self, lp, epoch, step, mean_loss):
        rows, p = [], self.program
        val = np.full(len(p.fold_of), np.nan)
        # The untransformed view only: choosing an epoch does not need the 8-view average, at 1/8 the cost.
        z, act = p.predict_standardised(lp.rstate["train"], self.probe_rows, views=1, hidden=True)
        live = live_share(act)
        n_units = act[0].shape[-1]
        for m, r in enumerate(self.val_rows):
            if len(r):
                f = p.fold_of[m]
                error = (p.to_expression(m, z[m]) - self.data.expression[r]) / p.score_sd[f]
                val[m] = float(np.mean(error ** 2))
        # Members whose state at this epoch is the one they keep: a refit's chosen epoch, or a better score.
        take = None
        if self.keep_epoch is not None:
            take = self.keep_epoch == epoch
        elif self.select and np.isfinite(val).any():
            score = np.where(np.isfinite(val), val, _NO_SCORE)
            best = np.asarray(lp.rstate["best_score"][0])
            take = score < best
            lp.rstate = {**lp.rstate, "best_score": _replicated(np.where(take, score, best))}
        if take is not None and take.any():
            lp.rstate = {**lp.rstate, "best": _where_member(take, lp.rstate["train"], lp.rstate["best"]),
                         "best_epoch": _replicated(np.where(take, epoch, np.asarray(lp.rstate["best_epoch"][0])))}
        for f, name in enumerate(self.data.names):
            mine = p.fold_of == f
            row = {"epoch": epoch, "fold": name, "train_huber": float(np.mean(mean_loss[mine])),
                   "val_mse": float(np.nanmean(val[mine])) if np.isfinite(val[mine]).any() else float("nan"),
                   "live_units": float(np.mean(live[mine]))}
            rows.append(row)
            self.writer.write("head_epoch", step, loop=lp.spec.name, **row)
            if row["live_units"] <= LOW_LIVE_UNITS and name not in self.warned:
                self.warned.add(name)
                console.log(f"[{lp.spec.name}] WARNING holding out {name}: at epoch {epoch} only "
                            f"{row['live_units']:.1%} of the heads' {n_units} last hidden units are active on any of "
                            f"{len(self.probe_rows[np.flatnonzero(mine)[0]])} probe spots: the heads are collapsing "
                            "towards one profile for every spot. A unit that dies does not come back (its ReLU "
                            "passes no gradient); a lower --config.train.learning_rate keeps more of them alive")
        console.log(f"[{lp.spec.name}] epoch {epoch}: " + "; ".join(
            f"{r['fold']} huber {r['train_huber']:.4f}"
            + (f" val {r['val_mse']:.4f}" if np.isfinite(r["val_mse"]) else "") + f" live {r['live_units']:.0%}"
            for r in rows))
        return rows


_IDENTITY = jax.pmap(lambda x: x)


def _replicated(x):
    """A copy of `x` on every local device, kept there: later pmapped calls take it without a transfer."""
    x = np.asarray(x)
    return _IDENTITY(np.broadcast_to(x, (jax.local_device_count(),) + x.shape))


def _where_member(better: np.ndarray, new, old):
    """Per member (axis 1 of replicated stacked trees): new where `better`, else old."""
    b = jnp.asarray(better)

    def pick(n, o):
        shape = (1, len(better)) + (1,) * (n.ndim - 2)
        return jnp.where(b.reshape(shape), n, o)

    return jax.tree_util.tree_map(pick, new, old)


# Memory a member takes while its program trains, in multiples of its train state's size: the state itself on
# the host and on the device (host memory on a CPU backend), its best-epoch copy, and the step's transients
# (gradients, Adam's new moments, the im2col of the head conv's kernel gradient), which come and go every step.
# Measured at STNet scale (benchmarks/stnet_scale.py, 60 heads of 28 MB in one program): RSS swung between ~6 and
# 17 GiB within every step, ~0.26 GiB per head, ~9.5x its state.
_MEMORY_PER_STATE = 10


def member_state_bytes(config, n_genes: int, encoder_variables: dict) -> int:
    """Bytes of one head's train state (parameters, BatchNorm statistics, optimizer moments), from shapes only."""
    shapes = jax.eval_shape(lambda: builders.head_states(config, n_genes, [encoder_variables], [1])[0])
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(shapes)))


def head_state_budget() -> int:
    """Bytes the heads of one program may take while training: half of this machine's memory."""
    return features.machine_memory_bytes() // 2


def auto_folds_per_program(config, n_folds: int, n_genes: int, encoder_variables: dict, log=None,
                           budget: int | None = None) -> int:
    """loo.folds_per_program=0: all folds in one program when their heads' training memory (_MEMORY_PER_STATE x
    their states) fits `head_state_budget()`, else the fewest equal groups that fit (each group is one program,
    trained after the other)."""
    per_member = member_state_bytes(config, n_genes, encoder_variables) * _MEMORY_PER_STATE
    per_fold = per_member * max(1, int(config.train.ensemble))
    budget = head_state_budget() if budget is None else budget
    fit = max(1, budget // per_fold)
    if fit >= n_folds:
        return n_folds
    groups = -(-n_folds // fit)
    per_program = -(-n_folds // groups)
    if log:
        log(f"[loo] {n_folds} folds x {int(config.train.ensemble)} heads need ~{n_folds * per_fold / 2**30:.1f} GiB "
            f"to train together (~{_MEMORY_PER_STATE}x their states), over the {budget / 2**30:.1f} GiB budget "
            "(half of memory): "
            f"{groups} programs of up to {per_program} folds, one after another "
            "(--config.loo.folds_per_program=N sets it)")
    return per_program


def _stacked_head_states(config, n_genes: int, encoder_variables: list[dict], seed_offsets,
                         conv_impl: str = "fast") -> dict:
    """The members' initial states stacked on a leading axis, as host arrays, built one member at a time into
    preallocated arrays: never a list of every member's state beside the stack (at STNet scale, 115 heads of
    ~30 MB each, that list alone was 3.4 GB)."""
    stacked, tree = [], None
    for m, (enc, seed) in enumerate(zip(encoder_variables, seed_offsets)):
        leaves, tree = jax.tree_util.tree_flatten(builders.head_states(config, n_genes, [enc], [seed],
                                                                       conv_impl=conv_impl)[0])
        if m == 0:
            stacked = [np.empty((len(seed_offsets),) + np.shape(x), np.asarray(x).dtype) for x in leaves]
        for out, x in zip(stacked, leaves):
            out[m] = np.asarray(x)
    return jax.tree_util.tree_unflatten(tree, stacked)


def train_heads(config, workdir: str, data: HeadData, *, tag: str, writer) -> dict:
    """Trains train.ensemble heads per fold of `data` in one program, resuming from WORKDIR/checkpoints/<tag>;
    with train.refit on (and inner validation), trains them again on every training row of their fold up to
    the epoch each chose (WORKDIR/checkpoints/<tag>_refit), and those are the heads it returns.

    Returns {'predict': fn(rows per fold) -> expression predictions per fold [len(rows), G] (mean over the
    fold's heads and the views), 'untrained': the same for the heads at initialisation, 'curve', 'best_epoch'
    per fold, 'live_units' per fold (the returned heads' share of live hidden units, MemberProgram.live_units,
    mean over the fold's heads), 'states': the final member states (host, stacked), 'initial_states': the
    same at initialisation, 'program', 'refit': whether the returned heads were refitted, 'selected_predict':
    'predict' of the heads before any refit (what inner validation can score)}."""
    first = _train_members(config, workdir, data, tag=tag, writer=writer)
    if not (first["select"] and config.train.refit == "on"):
        return {**first, "refit": False, "selected_predict": first["predict"]}
    every = dataclasses.replace(data, train_rows=[np.union1d(t, v) for t, v in zip(data.train_rows, data.val_rows)],
                                val_rows=[r[:0] for r in data.val_rows])
    keep = np.concatenate([first["best_epoch"][n] for n in data.names])
    console.log(f"[{tag.replace('_', ' ', 1)}] refit: the same heads again on every training row of their fold, "
                "each kept at the epoch it chose on inner validation")
    refit = _train_members(config, workdir, every, tag=f"{tag}_refit", writer=writer, keep_epoch=keep,
                           epochs=int(keep.max()))
    return {**refit, "curve": first["curve"] + [{**r, "fold": f"{r['fold']} (refit)"} for r in refit["curve"]],
            "best_epoch": first["best_epoch"], "refit": True, "selected_predict": first["predict"]}


def _train_members(config, workdir: str, data: HeadData, *, tag: str, writer, keep_epoch: np.ndarray | None = None,
                   epochs: int | None = None) -> dict:
    """train_heads' one pass: with `keep_epoch` (per member), each member keeps its state at that epoch of
    `epochs` rather than its best on inner validation."""
    c = config.train
    k = int(c.ensemble)
    n_folds = len(data.names)
    g = data.expression.shape[1]
    for f, rows in enumerate(data.train_rows):
        if len(rows) < c.batch_size:
            raise BadInputError(
                f"fold holding out {data.names[f]}: only {len(rows)} training spots after the inner-validation "
                f"split ({len(data.val_rows[f])} spots), fewer than train.batch_size={c.batch_size}; lower "
                "--config.train.batch_size, add patients, or turn inner validation off "
                "(--config.train.select_epoch=off)")
    if g < 1:
        raise BadInputError(f"no genes to train on ({data.names})")
    if builders.uses_context(config) != (data.context is not None):
        raise ValueError(f"model.context={config.model.context} but the head data "
                         f"{'has no' if data.context is None else 'has a'} neighbourhood context")
    program = MemberProgram(config, data, k)
    members = len(program.fold_of)
    stacked = _stacked_head_states(config, g, [data.encoder_variables[data.encoder_of_fold[f]] for f in program.fold_of],
                                   [int(f) * 1000 + m % k + 1 for m, f in enumerate(program.fold_of)],
                                   conv_impl=program.conv_impl)
    rows_per_member = [data.train_rows[f] for f in program.fold_of]
    mean_rows = float(np.mean([len(r) for r in data.train_rows]))
    steps_per_epoch = max(1, int(mean_rows // c.batch_size))
    total = (c.epochs if epochs is None else epochs) * steps_per_epoch
    sampler = MemberBatches(rows_per_member, c.batch_size, total, program.n_views,
                            builders.head_seed(config) + 1)
    dataset = grain.MapDataset.source(sampler)
    if program.streamed:
        # Disk reads of a step's features run in Grain's reader threads, a few steps ahead of the device.
        dataset = dataset.map(StreamedFeatures(program.streams, program.enc_of))
    iterator = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=2 if program.streamed else 1,
                                                              prefetch_buffer_size=4)))
    select = c.select_epoch == "on" and any(len(r) for r in data.val_rows)
    keeps = keep_epoch is not None
    compat = checkpointing.compat_signature(
        config, checkpointing.HEAD_KEYS, n_rows=int(len(data.expression)), n_genes=int(g), folds=data.names,
        train_rows=[int(len(r)) for r in data.train_rows], encoders=data.encoder_digests(),
        views=int(program.n_views),
        **({"store": data.source,
            "rows_digest": [checkpointing.rows_digest(t, v) for t, v in zip(data.train_rows, data.val_rows)]}
           if data.source else {}))
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints", tag), config.checkpoint.max_to_keep,
                                      async_save=config.checkpoint.async_save)
    state = {"train": stacked, "best": stacked, "best_score": np.full(members, _NO_SCORE, np.float32),
             "best_epoch": np.zeros(members, np.int32)}

    def step_fn(rstate, batch):
        new, step_metrics = program.step(rstate["train"], batch)
        return {**rstate, "train": new}, step_metrics

    name = tag.replace("_", " ", 1)  # "loo_main_0" -> "loo main_0"
    spec = loop.LoopSpec(name=name, total_steps=total, steps_per_epoch=steps_per_epoch,
                         items_per_step=c.batch_size * members, log_every=config.log_every_steps,
                         checkpoint_every=config.checkpoint.every_steps, loss_name="huber",
                         data_source="the training store (row = store row; features from the cache)",
                         labels=[f"{data.names[f]}#{s}" for f in range(n_folds) for s in range(k)],
                         fix_hint=f"train.learning_rate={builders.learning_rate(config)}")
    final, curve = loop.run(state, step_fn, iterator, spec=spec, checkpointer=ckpt, compat=compat, writer=writer,
                            hooks=[_EpochEnd(program, data, select, writer, keep_epoch)])
    chosen = final["best"] if select or keeps else final["train"]
    chosen_r = steps.replicate(chosen)
    init_r = steps.replicate(stacked)
    best_epoch = np.asarray(final["best_epoch"]) if select or keeps else np.full(members, c.epochs)
    if select:
        console.log(f"[{name}] best epoch on inner validation per head: "
                    + ", ".join(f"{spec.labels[m]}={int(best_epoch[m])}" for m in range(members)))

    def predictor(rstates):
        def predict(rows_per_fold: list[np.ndarray]) -> list[np.ndarray]:
            """Expression predictions of each fold's heads (mean over its members and the views) on its rows,
            every member in one pass."""
            z = program.predict_standardised(rstates, [rows_per_fold[f] for f in program.fold_of])
            return [np.mean([program.to_expression(m, z[m]) for m in np.flatnonzero(program.fold_of == f)],
                            0).astype(np.float32) for f in range(n_folds)]
        return predict

    live = program.live_units(chosen_r, [live_unit_rows(data, f) for f in program.fold_of])
    return {"predict": predictor(chosen_r), "untrained": predictor(init_r), "curve": curve,
            "live_units": {data.names[f]: float(np.mean(live[program.fold_of == f])) for f in range(n_folds)},
            "best_epoch": {data.names[f]: [int(x) for x in best_epoch[program.fold_of == f]] for f in range(n_folds)},
            "states": jax.tree_util.tree_map(np.asarray, chosen), "initial_states": stacked, "program": program,
            "select": select}


def train_one_fold_on_all(config, workdir: str, obs: dict, feats: np.ndarray, expression: np.ndarray,
                          encoder_variables: dict, writer, tag: str, context: np.ndarray | None = None,
                          base_scale: float | None = None, blend_weights: tuple | None = None,
                          blend_scale: float | None = None, source: str = "") -> dict:
    """train.ensemble heads on every row (nothing held out; inner validation, when on, from blocks/sections of
    these rows; with train.refit, the heads are then refitted on every row). Returns {'states': member states
    stacked [K], 'mean', 'sd' (target standardisation), 'curve', 'best_epoch', 'refit', 'live_units',
    'untrained_states', 'smoothing' (choose_smoothing's choice on the inner validation), 'counting_base'}.
    `context` ([1, V, N, C]): the rows' neighbourhood context when it was computed on more spots than these
    (default: from `feats` and `obs`). With `base_scale` (counting_base.scale_for; `obs` then holds library_size
    and patient) the heads learn counting_base.residual_targets, and 'counting_base' is the counting base of
    every row (counting_base.fit on the untransformed view): a prediction is its value plus the heads' (None
    without). With `blend_weights` (counting_base.blend_weights) and `blend_scale` (the store's counts-per scale),
    'counting_weight' is the blend weight inner validation chose (counting_base.choose_blend; 'counting_blend'
    says how) and a prediction is counting_base.blend of the heads' and the counting base's ('counting_weight' is
    None for a counting base, which is added in full)."""
    tr, va, how = training_split(config, obs, np.arange(len(expression)))
    ctx = context if context is not None else store_context(config, [feats], obs)
    targets, base, pooled = expression, None, None
    scale = base_scale if base_scale is not None else (blend_scale if blend_weights is not None else None)
    if scale is not None:
        library = np.asarray(obs["library_size"], np.float64)
        pooled = counting_base.pooled_rows(feats[0], np.arange(len(expression)))
        all_rows = np.arange(len(expression))
        base = counting_base.fit(pooled, expression, library, evaluation.alpha_groups(obs, all_rows), scale)
    if base_scale is not None:
        targets = counting_base.residual_targets(expression, library, obs["patient"], base_scale)
    data = HeadData(names=["(all)"], train_rows=[tr], val_rows=[va], encoder_of_fold=[0], features=feats[None],
                    expression=targets, encoder_variables=[encoder_variables], context=ctx, source=source)
    res = train_heads(config, workdir, data, tag=tag, writer=writer)
    program = res["program"]
    blending = base is not None and base_scale is None
    wants_val = builders.smoothing(config) is not None or blending
    val_pred = res["selected_predict"]([va])[0] if len(va) and wants_val else None
    weight, blend_choice = None, None
    if blending:
        blend_choice = counting_base.unvalidated_blend()
        weight = blend_choice["weight"]
    if val_pred is not None and base is not None:
        inner = counting_base.fit(pooled[tr], expression[tr], library[tr], evaluation.alpha_groups(obs, tr), scale)
        inner_counting = counting_base.predict(inner, pooled[va])
        if blending:
            blend_choice = counting_base.choose_blend(expression[va], val_pred, inner_counting,
                                                      metrics.gene_mean_and_sd(expression[tr])[1], blend_weights)
            weight = blend_choice["weight"]
        val_pred = counting_base.combine(val_pred, inner_counting, weight)
    smoothing = choose_smoothing(config, obs, expression, tr, va, val_pred)
    return {"states": res["states"], "mean": program.mu[0], "sd": program.sd[0], "curve": res["curve"],
            "best_epoch": res["best_epoch"]["(all)"], "inner_validation": how, "refit": res["refit"],
            "live_units": res["live_units"]["(all)"], "untrained_states": res["initial_states"],
            "smoothing": smoothing, "counting_base": base, "counting_weight": weight, "counting_blend": blend_choice}


def predict_with_base(states, feats: np.ndarray, mean: np.ndarray, sd: np.ndarray, base,
                      context: np.ndarray | None = None, weight: float | None = None) -> np.ndarray:
    """ensemble_predict_features with a counting base (train_one_fold_on_all's 'counting_base'; None: none) at
    the rows' untransformed view, counting_base.combine at `weight` ('counting_weight')."""
    pred = ensemble_predict_features(states, feats, mean, sd, context=context)
    if base is None:
        return pred
    return counting_base.combine(pred, counting_base.predict(base, counting_base.pooled_rows(feats[0],
                                                                                         np.arange(feats.shape[1]))),
                            weight)


def store_context(config, features_per_encoder, obs: dict) -> np.ndarray | None:
    """The neighbourhood context [E, V, N, C] of a store's spots under each encoder's features, or None when
    model.context=none."""
    if not builders.uses_context(config):
        return None
    return context_lib.store_context(features_per_encoder, obs, float(config.model.context_radius))


def context_summary(config, obs: dict) -> dict | None:
    """What results.json records about the neighbourhoods the heads saw (None without neighbourhood context)."""
    if not builders.uses_context(config):
        return None
    radius = float(config.model.context_radius)
    return context_lib.describe(context_lib.neighbour_table(*context_lib.obs_positions(obs), obs["section"], radius),
                                radius)


# The predictors a run smooths when model.smoothing is on: every one that reads the tiles. The depth oracle
# (measured library size) and the mean profile (constant) are not predictions from images.
SMOOTHED_CONTROLS = ("random_encoder", "untrained_head", "trivial_image", "linear_probe", "image_depth",
                     "image_depth_sampling")


def choose_smoothing(config, obs: dict, expression: np.ndarray, train_rows: np.ndarray, val_rows: np.ndarray,
                     val_pred: np.ndarray | None) -> dict | None:
    """A fold's smoothing of predictions (None when model.smoothing is off): {"self_weight": w, "radius",
    "chosen_by", "inner_validation_mse": {w: MSE in training SDs² of the heads' inner-validation predictions
    smoothed with w}}. Several candidate weights: the lowest MSE wins (ties go to the lighter smoothing); without
    inner-validation predictions, w = 1 (no smoothing). Neighbours of a validation spot are validation spots."""
    how = builders.smoothing(config)
    if how is None:
        return None
    out = {"radius": how["radius"]}
    if len(how["weights"]) == 1:
        return {**out, "self_weight": how["weights"][0], "chosen_by": "model.smoothing_weight"}
    if val_pred is None or not len(val_rows):
        return {**out, "self_weight": 1.0, "chosen_by": "no inner validation: not smoothed"}
    _, sd = metrics.gene_mean_and_sd(expression[train_rows])
    truth = np.asarray(expression[val_rows], np.float64)
    scores = {}
    for w in sorted(set(how["weights"]), reverse=True):
        smoothed = context_lib.smooth_rows(np.asarray(val_pred, np.float64), obs, val_rows, how["radius"], w)
        scores[w] = float(np.mean(((truth - smoothed) / sd) ** 2))
    best = min(scores, key=lambda w: (scores[w], -w))
    return {**out, "self_weight": best, "chosen_by": f"inner validation ({len(val_rows)} spots)",
            "inner_validation_mse": {f"{w:g}": v for w, v in scores.items()}}


def smooth_predictions(obs: dict, rows: np.ndarray, pred, choice: dict | None):
    """`pred` ([len(rows), G], predictions of store rows `rows`) smoothed as `choice` (choose_smoothing) says,
    neighbours among `rows` within each section; unchanged when there is nothing to smooth."""
    if choice is None or pred is None or choice["self_weight"] >= 1.0:
        return pred
    return context_lib.smooth_rows(pred, obs, rows, choice["radius"], choice["self_weight"])


def exported_smoothing(choice: dict | None) -> dict | None:
    """What model.json records for `predict` ({"radius", "self_weight"}), or None when nothing is smoothed."""
    if choice is None or choice["self_weight"] >= 1.0:
        return None
    return {"radius": choice["radius"], "self_weight": choice["self_weight"]}


def smoothing_summary(choices: dict, obs: dict, rows_by_name: dict, random_encoder: dict | None = None
                      ) -> dict | None:
    """What results.json records about the smoothing of predictions (None when off): per evaluated set (held-out
    patient, test store) its choice and how many neighbours its spots had; the random-encoder control's own
    choices (`random_encoder`, by set) as its weights."""
    if not choices or all(c is None for c in choices.values()):
        return None
    sets = {name: {**choices[name], **context_lib.neighbour_counts(
        context_lib.section_table(obs, rows, choices[name]["radius"]))} for name, rows in rows_by_name.items()}
    return {"what": "each spot's prediction x self_weight + the mean prediction of the spots within radius spot "
                    "spacings of it (same section) x (1 - self_weight); self_weight 1 = not smoothed",
            "applied_to": ["model", *SMOOTHED_CONTROLS],
            "not_applied_to": ["mean_predictor", "depth_oracle", "depth_oracle_sampling", "model_unsmoothed"],
            "sets": sets,
            "random_encoder_self_weight": {name: c["self_weight"] for name, c in (random_encoder or {}).items()
                                           if c is not None},
            "note": "the model chooses each fold's self_weight on its inner validation, and the fold's trivial-image, "
                    "linear-probe and image-depth controls take the same; the random-encoder control chooses its "
                    "own on its own inner validation"}


def ensemble_predict_features(states, feats: np.ndarray, mean: np.ndarray, sd: np.ndarray,
                              batch: int = 256, context: np.ndarray | None = None) -> np.ndarray:
    """Predictions (expression units) of heads stacked over members on features [V, n, h, w, C] (and their
    neighbourhood context [V, n, C] for heads with context): the mean over members and views of
    mean + sd * standardised prediction."""
    def one(s, f, c):
        return steps.predict_step(s, {"features": f} if c is None else {"features": f, "context": c})

    fn = jax.jit(jax.vmap(one, in_axes=(0, None, None)), compiler_options=xla_tuning.conv_step_options() or None)
    n_views, n = feats.shape[:2]
    out = []
    for a in range(0, n, batch):
        z = sum(np.asarray(fn(states, jnp.asarray(feats[v, a:a + batch]),
                              None if context is None else jnp.asarray(context[v, a:a + batch])))
                for v in range(n_views)) / n_views
        out.append(mean + sd * z.mean(0))
    return np.concatenate(out).astype(np.float32)
