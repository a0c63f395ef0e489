#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine (for CI and for trying the slurm profile):
#
#   bash scripts/local_slurm.sh start    # install slurm-wlm and munge if missing, start munged, slurmctld, slurmd
#   bash scripts/local_slurm.sh status   # the daemons' PIDs and sinfo
#   bash scripts/local_slurm.sh stop     # cancel its jobs, stop the daemons it started (by their recorded PIDs)
#
# Needs root (apt-get, munged as the munge user, slurmd); re-runs itself with `sudo -n` otherwise.
# Everything lives in $KEYRED_SLURM_DIR (default /tmp/keyred-slurm): slurm.conf, gres.conf, the
# munge key and socket, the controller's state, logs and the daemons' PID files. The one thing
# outside it is the link /etc/slurm/slurm.conf -> that slurm.conf (created only where no
# slurm.conf exists, removed by stop): clients inside jobs need the default location, because
# the Snakemake SLURM job step drops SLURM_* variables such as SLURM_CONF before it calls srun.
# No system service is touched.
# The cluster: one node (this machine, 127.0.0.1) in partition `debug` (the default), all CPUs,
# memory below what `slurmd -C` detects, a fake GPU (Gres=gpu:1 backed by /dev/null) so that GPU
# requests are schedulable, ProctrackType=proctrack/linuxproc, TaskPlugin=task/none,
# SelectType=select/cons_tres and no accounting database (sacct does not work; the slurm
# profile's squeue status command does).
set -euo pipefail

state="$(realpath -m "${KEYRED_SLURM_DIR:-/tmp/keyred-slurm}")"
conf="$state/slurm.conf"
system_conf=/etc/slurm/slurm.conf   # where SLURM clients look without SLURM_CONF
pids="$state/pids"            # "<name> <pid>" per daemon this script started
partition=debug
ctld_port="${KEYRED_SLURM_PORT:-6817}"   # slurmctld; slurmd listens on the next port

log() { echo "[local_slurm] $*" >&2; }

as_root() {
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
            exec sudo -n --preserve-env=KEYRED_SLURM_DIR,KEYRED_SLURM_PORT bash "$0" "$@"
        fi
        log "needs root (apt-get, munged, slurmd) and sudo -n is not available"
        exit 1
    fi
}

install_packages() {
    local missing=()
    command -v munged >/dev/null || [ -x /usr/sbin/munged ] || missing+=(munge)
    for program in slurmctld slurmd sbatch; do
        command -v "$program" >/dev/null || [ -x "/usr/sbin/$program" ] || { missing+=(slurm-wlm); break; }
    done
    [ ${#missing[@]} -eq 0 ] && return
    log "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    }
}

# The PID recorded for daemon $1 when that process is still the daemon ($2: its program name).
running_pid() {
    local pid
    pid="$(awk -v name="$1" '$1 == name {print $2}' "$pids" 2>/dev/null || true)"
    [ -n "$pid" ] && [ -d "/proc/$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] && echo "$pid"
    return 0
}

# Record daemon $1's PID once it has written its PID file $2 (30 s at most; $3: its log).
record() {
    for _ in $(seq 300); do
        if [ -s "$2" ]; then
            echo "$1 $(cat "$2")" >> "$pids"
            return
        fi
        sleep 0.1
    done
    log "$1 did not start (no $2); its log $3:"
    tail -20 "$3" >&2 || true
    exit 1
}

write_config() {
    local node cpus memory detected
    node="$(hostname -s)"
    cpus="$(nproc)"
    detected="$(/usr/sbin/slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)"
    memory=$(( detected * 9 / 10 ))   # below what slurmd detects, or the node is drained
    mkdir -p "$state/slurmctld" "$state/slurmd"
    cat > "$conf" <<EOF
# Single-node test cluster written by scripts/local_slurm.sh; do not edit (rewritten at each start).
ClusterName=keyred
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$(( ctld_port + 1 ))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$state/munge/munge.socket
StateSaveLocation=$state/slurmctld
SlurmdSpoolDir=$state/slurmd
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory Gres=gpu:1 State=UNKNOWN
PartitionName=$partition Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    echo "NodeName=$node Name=gpu File=/dev/null" > "$state/gres.conf"
}

start() {
    as_root start
    if [ -n "$(running_pid munged munged)" ] && [ -n "$(running_pid slurmctld slurmctld)" ] \
            && [ -n "$(running_pid slurmd slurmd)" ]; then
        log "already running (state in $state)"
        return
    fi
    if [ -f "$pids" ]; then
        stop   # what is left of an earlier start
    fi
    if [ -e "$state" ] && [ ! -f "$conf" ] && [ -n "$(ls -A "$state")" ]; then
        log "$state is not empty and holds no slurm.conf of this script: set KEYRED_SLURM_DIR to another folder"
        exit 1
    fi
    local begin=$SECONDS
    install_packages
    if [ -e "$system_conf" ] && [ "$(readlink "$system_conf")" != "$conf" ]; then
        log "$system_conf exists: this machine already belongs to a cluster; not starting another"
        exit 1
    fi
    rm -rf "$state"
    mkdir -p "$state/munge"
    : > "$pids"
    write_config
    mkdir -p "$(dirname "$system_conf")"
    ln -sfn "$conf" "$system_conf"

    # munged as the munge user, with its own key, socket and logs in $state/munge.
    chown munge:munge "$state/munge"
    chmod 0711 "$state/munge"   # munged wants its socket folder searchable by everyone
    runuser -u munge -- sh -c "dd if=/dev/urandom bs=1024 count=1 2>/dev/null > '$state/munge/munge.key'"
    chmod 0400 "$state/munge/munge.key"
    runuser -u munge -- /usr/sbin/munged --socket="$state/munge/munge.socket" \
        --key-file="$state/munge/munge.key" --pid-file="$state/munge/munged.pid" \
        --log-file="$state/munge/munged.log" --seed-file="$state/munge/munged.seed"
    record munged "$state/munge/munged.pid" "$state/munge/munged.log"

    # slurmctld and slurmd from one slurm.conf; each daemonizes and writes its PID file.
    /usr/sbin/slurmctld -f "$conf"
    record slurmctld "$state/slurmctld.pid" "$state/slurmctld.log"
    /usr/sbin/slurmd -f "$conf" -N "$(hostname -s)"
    record slurmd "$state/slurmd.pid" "$state/slurmd.log"

    for _ in $(seq 120); do
        if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
            log "cluster up in $(( SECONDS - begin )) s: partition $partition, node $(hostname -s)" \
                "($(nproc) CPUs, fake gpu:1); state and logs in $state"
            return
        fi
        sleep 0.5
    done
    log "the node did not become idle within 60 s; see $state/slurmctld.log and $state/slurmd.log"
    sinfo -N -l >&2 || true
    exit 1
}

stop() {
    as_root stop
    if [ ! -f "$pids" ]; then
        log "nothing to stop (no $pids)"
        return
    fi
    if [ -n "$(running_pid slurmctld slurmctld)" ]; then
        local jobs
        jobs="$(squeue -h -o %i 2>/dev/null || true)"
        if [ -n "$jobs" ]; then
            log "cancelling jobs $(echo $jobs)"
            # shellcheck disable=SC2086
            scancel $jobs || true
            sleep 2
        fi
    fi
    local name pid
    for name in slurmd slurmctld munged; do
        pid="$(running_pid "$name" "$name")"
        [ -z "$pid" ] && continue
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
        if [ -d "/proc/$pid" ]; then kill -KILL "$pid" 2>/dev/null || true; fi
        log "stopped $name (pid $pid)"
    done
    rm -f "$pids"
    if [ -L "$system_conf" ] && [ "$(readlink "$system_conf")" = "$conf" ]; then
        rm -f "$system_conf"
        log "removed the link $system_conf"
    fi
}

status() {
    local name pid up=0
    for name in munged slurmctld slurmd; do
        pid="$(running_pid "$name" "$name")"
        if [ -n "$pid" ]; then echo "$name: running (pid $pid)"; up=$(( up + 1 )); else echo "$name: not running"; fi
    done
    [ "$up" -eq 3 ] && sinfo
    [ "$up" -eq 3 ]
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: bash scripts/local_slurm.sh start|stop|status" >&2; exit 2 ;;
esac
