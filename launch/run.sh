#!/usr/bin/env bash
# Start train.py on this node with torchrun: one process per GPU, one run.sh per node.
#
#   launch/run.sh --config train_configs/gated_deltanet_374M.toml [--section.key value ...]
#
# Several nodes, static rendezvous: on every node, with the same NNODES and MASTER_ADDR,
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<address of node 0> launch/run.sh --config ...
# Several nodes, c10d rendezvous (what launch/slurm.sbatch uses; node ranks are assigned by
# the rendezvous, and a restarted node can rejoin):
#   RDZV_BACKEND=c10d RDZV_ID=<job id> NNODES=4 MASTER_ADDR=<node 0> launch/run.sh --config ...
#
# Environment (defaults in brackets):
#   NNODES [1]  NPROC_PER_NODE [number of GPUs, or 1 without any]  NODE_RANK [SLURM_NODEID or 0]
#   MASTER_ADDR [127.0.0.1]  MASTER_PORT [29500]  RDZV_BACKEND [static; or c10d]  RDZV_ID [flame]
#   MAX_RESTARTS [0]: times torchrun restarts all workers after a failure (they resume from the
#                     latest complete checkpoint)
#   PYTHON [python]: the interpreter of the environment flame is installed in
#   DRY_RUN=1: print the torchrun command instead of running it
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
NNODES=${NNODES:-1}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ "$NPROC_PER_NODE" -ge 1 ]] || NPROC_PER_NODE=1
fi
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_BACKEND=${RDZV_BACKEND:-static}
RDZV_ID=${RDZV_ID:-flame}
MAX_RESTARTS=${MAX_RESTARTS:-0}

cmd=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE"
     --max_restarts "$MAX_RESTARTS")
case "$RDZV_BACKEND" in
    static)
        cmd+=(--node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT") ;;
    c10d)
        # the rendezvous store runs in the torchrun agent of the MASTER_ADDR node
        cmd+=(--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID") ;;
    *)
        echo "run.sh: RDZV_BACKEND=$RDZV_BACKEND: use static or c10d" >&2
        exit 2 ;;
esac
cmd+=("$ROOT/train.py" "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
