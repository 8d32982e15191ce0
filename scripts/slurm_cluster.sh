#!/usr/bin/env bash
# A one-node Slurm cluster on loopback, for tests and for trying profiles/slurm on one
# machine: munged, slurmctld and slurmd run as plain daemons (no systemd) with every
# file they write under BASE_DIR. Slurm's client commands (sbatch, squeue, sinfo) read
# /etc/slurm/slurm.conf, so `start` installs the generated config there, after keeping
# a copy of any file it replaces, and `stop` puts that copy back.
#
#   scripts/slurm_cluster.sh install           apt-get the Debian packages (once)
#   scripts/slurm_cluster.sh start  BASE_DIR   write configs, start the daemons, wait for the node
#   scripts/slurm_cluster.sh status BASE_DIR   the daemons' PIDs and `sinfo` (exit 3 when down)
#   scripts/slurm_cluster.sh stop   BASE_DIR   cancel the cluster's jobs, stop only what start started
#
# Needs root (slurmd starts jobs as their submitting user; /etc/slurm is root's). Slurm's
# ports (6817, 6818) and /etc/slurm are machine-wide: one such cluster per machine.
# Environment: SLURM_SYSCONF (default /etc/slurm/slurm.conf) where client commands look
# for the config; SLURM_PARTITION (default debug) the name of the one partition.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
SYSCONF=${SLURM_SYSCONF:-/etc/slurm/slurm.conf}
PARTITION=${SLURM_PARTITION:-debug}
CTLD_PORT=6817
SLURMD_PORT=6818

die() {
    echo "slurm_cluster: $*" >&2
    exit 1
}
say() { echo "slurm_cluster: $*"; }

usage() {
    sed -n '8,12p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

need_root() {
    [[ $(id -u) -eq 0 ]] || die "run as root: slurmd starts jobs as their submitting user and $SYSCONF belongs to root"
}

cmd_install() {
    need_root
    local missing=()
    for bin in munged slurmctld slurmd sbatch; do
        command -v "$bin" >/dev/null || missing+=("$bin")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        say "already installed: $(slurmctld -V), $(munged -V 2>&1 | head -1)"
        return
    fi
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install Slurm and MUNGE with your package manager"
    say "installing ${PACKAGES[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${PACKAGES[@]}"
}

# --- state of one cluster: everything lives under BASE ------------------------------------

set_paths() {
    [[ -n ${1:-} ]] || usage
    mkdir -p "$1"
    BASE=$(cd "$1" && pwd -P)
    CONF=$BASE/etc/slurm.conf
    KEY=$BASE/etc/munge.key
    SOCKET=$BASE/run/munge/munge.socket.2
    STATE=$BASE/cluster.env
    BACKUP=$BASE/backup/slurm.conf
}

pidfile() { echo "$BASE/run/$1.pid"; }

# The PID in a daemon's PID file, printed only if that process is still the daemon this
# cluster started (same program, our config on its command line), never a recycled PID.
our_pid() {
    local name=$1 file pid
    file=$(pidfile "$name")
    [[ -s $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$BASE/" || return 1
    echo "$pid"
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# --- start ------------------------------------------------------------------------------

check_free() {
    local other
    for name in slurmctld slurmd; do
        if other=$(pgrep -x "$name"); then
            die "a $name is already running (PID $(echo $other | tr '\n' ' ')); this script runs one cluster per machine and will not touch it"
        fi
    done
    for port in $CTLD_PORT $SLURMD_PORT; do
        ! port_busy "$port" || die "port $port on 127.0.0.1 is in use; Slurm needs it"
    done
    # munged refuses a socket whose parent folders cannot be traversed by everyone.
    local dir=$BASE
    while [[ $dir != / ]]; do
        dir=$(dirname "$dir")
        [[ $(stat -c %A "$dir") == ?????????[xt] ]] || die "folder $dir is not traversable by others (o+x); munged refuses a socket below it: choose another BASE_DIR"
    done
    [[ ${#SOCKET} -lt 100 ]] || die "BASE_DIR is too long for a Unix socket path ($SOCKET): choose a shorter one"
}

# CPU layout and memory of this machine, as slurmd itself detects them.
node_line() {
    local detected cpus boards sockets cores threads mem
    detected=$(slurmd -C | head -1)
    field() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<<"$detected"; }
    cpus=$(field CPUs) boards=$(field Boards) sockets=$(field SocketsPerBoard)
    cores=$(field CoresPerSocket) threads=$(field ThreadsPerCore) mem=$(field RealMemory)
    [[ -n $cpus && -n $mem ]] || die "could not read CPUs and RealMemory from 'slurmd -C': $detected"
    # Leave 15% of the memory to the system and the daemons.
    echo "NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus Boards=${boards:-1} SocketsPerBoard=${sockets:-1}" \
        "CoresPerSocket=${cores:-$cpus} ThreadsPerCore=${threads:-1} RealMemory=$((mem * 85 / 100)) State=UNKNOWN"
}

write_conf() {
    cat >"$CONF" <<EOF
# Written by scripts/slurm_cluster.sh: a one-node cluster on loopback, no accounting.
ClusterName=mergemix
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A job without --mem would otherwise get the whole node's memory.
DefMemPerCPU=500
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
# Without accounting, squeue is the only status source: finished jobs must stay visible
# longer than 3 x the executor plugin's first status check (see profiles/slurm).
MinJobAge=300
KillWait=5
MailProg=/bin/true
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/d
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
$(node_line)
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

# Put our config where client commands read it, keeping whatever was there. A file this
# script wrote (its first line says so) is debris of an earlier run that was never
# stopped, not the machine's own config: it is replaced and removed at stop.
install_sysconf() {
    mkdir -p "$(dirname "$SYSCONF")" "$BASE/backup"
    if [[ -e $SYSCONF && $(head -n 1 "$SYSCONF") != "# Written by scripts/slurm_cluster.sh"* ]]; then
        cp -p "$SYSCONF" "$BACKUP"
        echo "HAD_SYSCONF=1" >>"$STATE"
    else
        echo "HAD_SYSCONF=0" >>"$STATE"
    fi
    echo "SYSCONF=$SYSCONF" >>"$STATE"
    cp "$CONF" "$SYSCONF"
    chmod 644 "$SYSCONF"
}

wait_for() {
    local what=$1 seconds=$2
    shift 2
    local t=0
    until "$@" >/dev/null 2>&1; do
        ((t++ < seconds * 4)) || return 1
        sleep 0.25
    done
}

node_idle() { [[ $(sinfo -h -N -n "$NODE" -o %T 2>/dev/null) == idle ]]; }

fail_start() {
    local log
    echo "slurm_cluster: start failed: $1" >&2
    for log in "$BASE"/log/*.log; do
        [[ -s $log ]] && { echo "--- $log (last lines)" >&2; tail -n 15 "$log" >&2; }
    done
    cmd_stop >&2 || true
    exit 1
}

cmd_start() {
    need_root
    for bin in munged mungekey slurmctld slurmd sinfo scontrol squeue scancel; do
        command -v "$bin" >/dev/null || die "'$bin' not found: run 'scripts/slurm_cluster.sh install' first"
    done
    if [[ -e $STATE ]]; then
        for name in munged slurmctld slurmd; do
            ! our_pid "$name" >/dev/null || die "a cluster from $BASE is already running; run 'scripts/slurm_cluster.sh stop $BASE' first"
        done
        die "$STATE is left from a start that was not stopped; run 'scripts/slurm_cluster.sh stop $BASE' to restore what it changed"
    fi
    check_free
    NODE=$(hostname -s)
    [[ -n $NODE ]] || die "hostname -s printed nothing"
    chmod 755 "$BASE"
    mkdir -p "$BASE"/{etc,log,backup,state/ctld,state/d,run/munge}
    chmod 755 "$BASE"/run "$BASE"/run/munge
    echo "BASE=$BASE" >"$STATE"
    trap 'fail_start "interrupted"' INT TERM

    rm -f "$KEY"
    mungekey --create --keyfile="$KEY" >/dev/null || fail_start "mungekey could not create $KEY"
    chmod 400 "$KEY"
    munged --socket="$SOCKET" --key-file="$KEY" --pid-file="$(pidfile munged)" \
        --log-file="$BASE/log/munged.log" --seed-file="$BASE/state/munged.seed" ||
        fail_start "munged did not start"
    wait_for munged 10 bash -c "munge -n -S '$SOCKET' | unmunge -S '$SOCKET'" ||
        fail_start "munged does not answer on $SOCKET"

    write_conf
    install_sysconf
    slurmctld -c -f "$CONF" || fail_start "slurmctld did not start"
    wait_for slurmctld 20 scontrol ping || fail_start "slurmctld does not answer"
    slurmd -f "$CONF" -N "$NODE" || fail_start "slurmd did not start"
    wait_for node 60 node_idle || fail_start "node $NODE did not become idle: $(sinfo -h -N 2>&1)"
    trap - INT TERM

    say "up: $(sinfo -h -N -o '%N %T cpus=%c mem=%mMB partition=%P')"
    say "config $CONF (installed as $SYSCONF), logs in $BASE/log"
    say "stop with: scripts/slurm_cluster.sh stop $BASE"
}

# --- stop -------------------------------------------------------------------------------

stop_daemon() {
    local name=$1 pid t=0
    pid=$(our_pid "$name") || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    while kill -0 "$pid" 2>/dev/null; do
        if ((t++ == 60)); then
            say "$name (PID $pid) ignored SIGTERM for 15 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        ((t < 120)) || { say "$name (PID $pid) is still alive"; return 1; }
        sleep 0.25
    done
    say "stopped $name (PID $pid)"
}

cancel_jobs() {
    local jobs t=0
    our_pid slurmctld >/dev/null || return 0
    jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    [[ -n ${jobs// /} ]] || return 0
    say "cancelling jobs $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    while [[ -n $(squeue -h -t PD,R,CG,S -o %A 2>/dev/null) ]]; do
        ((t++ < 120)) || { say "jobs still listed after 30 s: $(squeue -h 2>&1)"; return 0; }
        sleep 0.25
    done
}

restore_sysconf() {
    local had sysconf
    had=$(sed -n 's/^HAD_SYSCONF=//p' "$STATE")
    sysconf=$(sed -n 's/^SYSCONF=//p' "$STATE")
    [[ -n $had && -n $sysconf ]] || return 0
    if [[ -e $sysconf ]] && ! cmp -s "$sysconf" "$CONF"; then
        say "$sysconf changed since start; leaving it (the previous file is in $BACKUP)"
        return 0
    fi
    if [[ $had == 1 ]]; then
        cp -p "$BACKUP" "$sysconf"
        say "restored $sysconf"
    else
        rm -f "$sysconf"
        say "removed $sysconf (there was none before start)"
    fi
}

cmd_stop() {
    need_root
    if [[ ! -e $STATE ]]; then
        say "nothing started from $BASE"
        return 0
    fi
    cancel_jobs
    local ok=0
    for name in slurmd slurmctld munged; do
        stop_daemon "$name" || ok=1
    done
    restore_sysconf
    [[ $ok -eq 0 ]] || die "some daemons did not stop; $STATE kept"
    rm -f "$STATE"
}

# --- status -----------------------------------------------------------------------------

cmd_status() {
    local up=0 pid
    if [[ ! -e $STATE ]]; then
        say "no cluster started from $BASE"
        return 3
    fi
    for name in munged slurmctld slurmd; do
        if pid=$(our_pid "$name"); then
            say "$name running (PID $pid)"
        else
            say "$name not running"
            up=3
        fi
    done
    [[ $up -eq 0 ]] && sinfo -N -o '%N %T %c %m %P'
    return $up
}

case ${1:-} in
install) cmd_install ;;
start) set_paths "${2:-}" && cmd_start ;;
stop) set_paths "${2:-}" && cmd_stop ;;
status) set_paths "${2:-}" && cmd_status ;;
*) usage ;;
esac
