#!/usr/bin/env bash
# Run the same jaxrlhf command on every worker of a Cloud TPU VM pod (JAX multi-controller).
#
#   launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE [PROJECT] -- python -m jaxrlhf.train --config=... --workdir=gs://...
#
# Every worker runs the identical command; jax.distributed.initialize() reads the TPU environment
# (jaxrlhf.distributed), each process feeds only its shard of every global batch, and checkpoints
# and logs are written once. The workdir must be shared storage (a gs:// bucket or NFS).
# --dry-run prints the gcloud command instead of running it.
set -euo pipefail
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
if [[ $# -lt 4 ]]; then
  sed -n '2,10p' "$0" >&2
  exit 2
fi
tpu="$1"; zone="$2"; shift 2
project_args=()
if [[ "$1" != "--" ]]; then project_args=(--project "$1"); shift; fi
[[ "$1" == "--" ]] || { echo "expected -- before the command" >&2; exit 2; }
shift
repo_dir="${JAXRLHF_REMOTE_DIR:-~/jaxrlhf}"
remote="cd $repo_dir && $(printf '%q ' "$@")"
cmd=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project_args[@]}" --worker=all --command "$remote")
if [[ $dry_run == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  "${cmd[@]}"
fi
