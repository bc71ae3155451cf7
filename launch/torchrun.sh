#!/usr/bin/env bash
# Launch `python -m secondorder.train` with torchrun (torch.distributed: NCCL on GPUs, gloo on CPU).
#
#   launch/torchrun.sh [options] [hydra overrides...]
#
#   NPROC=8 launch/torchrun.sh experiment=demo                       # one node, 8 ranks
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 RDZV_ID=job42 launch/torchrun.sh model=resnet50 ...
#   launch/torchrun.sh --max-restarts 3 trainer.checkpoint_every=500 ...   # elastic restarts
#   launch/torchrun.sh --dry-run ...              # print the command of every node, run nothing
#
# Options (each also read from the environment variable in brackets):
#   --nproc N          ranks per node [NPROC; default: the number of visible GPUs, else 1]
#   --nnodes N         nodes [NNODES; default 1]
#   --node-rank I      this node's index, 0..NNODES-1 [NODE_RANK; default 0]
#   --master-addr A    rendezvous host, a node of the job [MASTER_ADDR; needed when NNODES > 1]
#   --master-port P    rendezvous port [MASTER_PORT; default 29500]
#   --rdzv-id ID       job id shared by all nodes [RDZV_ID; default $SLURM_JOB_ID, else a
#                      time stamp on one node; set it explicitly for several nodes]
#   --max-restarts R   restart the whole job up to R times when a rank dies [MAX_RESTARTS;
#                      default 0]. With R > 0 the run resumes from its newest checkpoint:
#                      trainer.resume=auto is added, and trainer.run_dir=runs/<RDZV_ID> unless
#                      an override sets trainer.run_dir (set trainer.checkpoint_every too).
#   --dry-run          print the exact command each node would run and exit [DRY_RUN=1]; with
#                      NODE_RANK given, only that node's (so under srun each node prints its own)
# Other variables: TORCHRUN (default: torchrun), EXTRA_TORCHRUN_ARGS (appended as is).
# Everything else on the command line is passed to Hydra unchanged (after `--` too).
# Exit code: the run's; 128 + the signal when SIGTERM/SIGINT stopped it (checkpointed, resumable),
# so a scheduler can tell a preemption from a crash. torchrun's agent gives its ranks 30 s after
# a signal before it kills them (its --shutdown-timeout, in EXTRA_TORCHRUN_ARGS).
set -euo pipefail

NPROC="${NPROC:-}"
NNODES="${NNODES:-1}"
NODE_RANK_GIVEN="${NODE_RANK:+1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-}}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
DRY_RUN="${DRY_RUN:-0}"
TORCHRUN="${TORCHRUN:-torchrun}"
OVERRIDES=()

die() { echo "launch/torchrun.sh: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --nproc) need_value "$@"; NPROC="$2"; shift 2 ;;
        --nnodes) need_value "$@"; NNODES="$2"; shift 2 ;;
        --node-rank) need_value "$@"; NODE_RANK="$2"; NODE_RANK_GIVEN=1; shift 2 ;;
        --master-addr) need_value "$@"; MASTER_ADDR="$2"; shift 2 ;;
        --master-port) need_value "$@"; MASTER_PORT="$2"; shift 2 ;;
        --rdzv-id) need_value "$@"; RDZV_ID="$2"; shift 2 ;;
        --max-restarts) need_value "$@"; MAX_RESTARTS="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
        --) shift; OVERRIDES+=("$@"); break ;;
        --*) die "unknown option $1 (Hydra overrides look like key=value)" ;;
        *) OVERRIDES+=("$1"); shift ;;
    esac
done

if [[ -z "$NPROC" ]]; then
    NPROC="$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)"
    [[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || NPROC=1
fi
for pair in "NPROC=$NPROC" "NNODES=$NNODES" "MASTER_PORT=$MASTER_PORT"; do
    [[ "${pair#*=}" =~ ^[1-9][0-9]*$ ]] || die "${pair%%=*} must be a positive integer, got '${pair#*=}'"
done
for pair in "NODE_RANK=$NODE_RANK" "MAX_RESTARTS=$MAX_RESTARTS"; do
    [[ "${pair#*=}" =~ ^[0-9]+$ ]] || die "${pair%%=*} must be a non-negative integer, got '${pair#*=}'"
done
(( NODE_RANK < NNODES )) || die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES"
if (( NNODES > 1 )); then
    [[ -n "$MASTER_ADDR" ]] || die "NNODES=$NNODES needs MASTER_ADDR (the host of node 0)"
    [[ -n "$RDZV_ID" ]] || die "NNODES=$NNODES needs RDZV_ID (the same job id on every node)"
fi
RDZV_ID="${RDZV_ID:-local-$(date +%Y%m%d-%H%M%S)}"

has_override() {
    local key="$1" item
    for item in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do
        [[ "$item" == "$key="* || "$item" == "+$key="* || "$item" == "++$key="* ]] && return 0
    done
    return 1
}

TRAIN_ARGS=(-m secondorder.train)
has_override distributed || TRAIN_ARGS+=(distributed=torch)
if (( MAX_RESTARTS > 0 )); then
    # A restarted job must find its own checkpoints: a fixed run dir shared by all nodes.
    has_override trainer.run_dir || TRAIN_ARGS+=("trainer.run_dir=runs/$RDZV_ID")
    has_override trainer.resume || TRAIN_ARGS+=(trainer.resume=auto)
fi
TRAIN_ARGS+=("${OVERRIDES[@]+"${OVERRIDES[@]}"}")

# shellcheck disable=SC2206 # EXTRA_TORCHRUN_ARGS is split on purpose
EXTRA=(${EXTRA_TORCHRUN_ARGS:-})

# The torchrun command of node $1, in the array CMD.
build_command() {
    local node="$1"
    CMD=("$TORCHRUN" "--nproc-per-node=$NPROC")
    if (( NNODES == 1 )); then
        CMD+=(--standalone --nnodes=1)
    else
        CMD+=("--nnodes=$NNODES" "--node-rank=$node" --rdzv-backend=c10d
              "--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT" "--rdzv-id=$RDZV_ID")
    fi
    CMD+=("--max-restarts=$MAX_RESTARTS" "${EXTRA[@]+"${EXTRA[@]}"}" "${TRAIN_ARGS[@]}")
}

quoted() { local out; out="$(printf '%q ' "$@")"; echo "${out% }"; }

if [[ "$DRY_RUN" == 1 ]]; then
    if (( NNODES == 1 )); then
        build_command 0
        quoted "${CMD[@]}"
    elif [[ -n "$NODE_RANK_GIVEN" ]]; then
        build_command "$NODE_RANK"
        echo "NODE_RANK=$NODE_RANK $(quoted "${CMD[@]}")"
    else
        for (( node = 0; node < NNODES; node++ )); do
            build_command "$node"
            echo "NODE_RANK=$node $(quoted "${CMD[@]}")"
        done
    fi
    exit 0
fi

build_command "$NODE_RANK"
# shellcheck source=launch/stop_exit.sh
source "$(dirname "${BASH_SOURCE[0]}")/stop_exit.sh"
run_and_report_stop "${CMD[@]}"
