#!/usr/bin/env bash
# A throw-away single-node Slurm cluster for tests, without systemd and
# without touching /etc: munged, slurmctld and slurmd run as root from a
# private folder, with their own munge key, socket, config and ports.
#
#   testcluster.sh up DIR     start it (prints the SLURM_CONF line to export)
#   testcluster.sh down DIR   cancel its jobs, stop the daemons it started (by
#                             the PIDs it recorded, after checking each name)
#
# Every Slurm command must see SLURM_CONF=DIR/slurm.conf; jobs inherit it.
# Needs root and the Debian packages slurm-wlm and munge (or the same
# daemons on PATH). Settings (environment):
#   TESTCLUSTER_CPUS  CPUs the node advertises (default 4, more than the
#                     machine has, so a coordinator and a few workers run
#                     side by side)
#   TESTCLUSTER_GPUS  fake GPUs (character devices) for --gres=gpu tests
#                     (default 0)
#   TESTCLUSTER_MEM_MB  memory the node advertises (default 65536; only
#                     checked against --mem, never enforced)
set -euo pipefail

usage() {
    echo "usage: $0 up|down DIR" >&2
    exit 2
}
[[ $# -eq 2 ]] || usage
action=$1
dir=$2

log() { echo "testcluster: $*" >&2; }

# Whether PID is a live process named NAME (a zombie counts as gone: PID 1
# here may reap late).
is_alive() {
    local pid=$1 name=$2 stat comm
    [[ -r /proc/$pid/stat ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$name" ]] || return 1
    # Field 3, after the parenthesised command name, is the state.
    [[ ${stat##*) } != Z* ]]
}

# A free TCP port on 127.0.0.1 in [lo, hi), skipping the ones given.
free_port() {
    local lo=$1 hi=$2 port taken
    shift 2
    for _ in $(seq 1 200); do
        port=$((lo + RANDOM % (hi - lo)))
        taken=0
        for other in "$@"; do [[ $port == "$other" ]] && taken=1; done
        ((taken)) && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    log "no free port found in $lo..$hi"
    return 1
}

# Waits up to $1 tenths of a second for the command in "$@" to succeed.
poll() {
    local tenths=$1
    shift
    for _ in $(seq 1 "$tenths"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    "$@"
}

node_is_idle() {
    local out
    # Captured first: a pipe into grep -q can kill sinfo with SIGPIPE.
    out=$(sinfo -h -N -o '%T' 2>/dev/null) || return 1
    [[ $out == idle* || $out == mixed* ]]
}

up() {
    [[ $(id -u) == 0 ]] || { log "must run as root"; exit 1; }
    for tool in munged slurmctld slurmd sinfo; do
        command -v "$tool" >/dev/null || {
            log "$tool not found: apt-get install slurm-wlm munge"
            exit 1
        }
    done
    if [[ -e $dir/slurm.conf ]]; then
        log "$dir already holds a cluster; run '$0 down $dir' first"
        exit 1
    fi

    # A failed start stops whatever it had started.
    trap 'log "start failed; stopping what was started"; down' ERR

    local cpus=${TESTCLUSTER_CPUS:-4} gpus=${TESTCLUSTER_GPUS:-0}
    local mem_mb=${TESTCLUSTER_MEM_MB:-65536}
    install -d -m 700 "$dir" "$dir/munge" "$dir/state" "$dir/spool" "$dir/log"
    dir=$(cd "$dir" && pwd)

    # munge: own key, socket and files, so a system munged is left alone.
    mungekey --create --keyfile="$dir/munge/munge.key" --bits=1024
    chmod 400 "$dir/munge/munge.key"
    munged --force \
        --socket="$dir/munge/munge.socket" \
        --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" \
        --log-file="$dir/log/munged.log" \
        --seed-file="$dir/munge/munged.seed"
    poll 50 test -s "$dir/munge/munged.pid"
    poll 50 munge -S "$dir/munge/munge.socket" -n

    local ctld_port slurmd_port
    ctld_port=$(free_port 20000 30000)
    slurmd_port=$(free_port 20000 30000 "$ctld_port")

    local gres_line=""
    if ((gpus > 0)); then
        # Slurm rejects GPUs without device files and regular files: fake
        # them with character devices (the same numbers as /dev/null).
        install -d "$dir/dev"
        for i in $(seq 0 $((gpus - 1))); do
            mknod "$dir/dev/fakegpu$i" c 1 3
        done
        echo "Name=gpu File=$dir/dev/fakegpu[0-$((gpus - 1))]" >"$dir/gres.conf"
        gres_line="Gres=gpu:$gpus"
    fi

    cat >"$dir/slurm.conf" <<EOF
# Written by deploy/slurm/testcluster.sh: a single-node test cluster.
ClusterName=rotsweeptest
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
# Schedule at once instead of the default seconds-long batching.
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1,sched_min_interval=100000
# Let the node advertise more CPUs than the machine has.
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
KillWait=30
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb $gres_line State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF=$dir/slurm.conf

    slurmctld -f "$SLURM_CONF"
    poll 100 test -s "$dir/slurmctld.pid"
    poll 100 scontrol ping
    slurmd -f "$SLURM_CONF" -N localhost
    poll 100 test -s "$dir/slurmd.pid"
    if ! poll 200 node_is_idle; then
        log "the node did not come up; last lines of the logs:"
        tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
        down
        exit 1
    fi
    trap - ERR
    log "up: $cpus CPUs, $gpus GPUs, slurmctld on 127.0.0.1:$ctld_port"
    echo "export SLURM_CONF=$SLURM_CONF"
}

# Sends SIGTERM to the daemon in PIDFILE if it is alive and named NAME, then
# waits for it (SIGKILL after 10 s).
stop_daemon() {
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 0
    pid=$(<"$pidfile")
    if ! is_alive "$pid" "$name"; then
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        is_alive "$pid" "$name" || return 0
        sleep 0.1
    done
    log "$name ($pid) ignored SIGTERM; killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

down() {
    if [[ ! -e $dir/munge/munged.pid && ! -e $dir/slurmctld.pid && ! -e $dir/slurmd.pid ]]; then
        log "nothing to stop in $dir"
        return 0
    fi
    dir=$(cd "$dir" && pwd)
    export SLURM_CONF=$dir/slurm.conf

    # Jobs first: slurmstepd outlives a stopped slurmd.
    if [[ -e $SLURM_CONF ]] &&
        is_alive "$(cat "$dir/slurmctld.pid" 2>/dev/null || echo 0)" slurmctld; then
        scancel --full --quiet --user=root 2>/dev/null || true
        for _ in $(seq 1 150); do
            local queue
            queue=$(squeue -h -o %i 2>/dev/null) || break
            [[ -z $queue ]] && break
            sleep 0.2
        done
    fi
    stop_daemon "$dir/slurmd.pid" slurmd
    stop_daemon "$dir/slurmctld.pid" slurmctld
    stop_daemon "$dir/munge/munged.pid" munged
    rm -f "$SLURM_CONF" "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"
    log "down"
}

case $action in
    up) up ;;
    down) down ;;
    *) usage ;;
esac
