#!/usr/bin/env bash
# Launch `python -m secondorder.train distributed=horovod` with horovodrun (gloo controller;
# NCCL operations on GPUs when Horovod was built with them: launch/install_horovod.sh).
#
#   launch/horovodrun.sh [options] [hydra overrides...]
#
#   NP=2 launch/horovodrun.sh experiment=demo                    # 2 ranks on this machine
#   launch/horovodrun.sh -np 16 --hosts node0:8,node1:8 model=resnet50 ...
#   launch/horovodrun.sh -np 16 --hostfile hosts.txt ...         # lines "node0 slots=8"
#   launch/horovodrun.sh --dry-run ...           # print what every node runs, run nothing
#
# horovodrun is started on ONE node (the first host); it starts the ranks of the other hosts
# over ssh, so every host needs passwordless ssh from it and the checkout and Python
# environment at the same paths.
#
# Options (each also read from the environment variable in brackets):
#   -np N              total ranks [NP; default: the slots of the hosts, else the number of
#                      visible GPUs, else 1]
#   --hosts LIST       host:slots,host:slots [HOSTS; default localhost:NP]
#   --hostfile FILE    one "host slots=N" per line [HOSTFILE]
#   --dry-run          print the exact commands and exit [DRY_RUN=1]
# Other variables: HOROVODRUN (default: horovodrun), PYTHON (default: python),
# EXTRA_HOROVODRUN_ARGS (appended as is).
# Everything else on the command line is passed to Hydra unchanged (after `--` too).
# Exit code: the run's; 128 + the signal when SIGTERM/SIGINT stopped it (checkpointed, resumable),
# so a scheduler can tell a preemption from a crash. horovodrun kills its ranks 5 s after it
# passes a signal on: a stop needs a step and a checkpoint shorter than that.
set -euo pipefail

NP="${NP:-}"
HOSTS="${HOSTS:-}"
HOSTFILE="${HOSTFILE:-}"
DRY_RUN="${DRY_RUN:-0}"
HOROVODRUN="${HOROVODRUN:-horovodrun}"
PYTHON="${PYTHON:-python}"
OVERRIDES=()

die() { echo "launch/horovodrun.sh: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        -np|--np) need_value "$@"; NP="$2"; shift 2 ;;
        --hosts|-H) need_value "$@"; HOSTS="$2"; shift 2 ;;
        --hostfile) need_value "$@"; HOSTFILE="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        --) shift; OVERRIDES+=("$@"); break ;;
        -*) die "unknown option $1 (Hydra overrides look like key=value)" ;;
        *) OVERRIDES+=("$1"); shift ;;
    esac
done

[[ -z "$HOSTS" || -z "$HOSTFILE" ]] || die "give --hosts or --hostfile, not both"

# host and slots of every node, in order: HOST_NAMES[i], HOST_SLOTS[i].
HOST_NAMES=()
HOST_SLOTS=()
if [[ -n "$HOSTFILE" ]]; then
    [[ -f "$HOSTFILE" ]] || die "no hostfile '$HOSTFILE'"
    while read -r host rest; do
        [[ -z "$host" || "$host" == \#* ]] && continue
        slots="$(sed -n 's/.*slots=\([0-9][0-9]*\).*/\1/p' <<<"$rest")"
        HOST_NAMES+=("$host")
        HOST_SLOTS+=("${slots:-1}")
    done <"$HOSTFILE"
    [[ ${#HOST_NAMES[@]} -gt 0 ]] || die "hostfile '$HOSTFILE' names no host"
elif [[ -n "$HOSTS" ]]; then
    IFS=',' read -r -a entries <<<"$HOSTS"
    for entry in "${entries[@]}"; do
        [[ "$entry" =~ ^[^:]+:[1-9][0-9]*$ ]] || die "--hosts entries look like host:slots, got '$entry'"
        HOST_NAMES+=("${entry%%:*}")
        HOST_SLOTS+=("${entry##*:}")
    done
fi

TOTAL_SLOTS=0
for slots in "${HOST_SLOTS[@]+"${HOST_SLOTS[@]}"}"; do TOTAL_SLOTS=$((TOTAL_SLOTS + slots)); done
if [[ -z "$NP" ]]; then
    if (( TOTAL_SLOTS > 0 )); then
        NP="$TOTAL_SLOTS"
    else
        NP="$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)"
        [[ "$NP" =~ ^[1-9][0-9]*$ ]] || NP=1
    fi
fi
[[ "$NP" =~ ^[1-9][0-9]*$ ]] || die "NP must be a positive integer, got '$NP'"
if [[ ${#HOST_NAMES[@]} -eq 0 ]]; then
    HOST_NAMES=(localhost)
    HOST_SLOTS=("$NP")
    TOTAL_SLOTS="$NP"
fi
(( NP <= TOTAL_SLOTS )) || die "NP=$NP is more than the $TOTAL_SLOTS slots of the hosts"

has_override() {
    local key="$1" item
    for item in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do
        [[ "$item" == "$key="* || "$item" == "+$key="* || "$item" == "++$key="* ]] && return 0
    done
    return 1
}

TRAIN_ARGS=("$PYTHON" -m secondorder.train)
has_override distributed || TRAIN_ARGS+=(distributed=horovod)
TRAIN_ARGS+=("${OVERRIDES[@]+"${OVERRIDES[@]}"}")

# shellcheck disable=SC2206 # EXTRA_HOROVODRUN_ARGS is split on purpose
EXTRA=(${EXTRA_HOROVODRUN_ARGS:-})
CMD=("$HOROVODRUN" --gloo -np "$NP")
if [[ -n "$HOSTFILE" ]]; then
    CMD+=(--hostfile "$HOSTFILE")
else
    host_list=""
    for i in "${!HOST_NAMES[@]}"; do host_list+="${host_list:+,}${HOST_NAMES[$i]}:${HOST_SLOTS[$i]}"; done
    CMD+=(-H "$host_list")
fi
CMD+=("${EXTRA[@]+"${EXTRA[@]}"}" "${TRAIN_ARGS[@]}")

quoted() { local out; out="$(printf '%q ' "$@")"; echo "${out% }"; }

if [[ "$DRY_RUN" == 1 ]]; then
    # horovodrun fills the hosts in order: ranks first..last of each host.
    first=0
    for i in "${!HOST_NAMES[@]}"; do
        (( first < NP )) || break
        count="${HOST_SLOTS[$i]}"
        (( first + count <= NP )) || count=$((NP - first))
        ranks="ranks $first-$((first + count - 1))"
        if (( i == 0 )); then
            echo "# node 0 (${HOST_NAMES[$i]}, $ranks): launches every rank"
            quoted "${CMD[@]}"
        else
            echo "# node $i (${HOST_NAMES[$i]}, $ranks): started over ssh by horovodrun on" \
                "${HOST_NAMES[0]}, running: $(quoted "${TRAIN_ARGS[@]}")"
        fi
        first=$((first + count))
    done
    exit 0
fi

# shellcheck source=launch/stop_exit.sh
source "$(dirname "${BASH_SOURCE[0]}")/stop_exit.sh"
run_and_report_stop "${CMD[@]}"
