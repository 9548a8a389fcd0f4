#!/usr/bin/env bash
# Start a real single-node SLURM (munged + slurmctld + slurmd) for tests and CI.
#
# Usage: tests/infra/slurm_up.sh [STATE_DIR]
#   STATE_DIR (default $DIAGODE_SLURM_DIR or /tmp/diagode-slurm) receives slurm.conf, the daemons'
#   state, spool, logs and pid files, and env.sh (source it: it exports SLURM_CONF).
#
# Installs Debian's slurm-wlm and munge with apt-get when they are missing, writes a one-node
# slurm.conf (select/cons_tres, proctrack/linuxproc, task/none, no accounting; free ports), starts
# a private munged (own socket) and slurmctld and slurmd by hand (no systemd) as root, and waits
# until `sinfo` shows the node idle. Several instances (state dirs) can run side by side.
# Stop everything with tests/infra/slurm_down.sh STATE_DIR (by pid file); interrupted (INT, TERM,
# HUP) while starting, it runs slurm_down.sh itself.
#
# Exit status: 0 = up; 77 = a prerequisite is missing (not root, no apt-get, install failed):
# callers skip on 77; anything else = the daemons did not come up (a real failure; see the logs).
set -euo pipefail

STATE_DIR=${1:-${DIAGODE_SLURM_DIR:-/tmp/diagode-slurm}}
PARTITION=${DIAGODE_SLURM_PARTITION:-debug}
SKIP=77

log() { printf '[slurm_up %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
skip() { log "SKIP: $*"; exit "$SKIP"; }
now() { date +%s.%N; }
elapsed() { python3 -c "print(f'{$(now) - $1:.1f}')"; }

[[ $(id -u) -eq 0 ]] || skip "not root (SLURM daemons must be started as root)"

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [[ ${#missing[@]} -eq 0 ]] && { log "slurm and munge already installed"; return; }
    command -v apt-get >/dev/null || skip "apt-get not available to install ${missing[*]}"
    local t0; t0=$(now)
    log "apt-get install slurm-wlm munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    # Package scripts try to start services; there is no init system to start them here.
    if ! apt-get install -y -q -o DPkg::Lock::Timeout=300 --no-install-recommends slurm-wlm munge >"$STATE_DIR/apt.log" 2>&1
    then
        log "install failed; refreshing package lists once"
        apt-get update -q >>"$STATE_DIR/apt.log" 2>&1 || skip "apt-get update failed (see $STATE_DIR/apt.log)"
        apt-get install -y -q -o DPkg::Lock::Timeout=300 --no-install-recommends slurm-wlm munge >>"$STATE_DIR/apt.log" 2>&1 \
            || skip "apt-get install slurm-wlm munge failed (see $STATE_DIR/apt.log)"
    fi
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        skip "slurmctld/munged still missing after apt-get install"
    fi
    log "installed in $(elapsed "$t0") s"
}

# pid_alive PIDFILE NAME: the pid file names a live (not zombie) process called NAME.
pid_alive() {
    local pid
    [[ -s $1 ]] && pid=$(cat "$1") && kill -0 "$pid" 2>/dev/null || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]] \
        && [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]]
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

# A private munged for this instance (own socket, pid, log and seed files under /run/munge, which
# user munge owns): no other SLURM or munge user on the host can stop it or be stopped with it.
start_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown -R munge:munge /etc/munge && chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
    MUNGE_DIR=$(mktemp -d /run/munge/diagode.XXXXXX)
    chown munge:munge "$MUNGE_DIR" && chmod 0755 "$MUNGE_DIR"
    MUNGE_SOCKET=$MUNGE_DIR/munge.socket
    echo "$MUNGE_DIR" >"$STATE_DIR/munge_dir"
    runuser -u munge -- /usr/sbin/munged --socket="$MUNGE_SOCKET" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" --num-threads=4
    for _ in $(seq 50); do
        if munge -S "$MUNGE_SOCKET" -n </dev/null 2>/dev/null \
                | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1 && [[ -s $MUNGE_DIR/munged.pid ]]
        then
            cp "$MUNGE_DIR/munged.pid" "$STATE_DIR/munged.pid"
            return
        fi
        sleep 0.1
    done
    log "munged did not come up; its log:"; tail -n 20 "$MUNGE_DIR/munged.log" >&2 || true
    exit 1
}

write_conf() {
    local host cpus mem_mb ctld_port slurmd_port
    host=$(hostname -s)
    # nproc honours OMP_NUM_THREADS, which a parent process (Dask, a test) may have set to 1.
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    # RealMemory must not exceed what slurmd measures, else the node is drained; leave 1 GiB.
    mem_mb=$(awk '/MemAvailable/ {print int($2 / 1024) - 1024}' /proc/meminfo)
    ctld_port=$(free_port)
    slurmd_port=$(free_port)
    mkdir -p "$STATE_DIR"/{state,spool,log}
    cat >"$STATE_DIR/slurm.conf" <<EOF
# Written by tests/infra/slurm_up.sh: one node, no accounting, no cgroups.
ClusterName=diagode
SlurmctldHost=$host
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool/slurmd-%n
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
# Impossible requests are refused at submission instead of pending forever.
EnforcePartLimits=ALL
# Finished jobs leave the controller quickly, so sbatch --wait returns within seconds.
MinJobAge=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
InactiveLimit=0
KillWait=5
SlurmdTimeout=60
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    printf 'export SLURM_CONF=%q\n' "$STATE_DIR/slurm.conf" >"$STATE_DIR/env.sh"
}

wait_idle() {
    local state="" deadline=$((SECONDS + 30))
    while ((SECONDS < deadline)); do
        state=$(timeout 5 sinfo -h -N -p "$PARTITION" -o %t 2>/dev/null | head -1 || true)
        [[ $state == idle ]] && return
        sleep 0.1
    done
    log "node not idle after 30 s (state '$state'); logs in $STATE_DIR/log"
    tail -n 20 "$STATE_DIR/log/slurmctld.log" "$STATE_DIR/log/slurmd.log" >&2 || true
    exit 1
}

mkdir -p "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd)
export SLURM_CONF=$STATE_DIR/slurm.conf

if pid_alive "$STATE_DIR/slurmctld.pid" slurmctld && pid_alive "$STATE_DIR/slurmd.pid" slurmd \
        && pid_alive "$STATE_DIR/munged.pid" munged; then
    log "already running from $STATE_DIR"
    wait_idle
    echo "$SLURM_CONF"
    exit 0
fi

# Interrupted (Ctrl-C, SIGTERM, hang-up) while starting: stop whatever was started already.
# Killed (SIGKILL, no trap): slurm_down.sh finds this script by its pid file and stops it first.
echo $$ >"$STATE_DIR/slurm_up.pid"
stop_started() {
    trap - INT TERM HUP
    rm -f "$STATE_DIR/slurm_up.pid"
    log "interrupted: stopping what was started"
    bash "$(dirname "${BASH_SOURCE[0]}")/slurm_down.sh" "$STATE_DIR"
    exit "$1"
}
trap 'stop_started 130' INT
trap 'stop_started 143' TERM
trap 'stop_started 129' HUP

install_packages
T0=$(now)
start_munge
write_conf
# -c: start with clean state (no jobs left over from an earlier run in the same directory).
slurmctld -c -f "$SLURM_CONF"
slurmd -c -f "$SLURM_CONF"
wait_idle
rm -f "$STATE_DIR/slurm_up.pid"
log "slurm up in $(elapsed "$T0") s: SLURM_CONF=$SLURM_CONF, partition '$PARTITION'"
echo "$SLURM_CONF"
