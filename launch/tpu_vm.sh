#!/usr/bin/env bash
# Runs histospace_jax on a Cloud TPU VM (single host, or a pod slice with --pod / launch/tpu_pod.sh):
# create the VM, install the package on every worker, bring the data, run the same command on all workers,
# fetch the results, delete the VM. --dry-run prints the commands instead of running them.
#
#   launch/tpu_vm.sh --name hs-1 --zone us-central2-b --accelerator v4-8 \
#       --data gs://BUCKET/her2st_store [--ae-store gs://BUCKET/bach_store] [--results ./results/hs-1] \
#       [--config configs/loo.py] [--project P] [--version tpu-ubuntu2204-base] [--stage-data] [--keep] \
#       [--dry-run] [-- --config.train.epochs=20 ...]
#
# Data: a gs:// (or s3://) store is read in place by every worker (tensorstore's kvstore drivers, with the VM's
# service account); --stage-data copies it to each worker's local disk (/tmp/data/...) with `gcloud storage cp`
# first. A local directory is always copied up with `gcloud compute tpus tpu-vm scp`. Pods (--pod) mount
# --bucket with gcsfuse at /mnt/gcs on every worker and use /mnt/gcs/<name> as the shared workdir (Orbax
# checkpoints are written by all workers into one directory). Every worker runs the same command;
# jax.distributed.initialize() auto-detects the pod (--config.distributed.mode=on), and only worker 0 writes
# results.json and logs.
set -euo pipefail

NAME="" ZONE="" ACCEL="v4-8" VERSION="tpu-ubuntu2204-base" PROJECT="" DATA="" AE_STORE="" CONFIG="configs/loo.py"
RESULTS="" KEEP=0 DRY=0 POD=0 BUCKET="" STAGE=0 EXTRA=()
usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
# --dry-run anywhere (even after --) means dry run: never start machines by accident.
ARGV=(); for a in "$@"; do if [[ "$a" == "--dry-run" ]]; then DRY=1; else ARGV+=("$a"); fi; done
set -- "${ARGV[@]+"${ARGV[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2;;
    --zone) ZONE="$2"; shift 2;;
    --accelerator) ACCEL="$2"; shift 2;;
    --version) VERSION="$2"; shift 2;;
    --project) PROJECT="$2"; shift 2;;
    --data) DATA="$2"; shift 2;;
    --ae-store) AE_STORE="$2"; shift 2;;
    --config) CONFIG="$2"; shift 2;;
    --results) RESULTS="$2"; shift 2;;
    --bucket) BUCKET="$2"; shift 2;;
    --pod) POD=1; shift;;
    --stage-data) STAGE=1; shift;;
    --keep) KEEP=1; shift;;
    -h|--help) usage 0;;
    --) shift; EXTRA=("$@"); break;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2;;
  esac
done
[[ -n "$NAME" && -n "$ZONE" ]] || { echo "--name and --zone are required (see --help)" >&2; exit 2; }
if [[ $POD == 1 && -z "$BUCKET" ]]; then echo "--pod needs --bucket gs://BUCKET for the shared workdir" >&2; exit 2; fi
RESULTS="${RESULTS:-./results/$NAME}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
GC=(gcloud compute tpus tpu-vm)
LOC=(--zone "$ZONE"); [[ -n "$PROJECT" ]] && LOC+=(--project "$PROJECT")

run() {  # prints the command (dry run) or runs it
  if [[ $DRY == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
on_all() { run "${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command "$1"; }

STAGED=""
stage_data() {  # $1 = store (URL or local dir); sets STAGED to the path or URL the workers read
  local src="$1" base; base="$(basename "${src%/}")"
  if [[ "$src" == gs://* || "$src" == s3://* ]] && [[ $STAGE == 0 ]]; then
    STAGED="${src%/}"  # read in place: no copy, no local disk needed
    return
  fi
  if [[ "$src" == gs://* || "$src" == s3://* ]]; then
    on_all "mkdir -p /tmp/data && gcloud storage cp -r '$src' /tmp/data/"
  else
    on_all "mkdir -p /tmp/data"
    run "${GC[@]}" scp --recurse "$src" "$NAME:/tmp/data/" "${LOC[@]}" --worker=all
  fi
  STAGED="/tmp/data/$base"
}

if [[ $POD == 1 ]]; then WORKDIR="/mnt/gcs/$NAME"; MODE=on; else WORKDIR="/tmp/histospace_run"; MODE=auto; fi
run "${GC[@]}" create "$NAME" "${LOC[@]}" --accelerator-type "$ACCEL" --version "$VERSION"
run git -C "$REPO" archive --format=tar.gz -o /tmp/histospace_jax.tar.gz HEAD
run "${GC[@]}" scp /tmp/histospace_jax.tar.gz "$NAME:/tmp/" "${LOC[@]}" --worker=all
on_all "mkdir -p ~/histospace_jax && tar xzf /tmp/histospace_jax.tar.gz -C ~/histospace_jax && pip install -q 'jax[tpu]' -e ~/histospace_jax"
if [[ $POD == 1 ]]; then
  on_all "sudo mkdir -p /mnt/gcs && sudo chown \$USER /mnt/gcs && gcsfuse --implicit-dirs '${BUCKET#gs://}' /mnt/gcs"
fi
ARGS=(--config="$CONFIG" --workdir="$WORKDIR" --config.distributed.mode="$MODE")
if [[ -n "$DATA" ]]; then stage_data "$DATA"; ARGS+=(--config.data.store="$STAGED"); fi
if [[ -n "$AE_STORE" ]]; then stage_data "$AE_STORE"; ARGS+=(--config.ae.store="$STAGED"); fi
ARGS+=("${EXTRA[@]}")
on_all "cd ~/histospace_jax && python -m histospace_jax.main $(printf '%q ' "${ARGS[@]}")"
run mkdir -p "$RESULTS"
for f in results.json per_gene.csv predictions.npz metrics.jsonl curves; do
  run "${GC[@]}" scp --recurse "$NAME:$WORKDIR/$f" "$RESULTS/" "${LOC[@]}" --worker=0
done
if [[ $KEEP == 0 ]]; then run "${GC[@]}" delete "$NAME" "${LOC[@]}" --quiet; fi
