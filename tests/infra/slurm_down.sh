#!/usr/bin/env bash
# Stop the SLURM daemons started by tests/infra/slurm_up.sh, by their pid files only.
#
# Usage: tests/infra/slurm_down.sh [STATE_DIR]   (default $DIAGODE_SLURM_DIR or /tmp/diagode-slurm)
# Cancels the jobs still queued, then stops slurmd, slurmctld and the instance's private munged,
# each only if its pid file still names a process of that name (never a reused pid). Leaves
# STATE_DIR in place (the logs, munged's included, are useful after a failure).
set -uo pipefail

STATE_DIR=${1:-${DIAGODE_SLURM_DIR:-/tmp/diagode-slurm}}
STATE_DIR=$(cd "$STATE_DIR" 2>/dev/null && pwd || echo "$STATE_DIR")  # as slurm_up wrote it
log() { printf '[slurm_down %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# A zombie (exited, not yet reaped by a parent that never waits) counts as stopped.
alive() {
    kill -0 "$1" 2>/dev/null || return 1
    [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]
}

# Send SIGTERM to every daemon we started, then wait for all of them together (each takes ~2 s).
PIDS=()
NAMES=()
signal_pidfile() {
    local name=$1 file=$2 pid
    [[ -s $file ]] || return 0
    pid=$(cat "$file")
    rm -f "$file"
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    PIDS+=("$pid")
    NAMES+=("$name")
}

wait_stopped() {
    local i
    for _ in $(seq 100); do
        local alive=0
        for pid in "${PIDS[@]}"; do alive "$pid" && alive=1; done
        [[ $alive -eq 0 ]] && break
        sleep 0.1
    done
    for i in "${!PIDS[@]}"; do
        if alive "${PIDS[$i]}"; then
            log "${NAMES[$i]} (${PIDS[$i]}) ignored SIGTERM for 10 s: SIGKILL"
            kill -KILL "${PIDS[$i]}" 2>/dev/null
        else
            log "stopped ${NAMES[$i]} (${PIDS[$i]})"
        fi
    done
}

ctld_pid=$(cat "$STATE_DIR/slurmctld.pid" 2>/dev/null || true)
if [[ -n $ctld_pid ]] && alive "$ctld_pid" && command -v scancel >/dev/null; then
    export SLURM_CONF=$STATE_DIR/slurm.conf
    if [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
        # let the steps end while slurmd is still there to report them (MinJobAge=5)
        for _ in $(seq 100); do
            [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.1
        done
    fi
fi
signal_pidfile slurmd "$STATE_DIR/slurmd.pid"
signal_pidfile slurmctld "$STATE_DIR/slurmctld.pid"
signal_pidfile munged "$STATE_DIR/munged.pid"
[[ ${#PIDS[@]} -gt 0 ]] && wait_stopped
# Job step daemons of this instance that outlived it (a step stuck reporting to a dead slurmd):
# slurmstepd processes whose environment names this instance's slurm.conf, with their tasks.
kill_tree() {
    local child
    for child in $(pgrep -P "$1"); do kill_tree "$child"; done
    kill -KILL "$1" 2>/dev/null
}
for pid in $(pgrep -x slurmstepd); do
    if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null \
            | grep -qx "SLURM_CONF=$STATE_DIR/slurm.conf"; then
        log "killing leftover slurmstepd $pid and its tasks"
        kill_tree "$pid"
    fi
done
# The private munged's socket directory (see slurm_up.sh).
munge_dir=$(cat "$STATE_DIR/munge_dir" 2>/dev/null || true)
if [[ $munge_dir == /run/munge/diagode.* ]]; then
    cp "$munge_dir/munged.log" "$STATE_DIR/log/munged.log" 2>/dev/null
    rm -rf "$munge_dir" "$STATE_DIR/munge_dir"
fi
exit 0
