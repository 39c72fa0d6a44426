#!/usr/bin/env bash
# A real SLURM (slurmctld, two slurmd, munge) on this machine, for tests/test_slurm.py and CI: two nodes, distill-0
# and distill-1, each a slurmd of its own on this host (NodeAddr 127.0.0.1, a port each: Debian's slurm-wlm is
# built with multiple-slurmd support), so that `sbatch --nodes=2` runs a real two-node job. Each node offers all
# of this machine's CPUs: a one-node job gets what it got before, and two jobs may share the cores.
#
#   .ci/slurm.sh up      # install slurm-wlm and munge if missing (apt-get, root), start them; prints the
#                        # `export SLURM_CONF=...` line that clients (sbatch, squeue, scontrol) need
#   .ci/slurm.sh down    # cancel the jobs, stop the daemons this script started (by their pid files)
#   .ci/slurm.sh status  # exit 0 and the `export SLURM_CONF=...` line if this cluster answers
#
# Everything lives under $DISTILL_SLURM_DIR (default /tmp/distill-slurm): slurm.conf, controller state, slurmd
# spool, daemon logs (log/). `up` is idempotent: a cluster already up is left as it is. A munged that already
# answers (a system one) is used and left running; one started here is stopped by `down`.
# Jobs run as the submitting user; slurmd must run as root to start them, so `up` needs root.
set -euo pipefail

DIR=${DISTILL_SLURM_DIR:-/tmp/distill-slurm}
CONF=$DIR/slurm.conf
HOST=$(hostname -s)
CTLD_PORT=${DISTILL_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${DISTILL_SLURMD_PORT:-6818}  # and the next port for the second node
NODES=(distill-0 distill-1)
export SLURM_CONF=$CONF

log() { echo "slurm.sh: $*" >&2; }

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

munge_up() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return  # a munged answers already (ours from an earlier `up`, or the system's): use it
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    runuser -u munge -- munged
    for _ in $(seq 50); do
        if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
            cp /run/munge/munged.pid "$DIR/munged.pid"  # started here: `down` stops it
            return
        fi
        sleep 0.1
    done
    log "munged did not answer"
    return 1
}

write_conf() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat >"$CONF" <<EOF
# Written by .ci/slurm.sh: this host as controller and as two compute nodes (a slurmd each, own port).
ClusterName=distill
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
# A requeued job waits out the credential lifetime before it starts again (default 120 s): 10 s for the tests.
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# No cgroups on a test machine or in a container: processes are tracked by parent pid, tasks are not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Look at pending jobs every 2 s (default 60/30 s) so that a requeued job starts soon after it is eligible.
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# Jobs submitted with --requeue (the launch/slurm scripts) may be requeued by \`scontrol requeue\`.
JobRequeue=1
# Finished jobs stay visible to \`scontrol show job\` for 5 minutes (no accounting database here).
MinJobAge=300
# Seconds between a job's SIGTERM and its SIGKILL (time limit, scancel, requeue).
KillWait=30
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=${NODES[0]} NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$SLURMD_PORT CPUs=$(nproc) State=UNKNOWN
NodeName=${NODES[1]} NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + 1)) CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP
EOF
}

running() {
    alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd-${NODES[0]}.pid" && alive "$DIR/slurmd-${NODES[1]}.pid" \
        && scontrol ping 2>/dev/null | grep -q UP
}

status() {
    running || { log "not running ($CONF)"; return 1; }
    echo "export SLURM_CONF=$CONF"
}

up() {
    [[ $(id -u) == 0 ]] || { log "needs root (apt-get; slurmd starts jobs as their users)"; return 1; }
    mkdir -p "$DIR"
    if running && sinfo -h -o %T 2>/dev/null | grep -qxE 'idle|allocated|mixed|completing'; then
        log "already up ($CONF)"
        echo "export SLURM_CONF=$CONF"
        return
    fi
    install
    munge_up
    # A fresh controller state each time: no jobs left over from an earlier cluster.
    down_daemons
    rm -rf "$DIR/state" "$DIR/spool"
    write_conf
    slurmctld -f "$CONF"
    for node in "${NODES[@]}"; do
        mkdir -p "$DIR/spool/$node"
        slurmd -f "$CONF" -N "$node"
    done
    for _ in $(seq 120); do
        if [[ $(sinfo -h -N -o %T 2>/dev/null | grep -cx idle) == "${#NODES[@]}" ]]; then
            log "up: nodes ${NODES[*]} on $HOST, $(nproc) CPUs each, partition debug ($CONF, logs in $DIR/log)"
            echo "export SLURM_CONF=$CONF"
            return
        fi
        sleep 0.5
    done
    log "the nodes did not become idle; last lines of the daemon logs:"
    tail -n 20 "$DIR/log/slurmctld.log" "$DIR"/log/slurmd-*.log >&2 || true
    return 1
}

stop_pid() {  # stop_pid PIDFILE NAME: TERM, then KILL after 10 s; only the process named in that file
    local file=$1 pid
    alive "$file" || { rm -f "$file"; return 0; }
    pid=$(cat "$file")
    kill "$pid"
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$2 ($pid) did not stop; killing it"
        kill -9 "$pid"
    fi
    rm -f "$file"
}

down_daemons() {
    local pidfile
    for pidfile in "$DIR"/slurmd*.pid; do # both nodes' (and a one-node cluster's slurmd.pid of older versions)
        [[ -e $pidfile ]] && stop_pid "$pidfile" slurmd
    done
    stop_pid "$DIR/slurmctld.pid" slurmctld
}

down() {
    if running; then
        scancel --user="$(id -un)" 2>/dev/null || true
        # Give the jobs' steps KillWait to stop before slurmd goes (slurmstepd would otherwise linger).
        for _ in $(seq 70); do
            [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    down_daemons
    if [[ -f $DIR/munged.pid ]]; then
        stop_pid "$DIR/munged.pid" munged
    fi
    log "down"
}

case ${1:-} in
    up) up ;;
    down) down ;;
    status) status ;;
    *)
        echo "usage: $0 up|down|status" >&2
        exit 2
        ;;
esac
