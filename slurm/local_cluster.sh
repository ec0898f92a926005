#!/usr/bin/env bash
# A real two-node SLURM cluster (n1, n2) on this one machine, with accounting
# (slurmdbd + MariaDB) so that `sacct` works and submitit can see job states.
#
# Usage (as root):
#   slurm/local_cluster.sh start     # install (if needed) + start; idempotent
#   slurm/local_cluster.sh stop      # cancel jobs, stop every daemon it started
#   slurm/local_cluster.sh status    # sinfo + squeue (exit 3 when not running)
#   slurm/local_cluster.sh env       # prints: export SLURM_CONF=...
#   eval "$(slurm/local_cluster.sh env)"
#
# Environment:
#   SLURM_LOCAL_DIR   state directory (default /tmp/llm-launcher-slurm). Must be
#                     traversable by the `mysql` user (MariaDB data lives in it).
#   SLURM_LOCAL_PORT_BASE  base TCP port (default 17000): nodes use BASE+1 and
#                     BASE+2, slurmctld BASE+817, slurmdbd BASE+819, MariaDB BASE+306.
#   SLURM_LOCAL_TIMEOUT    seconds to wait for the cluster to be ready (default 90).
#
# Slurm 22.05 (Debian 12) with AuthType=auth/none: no munge daemon is needed.
set -euo pipefail
# NB: never `cmd | grep -q` here: with pipefail, grep -q exiting early makes cmd die of
# SIGPIPE and the pipeline "fail". Match against captured output instead.

DIR="${SLURM_LOCAL_DIR:-/tmp/llm-launcher-slurm}"
PORT_BASE="${SLURM_LOCAL_PORT_BASE:-17000}"
TIMEOUT="${SLURM_LOCAL_TIMEOUT:-90}"
CLUSTER=llmlocal
ACCOUNT=llmlocal
PARTITION=debug
NODES=(n1 n2)

ETC="$DIR/etc"
RUN="$DIR/run"
LOG="$DIR/log"
MYDIR="$DIR/mysql"            # owned by mysql: data, socket, pid, error log
CONF="$ETC/slurm.conf"
DBD_CONF="$ETC/slurmdbd.conf"
MY_CNF="$ETC/my.cnf"
MY_SOCK="$MYDIR/mysqld.sock"
MY_PID="$MYDIR/mysqld.pid"
CTLD_PID="$RUN/slurmctld.pid"
DBD_PID="$RUN/slurmdbd.pid"
HOSTS_MARK="# llm-launcher-slurm local cluster"
DB_PASS=slurmlocal

CTLD_PORT=$((PORT_BASE + 817))
DBD_PORT=$((PORT_BASE + 819))
MY_PORT=$((PORT_BASE + 306))

PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

export SLURM_CONF="$CONF"

log() { printf '[local_cluster %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (it installs packages, edits /etc/hosts, runs slurmd as root)"; }

# ---------------------------------------------------------------- processes
# A process counts as gone once it is a zombie (PID 1 in some sandboxes reaps late).
proc_alive() { [ -r "/proc/$1/stat" ] && ! awk '{exit ($3 == "Z") ? 0 : 1}' "/proc/$1/stat" 2>/dev/null; }

# pid from a pid file if that process is alive and its command name matches.
alive_pid() {  # alive_pid PIDFILE COMM-REGEX
    local f=$1 re=$2 pid comm
    [ -s "$f" ] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [ -n "$pid" ] && proc_alive "$pid" || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    [[ $comm =~ $re ]] || return 1
    echo "$pid"
}

# kill_pidfiles NAME:PIDFILE:COMM-REGEX ...  -- TERM all, wait (10 s), then KILL.
kill_pidfiles() {
    local spec name f re pid pids=() names=() i
    for spec in "$@"; do
        IFS=: read -r name f re <<<"$spec"
        if pid=$(alive_pid "$f" "$re"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid"); names+=("$name")
        fi
        rm -f "$f"
    done
    [ ${#pids[@]} -eq 0 ] && return 0
    for i in $(seq 1 100); do
        local left=0
        for pid in "${pids[@]}"; do proc_alive "$pid" && left=1; done
        [ $left = 0 ] && break
        sleep 0.1
    done
    for i in "${!pids[@]}"; do
        if proc_alive "${pids[$i]}"; then
            log "${names[$i]} (pid ${pids[$i]}) did not stop after TERM: KILL"
            kill -KILL "${pids[$i]}" 2>/dev/null || true
        fi
        log "stopped ${names[$i]} (pid ${pids[$i]})"
    done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

port_free_or_die() {  # port_free_or_die PORT WHAT
    if port_open "$1"; then
        die "port $1 (for $2) is already in use by another process; another local cluster with a different SLURM_LOCAL_DIR? Stop it or set SLURM_LOCAL_PORT_BASE"
    fi
}

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
    local secs=$1 what=$2 t0=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        if (( SECONDS - t0 >= secs )); then
            return 1
        fi
        sleep 0.5
    done
}

# ---------------------------------------------------------------- install
install_packages() {
    local missing=() p
    for p in "${PKGS[@]}"; do
        [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" == *"install ok installed"* ]] || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # apt-get update only when a package has no install candidate (empty/old lists).
    local need_update=0
    for p in "${missing[@]}"; do
        [[ "$(apt-cache policy "$p" 2>/dev/null || true)" =~ Candidate:\ [0-9] ]] || need_update=1
    done
    if [ $need_update = 1 ]; then
        log "apt-get update"
        apt-get update -qq
    fi
    # Keep apt from starting the services (we run our own instances).
    local created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    local rc=0
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >"${TMPDIR:-/tmp}/llm-launcher-slurm-apt.log" 2>&1 || rc=$?
    if [ $rc -ne 0 ] && [ $need_update = 0 ]; then
        log "install failed; retrying after apt-get update"
        apt-get update -qq
        rc=0
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >"${TMPDIR:-/tmp}/llm-launcher-slurm-apt.log" 2>&1 || rc=$?
    fi
    [ $created_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
    if [ $rc -ne 0 ]; then
        tail -n 30 "${TMPDIR:-/tmp}/llm-launcher-slurm-apt.log" >&2
        die "apt-get install failed (log: ${TMPDIR:-/tmp}/llm-launcher-slurm-apt.log)"
    fi
}

# ---------------------------------------------------------------- config
write_if_changed() {  # write_if_changed FILE MODE  (content on stdin); returns 0 if changed
    local f=$1 mode=$2 tmp
    tmp=$(mktemp "$f.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [ -f "$f" ] && cmp -s "$tmp" "$f"; then
        rm -f "$tmp"
        return 1
    fi
    mv -f "$tmp" "$f"
    return 0
}

CONF_CHANGED=0 DBD_CONF_CHANGED=0 MY_CNF_CHANGED=0
write_configs() {
    mkdir -p "$ETC" "$RUN" "$LOG" "$DIR/state" "$MYDIR"
    chmod 755 "$DIR" "$ETC" "$RUN" "$LOG"
    local n
    for n in "${NODES[@]}"; do mkdir -p "$DIR/spool/$n"; done

    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # (nproc obeys OMP_NUM_THREADS, which tests set to 1)
    # RealMemory a bit below the machine's memory (slurmd drains a node that
    # reports less memory than configured).
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)

    {
        cat <<EOF
# Generated by slurm/local_cluster.sh -- do not edit (rewritten on start).
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
JobRequeue=1
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
EOF
        local i=0
        for n in "${NODES[@]}"; do
            i=$((i + 1))
            echo "NodeName=$n NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT_BASE + i)) CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
        done
        echo "PartitionName=$PARTITION Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES OverSubscribe=YES MaxTime=INFINITE State=UP"
    } | write_if_changed "$CONF" 644 && CONF_CHANGED=1

    # slurmdbd refuses a config readable by others.
    write_if_changed "$DBD_CONF" 600 <<EOF && DBD_CONF_CHANGED=1 || true
# Generated by slurm/local_cluster.sh -- do not edit (rewritten on start).
AuthType=auth/none
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DBD_PID
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MY_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF

    write_if_changed "$MY_CNF" 644 <<EOF && MY_CNF_CHANGED=1 || true
# Generated by slurm/local_cluster.sh
[mysqld]
user=mysql
datadir=$MYDIR/data
socket=$MY_SOCK
pid-file=$MY_PID
log-error=$MYDIR/mysqld.err
port=$MY_PORT
bind-address=127.0.0.1
skip-name-resolve
innodb_buffer_pool_size=256M
innodb_log_file_size=64M
innodb_lock_wait_timeout=900
[client]
socket=$MY_SOCK
port=$MY_PORT
EOF
}

# ---------------------------------------------------------------- daemons
mysql_cli() { mariadb --defaults-file="$MY_CNF" -uroot "$@"; }

start_mariadb() {
    if alive_pid "$MY_PID" '^(mariadbd|mysqld)$' >/dev/null; then
        log "MariaDB already running"
        return 0
    fi
    port_free_or_die "$MY_PORT" MariaDB
    chown -R mysql:mysql "$MYDIR"
    if ! runuser -u mysql -- test -w "$MYDIR"; then
        die "user mysql cannot write $MYDIR: SLURM_LOCAL_DIR must be in a directory that others may traverse (e.g. under /tmp)"
    fi
    local fresh=0
    if [ ! -d "$MYDIR/data/mysql" ]; then
        log "initialising MariaDB datadir"
        rm -rf "$MYDIR/data"
        mariadb-install-db --defaults-file="$MY_CNF" --user=mysql --skip-test-db \
            --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 \
            || { tail -n 20 "$LOG/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
        fresh=1
    fi
    rm -f "$MY_SOCK" "$MY_PID"
    log "starting MariaDB (port $MY_PORT)"
    setsid mariadbd --defaults-file="$MY_CNF" </dev/null >>"$LOG/mariadbd.out" 2>&1 &
    if ! wait_for 60 mariadb mariadb-admin --defaults-file="$MY_CNF" -uroot ping; then
        tail -n 20 "$MYDIR/mysqld.err" >&2 || true
        die "MariaDB did not come up (log: $MYDIR/mysqld.err)"
    fi
    # (Re)create the slurm DB user every time: cheap, and repairs a half-done setup.
    mysql_cli <<EOF
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
    [ $fresh = 1 ] && log "MariaDB initialised"
    return 0
}

start_slurmdbd() {
    if alive_pid "$DBD_PID" '^slurmdbd$' >/dev/null; then
        log "slurmdbd already running"
        return 0
    fi
    port_free_or_die "$DBD_PORT" slurmdbd
    log "starting slurmdbd (port $DBD_PORT)"
    slurmdbd >>"$LOG/slurmdbd.out" 2>&1 </dev/null \
        || { tail -n 20 "$LOG/slurmdbd.log" >&2 || true; die "slurmdbd failed to start"; }
    if ! wait_for 60 slurmdbd port_open "$DBD_PORT"; then
        tail -n 20 "$LOG/slurmdbd.log" >&2 || true
        die "slurmdbd did not open port $DBD_PORT (log: $LOG/slurmdbd.log)"
    fi
}

register_accounting() {
    # Cluster first (slurmctld registers itself against it), then an account and
    # the users that will submit, so jobs are accepted even with enforcement on.
    if ! grep -qx "$CLUSTER" <<<"$(sacctmgr -n -P show cluster format=cluster 2>/dev/null || true)"; then
        log "registering cluster $CLUSTER in accounting"
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
    if ! grep -qx "$ACCOUNT" <<<"$(sacctmgr -n -P show account format=account 2>/dev/null || true)"; then
        sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description=local organization=local >/dev/null
    fi
    local u users=(root)
    [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ] && users+=("$SUDO_USER")
    for u in "${users[@]}"; do
        if ! grep -qx "$u" <<<"$(sacctmgr -n -P show assoc where user="$u" cluster="$CLUSTER" format=user 2>/dev/null || true)"; then
            sacctmgr -i add user "$u" account="$ACCOUNT" cluster="$CLUSTER" >/dev/null
        fi
    done
}

start_slurmctld() {
    if alive_pid "$CTLD_PID" '^slurmctld$' >/dev/null; then
        log "slurmctld already running"
        return 0
    fi
    port_free_or_die "$CTLD_PORT" slurmctld
    log "starting slurmctld (port $CTLD_PORT)"
    slurmctld -f "$CONF" >>"$LOG/slurmctld.out" 2>&1 </dev/null \
        || { tail -n 20 "$LOG/slurmctld.log" >&2 || true; die "slurmctld failed to start"; }
}

start_slurmd() {
    local n=$1
    if alive_pid "$RUN/slurmd-$n.pid" '^slurmd$' >/dev/null; then
        log "slurmd $n already running"
        return 0
    fi
    log "starting slurmd $n"
    slurmd -f "$CONF" -N "$n" >>"$LOG/slurmd-$n.out" 2>&1 </dev/null \
        || { tail -n 20 "$LOG/slurmd-$n.log" >&2 || true; die "slurmd $n failed to start"; }
}

hosts_add() {
    grep -qF "$HOSTS_MARK" /etc/hosts && return 0
    log "adding '127.0.0.1 ${NODES[*]}' to /etc/hosts"
    printf '127.0.0.1 %s %s\n' "${NODES[*]}" "$HOSTS_MARK" >>/etc/hosts
}

hosts_remove() {
    grep -qF "$HOSTS_MARK" /etc/hosts || return 0
    local tmp
    tmp=$(mktemp)
    grep -vF "$HOSTS_MARK" /etc/hosts >"$tmp" || true
    # Rewrite in place (not mv): /etc/hosts may be a bind mount.
    cat "$tmp" >/etc/hosts
    rm -f "$tmp"
    log "removed the local-cluster line from /etc/hosts"
}

nodes_idle() {
    local out
    out=$(sinfo -h -N -p "$PARTITION" -o '%N %t' 2>/dev/null) || return 1
    local n
    for n in "${NODES[@]}"; do
        grep -Eq "^$n (idle|mix|alloc)\$" <<<"$out" || return 1
    done
}

slurm_running() { alive_pid "$CTLD_PID" '^slurmctld$' >/dev/null; }

# ---------------------------------------------------------------- commands
cmd_start() {
    need_root
    local t0=$SECONDS
    install_packages
    write_configs
    # Already running with an older configuration: restart what it concerns.
    if [ $CONF_CHANGED = 1 ] && slurm_running; then
        log "slurm.conf changed: restarting slurmctld and slurmd"
        stop_slurm_daemons
    fi
    if [ $((DBD_CONF_CHANGED + MY_CNF_CHANGED)) -gt 0 ]; then
        kill_pidfiles "slurmdbd:$DBD_PID:^slurmdbd\$"
    fi
    if [ $MY_CNF_CHANGED = 1 ]; then
        kill_pidfiles "MariaDB:$MY_PID:^(mariadbd|mysqld)\$"
    fi
    hosts_add
    start_mariadb
    start_slurmdbd
    register_accounting
    start_slurmctld
    local n
    for n in "${NODES[@]}"; do start_slurmd "$n"; done

    local t1=$SECONDS resumed=0
    until nodes_idle; do
        if (( SECONDS - t1 >= TIMEOUT )); then
            sinfo -N >&2 || true
            die "nodes not idle after ${TIMEOUT}s (logs: $LOG)"
        fi
        # Nodes left DOWN/DRAIN by an earlier run: resume them once.
        if (( resumed == 0 && SECONDS - t1 >= 5 )) \
            && grep -Eq '^(down|drain|drng|fail)' <<<"$(sinfo -h -N -o '%t' 2>/dev/null || true)"; then
            scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=resume >/dev/null 2>&1 || true
            resumed=1
        fi
        sleep 0.5
    done
    wait_for "$TIMEOUT" sacct sacct -n -X -S now-1minute || die "sacct does not answer (log: $LOG/slurmdbd.log)"
    log "cluster ready in $((SECONDS - t0)) s"
    sinfo >&2
    cat <<EOF

Local SLURM cluster '$CLUSTER' is up (nodes: ${NODES[*]}, partition: $PARTITION).
Use it from a shell with:
    export SLURM_CONF=$CONF
or: eval "\$($0 env)"
then e.g.  srun -N2 -n2 hostname ; sbatch ... ; sacct
Stop it with: $0 stop
EOF
}

cancel_jobs() {
    slurm_running || return 0
    local ids
    ids=$(squeue -h -o %i 2>/dev/null || true)
    [ -z "$ids" ] && return 0
    log "cancelling jobs: $(echo $ids)"
    # shellcheck disable=SC2086
    scancel $ids 2>/dev/null || true
    local t0=$SECONDS
    while [ -n "$(squeue -h -o %i 2>/dev/null || true)" ] && (( SECONDS - t0 < 20 )); do sleep 0.5; done
}

# slurmstepd processes outlive slurmd by design; kill only those that belong to
# this cluster (their environment carries our SLURM_CONF).
kill_our_stepds() {
    local p pids=()
    for p in /proc/[0-9]*; do
        [ "$(cat "$p/comm" 2>/dev/null)" = slurmstepd ] || continue
        grep -qxF "SLURM_CONF=$CONF" <<<"$(tr '\0' '\n' <"$p/environ" 2>/dev/null || true)" || continue
        pids+=("${p#/proc/}")
    done
    [ ${#pids[@]} -eq 0 ] && return 0
    log "killing leftover slurmstepd: ${pids[*]}"
    kill -KILL "${pids[@]}" 2>/dev/null || true
}

stop_slurm_daemons() {
    local n specs=()
    for n in "${NODES[@]}"; do specs+=("slurmd $n:$RUN/slurmd-$n.pid:^slurmd\$"); done
    kill_pidfiles "${specs[@]}" "slurmctld:$CTLD_PID:^slurmctld\$"
    kill_our_stepds
}

cmd_stop() {
    need_root
    cancel_jobs
    stop_slurm_daemons
    kill_pidfiles "slurmdbd:$DBD_PID:^slurmdbd\$"
    kill_pidfiles "MariaDB:$MY_PID:^(mariadbd|mysqld)\$"
    hosts_remove
    log "stopped"
}

cmd_status() {
    if ! slurm_running; then
        echo "local SLURM cluster is not running (state dir: $DIR)"
        return 3
    fi
    echo "SLURM_CONF=$CONF"
    sinfo
    echo
    squeue
}

cmd_env() { echo "export SLURM_CONF=$CONF"; }

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) echo "usage: $0 {start|stop|status|env}" >&2; exit 2 ;;
esac
