#!/usr/bin/env bash
# A Cloud TPU pod slice (several VM workers): launch/tpu_vm.sh --pod with a pod accelerator (default v4-32).
# Every worker runs the same command; jax.distributed.initialize() auto-detects the slice; the workdir is a
# gcsfuse mount of --bucket shared by all workers; a gs:// --data is read in place (--stage-data copies it first).
#   launch/tpu_pod.sh --name hs-pod --zone us-central2-b --bucket gs://BUCKET --data gs://BUCKET/store [--dry-run]
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ACCEL=(--accelerator v4-32)
for a in "$@"; do [[ "$a" == "--accelerator" ]] && ACCEL=(); done
exec "$HERE/tpu_vm.sh" --pod "${ACCEL[@]}" "$@"
