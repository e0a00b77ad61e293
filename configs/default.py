"""Default configuration: leave-one-patient-out on the built-in synthetic demo data.

Every other config imports this one and changes what it needs. Override any key on the command line,
e.g. `--config.train.epochs=3 --config.data.store=/data/her2st_store`; unknown keys are rejected.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "loo"  # "loo" | "pretrain_ae" | "ae_study" | "external"
    c.seed = 0
    c.log_every_steps = 20
    c.eval_batch_size = 128

    c.data = ml_collections.ConfigDict()
    c.data.store = ""  # tile store path; "" = the built-in SYNTHETIC demo
    c.data.demo_root = ""  # where demo stores are written once and reused; "" = ~/.cache/histospace_jax/demo
    c.data.tile_size = 128
    c.data.worker_count = 0  # Grain worker processes (0 = read in the main process)
    c.data.demo = ml_collections.ConfigDict(dict(
        n_patients=6, sections_per_patient=2, grid=(14, 14), n_genes=64,
        n_pretrain_patients=2, pretrain_grid=(16, 16), noise_sd=0.35, seed=0))

    c.model = ml_collections.ConfigDict()
    c.model.variant = "relu_bn"  # "pool" | "relu" | "relu_bn" (the paper's three autoencoders)
    c.model.encoder_features = (32, 64, 128)
    c.model.head_conv_features = (128,)  # more entries = the paper's deeper heads
    c.model.head_fc_features = (256,)
    c.model.dropout_rate = 0.0
    c.model.upconv_impl = "subpixel"  # "subpixel" (fast, same function) | "transpose" (lax reference)

    c.ae = ml_collections.ConfigDict()
    c.ae.checkpoint = ""  # load a pretrained autoencoder (Orbax dir, e.g. WORKDIR/checkpoints/ae) instead
    c.ae.store = ""  # image store for pretraining; "" = demo pretraining store, or the regression store
    c.ae.epochs = 3
    c.ae.batch_size = 32
    c.ae.learning_rate = 1e-3
    c.ae.weight_decay = 0.0
    c.ae.val_fraction = 0.1

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 0  # fixed (no model selection on the held-out patient); 0 = auto: 10, or 3 on the demo
    c.train.batch_size = 32
    c.train.learning_rate = 1e-3
    c.train.weight_decay = 1e-4
    c.train.huber_delta = 1.0

    c.loo = ml_collections.ConfigDict()
    c.loo.patients = ""  # comma-separated subset of patients to hold out; "" = all
    c.loo.feature_cache = True  # encode every tile once; heads train on cached features
    c.loo.folds_per_program = 0  # folds trained together in one compiled program; 0 = all
    # Also train the heads on an untrained encoder: "on" | "off" | "auto" (on for real stores; off on the
    # synthetic demo, where it would double the run time).
    c.loo.random_encoder_control = "auto"
    c.loo.random_encoder_seed = 12345  # init seed of that untrained encoder
    c.loo.fdr = 0.05  # per-gene significance: genes with r > 0 at this Benjamini-Hochberg FDR

    c.external = ml_collections.ConfigDict()  # mode "external": train on data.store, test on external.store
    c.external.store = ""  # test store; "" = data.store itself (then set disjoint train/test_patients)
    c.external.train_patients = ""  # comma-separated patients of data.store to train on; "" = all
    c.external.test_patients = ""  # comma-separated patients of external.store to test on; "" = all
    c.external.exclude_overlap = True  # leave test spots sharing a patient / image / tile with training out
    c.external.map_genes = "GNAS,HLA-B"  # genes drawn as spatial maps (truth beside prediction)

    c.clustering = ml_collections.ConfigDict()  # K-means (k=2) on predicted expression vs pathologist labels
    c.clustering.cancer_labels = "invasive cancer,cancer in situ,tumour,tumor"  # labels counted as cancer

    c.ae_study = ml_collections.ConfigDict()  # mode "ae_study": the paper's three autoencoder variants
    c.ae_study.variants = ("pool", "relu", "relu_bn")
    c.ae_study.n_grid_tiles = 8  # validation tiles shown with their reconstructions

    c.distributed = ml_collections.ConfigDict()  # multi-process jobs; see histospace_jax/distributed.py
    c.distributed.mode = "auto"  # "auto": start when a coordinator is set or a cluster is detected | "on" | "off"
    c.distributed.coordinator_address = ""  # "host:port" of process 0; or $HISTOSPACE_COORDINATOR_ADDRESS
    c.distributed.num_processes = 0  # or $HISTOSPACE_NUM_PROCESSES
    c.distributed.process_id = -1  # or $HISTOSPACE_PROCESS_ID
    c.distributed.local_device_ids = ""  # e.g. "0,1" (one process per GPU group); "" = all visible
    c.distributed.cpu_collectives = "gloo"  # cross-process collectives on CPU devices
    c.distributed.initialization_timeout = 300

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 200
    c.checkpoint.max_to_keep = 2
    return c
