#!/usr/bin/env bash
# Runs histospace_jax on one or more multi-GPU machines reachable by ssh. One process per machine uses all
# its GPUs (pmap over local devices); with several --hosts, every machine runs the same command with
# HISTOSPACE_COORDINATOR_ADDRESS=<first host>:<port>, HISTOSPACE_NUM_PROCESSES and HISTOSPACE_PROCESS_ID
# (histospace_jax/distributed.py), and only process 0 writes results. --dry-run prints the commands.
#
#   launch/gpu_box.sh --hosts gpu1[,gpu2,...] --data /data/her2st_store [--ae-store DIR] [--workdir DIR]
#       [--results ./results/gpu] [--config configs/loo.py] [--port 12355] [--stage-data] [--dry-run]
#       [-- --config.KEY=VALUE ...]
#
# --data and --workdir are paths on the machines (a shared filesystem when there are several: Orbax
# checkpoints from every process go to one directory). A gs:// or s3:// --data is read in place; --stage-data
# copies it to /tmp/data on every machine first.
set -euo pipefail

HOSTS="" DATA="" AE_STORE="" WORKDIR="/tmp/histospace_run" RESULTS="./results/gpu" CONFIG="configs/loo.py"
PORT=12355 DRY=0 STAGE=0 EXTRA=()
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
# --dry-run anywhere (even after --) means dry run: never start machines by accident.
ARGV=(); for a in "$@"; do if [[ "$a" == "--dry-run" ]]; then DRY=1; else ARGV+=("$a"); fi; done
set -- "${ARGV[@]+"${ARGV[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hosts) HOSTS="$2"; shift 2;;
    --data) DATA="$2"; shift 2;;
    --ae-store) AE_STORE="$2"; shift 2;;
    --workdir) WORKDIR="$2"; shift 2;;
    --results) RESULTS="$2"; shift 2;;
    --config) CONFIG="$2"; shift 2;;
    --port) PORT="$2"; shift 2;;
    --stage-data) STAGE=1; shift;;
    -h|--help) usage 0;;
    --) shift; EXTRA=("$@"); break;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2;;
  esac
done
[[ -n "$HOSTS" ]] || { echo "--hosts is required (see --help)" >&2; exit 2; }
IFS=, read -r -a HOST_LIST <<< "$HOSTS"
N=${#HOST_LIST[@]}
REPO="$(cd "$(dirname "$0")/.." && pwd)"
run() { if [[ $DRY == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }

stage() {  # $1 = store; sets STAGED to the path or URL the machines read
  if [[ "$1" == gs://* || "$1" == s3://* ]] && [[ $STAGE == 1 ]]; then
    for h in "${HOST_LIST[@]}"; do run ssh "$h" "mkdir -p /tmp/data && gcloud storage cp -r '$1' /tmp/data/"; done
    STAGED="/tmp/data/$(basename "${1%/}")"
  else
    STAGED="$1"
  fi
}

run git -C "$REPO" archive --format=tar.gz -o /tmp/histospace_jax.tar.gz HEAD
for h in "${HOST_LIST[@]}"; do
  run scp /tmp/histospace_jax.tar.gz "$h:/tmp/"
  run ssh "$h" "mkdir -p ~/histospace_jax && tar xzf /tmp/histospace_jax.tar.gz -C ~/histospace_jax && pip install -q 'jax[cuda12]' -e ~/histospace_jax"
done
ARGS=(--config="$CONFIG" --workdir="$WORKDIR")
if [[ -n "$DATA" ]]; then stage "$DATA"; ARGS+=(--config.data.store="$STAGED"); fi
if [[ -n "$AE_STORE" ]]; then stage "$AE_STORE"; ARGS+=(--config.ae.store="$STAGED"); fi
ARGS+=("${EXTRA[@]}")
CMD="cd ~/histospace_jax && python -m histospace_jax.main $(printf '%q ' "${ARGS[@]}")"
if [[ $N == 1 ]]; then
  run ssh "${HOST_LIST[0]}" "$CMD"
else
  COORD="${HOST_LIST[0]}:$PORT"
  for i in "${!HOST_LIST[@]}"; do  # all processes start together; the last one waits in the foreground
    ENVS="HISTOSPACE_COORDINATOR_ADDRESS=$COORD HISTOSPACE_NUM_PROCESSES=$N HISTOSPACE_PROCESS_ID=$i"
    if [[ $i -lt $((N - 1)) ]]; then
      run ssh -f "${HOST_LIST[$i]}" "$ENVS bash -c '$CMD' > /tmp/histospace_$i.log 2>&1"
    else
      run ssh "${HOST_LIST[$i]}" "$ENVS bash -c '$CMD'"
    fi
  done
fi
run mkdir -p "$RESULTS"
run scp -r "${HOST_LIST[0]}:$WORKDIR/results.json" "${HOST_LIST[0]}:$WORKDIR/per_gene.csv" \
  "${HOST_LIST[0]}:$WORKDIR/predictions.npz" "${HOST_LIST[0]}:$WORKDIR/curves" "$RESULTS/"
