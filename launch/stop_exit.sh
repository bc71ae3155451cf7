# Sourced by launch/torchrun.sh, launch/horovodrun.sh and launch/slurm/*.sbatch:
# run_and_report_stop CMD... runs the launcher as a child and returns the code a scheduler
# should see (under `set -e` a caller whose last command it is exits with it).
#
# torchrun's agent and horovodrun exit 1 whatever their ranks exited with, so a preempted run
# would look like a crash. A rank that stops on SIGTERM/SIGINT (checkpointed, resumable) leaves
# 128 + the signal in $SECONDORDER_STOP_DIR (secondorder/train.py); this returns that code.
# SIGTERM/SIGINT sent to this script are passed on to the launcher, which passes them to the
# ranks. The launcher runs in its own session, so a Ctrl-C at the terminal reaches it once,
# through here, rather than also directly.

_stop_forward() {
    _STOP_TRAPPED=1
    _STOP_RECEIVED="${_STOP_RECEIVED:-$1}"
    kill -s "$1" "$_STOP_CHILD" 2>/dev/null || true
}

run_and_report_stop() {
    local stop_dir rc last code
    stop_dir="$(mktemp -d "${TMPDIR:-/tmp}/secondorder-stop.XXXXXX")"
    export SECONDORDER_STOP_DIR="$stop_dir"
    _STOP_RECEIVED=""
    trap '_stop_forward TERM' TERM
    trap '_stop_forward INT' INT
    setsid "$@" &
    _STOP_CHILD=$!
    while :; do
        _STOP_TRAPPED=0
        rc=0
        wait "$_STOP_CHILD" || rc=$?
        (( _STOP_TRAPPED )) || break
        # wait returned for the trap; if the launcher ended meanwhile, collect its own status.
        if ! kill -0 "$_STOP_CHILD" 2>/dev/null; then
            last=0
            wait "$_STOP_CHILD" || last=$?
            (( last == 127 )) || rc=$last
            break
        fi
    done
    trap - TERM INT
    code="$(cat "$stop_dir"/stopped.* 2>/dev/null | sort -n | head -n 1 || true)"
    rm -rf "$stop_dir"
    if [[ -n "$code" ]]; then
        return "$code"
    elif [[ -n "$_STOP_RECEIVED" && "$rc" != 0 ]]; then
        return $((128 + $(kill -l "$_STOP_RECEIVED")))   # stopped before any rank could say so
    fi
    return "$rc"
}
