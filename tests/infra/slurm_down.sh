#!/usr/bin/env bash
# Stop the SLURM daemons started by tests/infra/slurm_up.sh, by their pid files only.
#
# Usage: tests/infra/slurm_down.sh [STATE_DIR]   (default $DIAGODE_SLURM_DIR or /tmp/diagode-slurm)
# Cancels the jobs still queued, then stops slurmd, slurmctld and the instance's private munged:
# by their pid files (each only if it still names a process of that name, never a reused pid),
# and by their command lines, which name this instance's slurm.conf or munge socket folder (for
# daemons an interrupted slurm_up.sh started before their pid files were written). Safe to run
# twice or on a half-started instance. Leaves STATE_DIR in place (the logs, munged's included,
# are useful after a failure).
set -uo pipefail

STATE_DIR=${1:-${DIAGODE_SLURM_DIR:-/tmp/diagode-slurm}}
STATE_DIR=$(cd "$STATE_DIR" 2>/dev/null && pwd || echo "$STATE_DIR")  # as slurm_up wrote it
log() { printf '[slurm_down %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# A zombie (exited, not yet reaped by a parent that never waits) counts as stopped.
alive() {
    kill -0 "$1" 2>/dev/null || return 1
    [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]
}

kill_tree() {
    local child
    for child in $(pgrep -P "$1"); do kill_tree "$child"; done
    kill -KILL "$1" 2>/dev/null
}

# An interrupted slurm_up.sh of this instance that still runs (its caller was killed): stopped
# first, so that it starts nothing more (its pid file is removed when it finishes).
up_pid=$(cat "$STATE_DIR/slurm_up.pid" 2>/dev/null || true)
rm -f "$STATE_DIR/slurm_up.pid"
if [[ -n $up_pid && $up_pid != "$PPID" ]] \
        && tr '\0' ' ' 2>/dev/null <"/proc/$up_pid/cmdline" | grep -qF "slurm_up.sh"; then
    log "stopping the unfinished slurm_up.sh ($up_pid)"
    kill_tree "$up_pid"
fi

# Send SIGTERM to every daemon we started, then wait for all of them together (each takes ~2 s).
PIDS=()
NAMES=()
signal_pidfile() {
    local name=$1 file=$2 pid
    [[ -s $file ]] || return 0
    pid=$(cat "$file")
    rm -f "$file"
    [[ " ${PIDS[*]} " == *" $pid "* ]] && return 0
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
# signal_instance NAME PATTERN: daemons called NAME whose command line contains PATTERN (this
# instance's slurm.conf or munge socket folder): those whose pid file was not written yet or is
# gone, e.g. when slurm_up.sh was interrupted while it started them.
signal_instance() {
    local name=$1 pattern=$2 pid
    for pid in $(pgrep -x "$name"); do
        [[ " ${PIDS[*]} " == *" $pid "* ]] && continue
        if tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF -- "$pattern"; then
            kill -TERM "$pid" 2>/dev/null && PIDS+=("$pid") && NAMES+=("$name")
        fi
    done
}

munge_dir=$(cat "$STATE_DIR/munge_dir" 2>/dev/null || true)
signal_pidfile slurmd "$STATE_DIR/slurmd.pid"
signal_pidfile slurmctld "$STATE_DIR/slurmctld.pid"
signal_pidfile munged "$STATE_DIR/munged.pid"
signal_instance slurmd "$STATE_DIR/slurm.conf"
signal_instance slurmctld "$STATE_DIR/slurm.conf"
if [[ $munge_dir == /run/munge/diagode.* ]]; then
    signal_pidfile munged "$munge_dir/munged.pid"
    signal_instance munged "--socket=$munge_dir/"
fi
[[ ${#PIDS[@]} -gt 0 ]] && wait_stopped
# Job step daemons of this instance that outlived it (a step stuck reporting to a dead slurmd),
# and clients left waiting on it (the `sbatch --wait` of a killed test run): processes whose
# environment names this instance's slurm.conf, with their children.
for pid in $(pgrep -x 'slurmstepd|sbatch|srun|salloc'); do
    if tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" \
            | grep -qx "SLURM_CONF=$STATE_DIR/slurm.conf"; then
        log "killing leftover $(cat "/proc/$pid/comm" 2>/dev/null) $pid and its children"
        kill_tree "$pid"
    fi
done
# The private munged's socket directory (see slurm_up.sh).
if [[ $munge_dir == /run/munge/diagode.* ]]; then
    cp "$munge_dir/munged.log" "$STATE_DIR/log/munged.log" 2>/dev/null
    rm -rf "$munge_dir" "$STATE_DIR/munge_dir"
fi
exit 0
