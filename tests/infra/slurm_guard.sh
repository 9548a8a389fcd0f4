#!/usr/bin/env bash
# Stop a test SLURM instance when the process that started it dies, however it dies.
#
# Usage: tests/infra/slurm_guard.sh PID STATE_DIR
#   Waits while process PID (the test run that owns STATE_DIR) lives, then runs
#   tests/infra/slurm_down.sh STATE_DIR. Start it in a session of its own (setsid), so that a
#   Ctrl-C or a signal to the test run's process group does not reach it; the test run kills it
#   when it has stopped the instance itself. A SIGKILL of the test run leaves no daemon behind.
set -uo pipefail

watched=${1:?usage: slurm_guard.sh PID STATE_DIR}
STATE_DIR=${2:?usage: slurm_guard.sh PID STATE_DIR}

# start time of the process (clock ticks since boot): a reused pid is another process
start_time() { awk '{print $22}' "/proc/$1/stat" 2>/dev/null; }
state() { awk '{print $3}' "/proc/$1/stat" 2>/dev/null; }

started=$(start_time "$watched")
[[ -n $started ]] || started=gone
while [[ $(start_time "$watched") == "$started" && $(state "$watched") != Z ]]; do
    sleep 0.5
done
exec bash "$(dirname "${BASH_SOURCE[0]}")/slurm_down.sh" "$STATE_DIR"
