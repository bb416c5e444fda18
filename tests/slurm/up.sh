#!/usr/bin/env bash
# Start a private single-node SLURM cluster on 127.0.0.1 for the tests (tests/test_slurm.py), from
# Debian's packages, without systemd. Needs root.
#
# Everything it writes lives under $SLURM_CI_DIR (default /run/weakshot-slurm): its own munge key and
# socket, its own MariaDB data folder and port, its own slurm.conf / slurmdbd.conf, spool, state, logs,
# and free TCP ports. Nothing under /etc is touched, so a SLURM, munge or MariaDB that already runs on the
# machine keeps running undisturbed: commands reach this cluster only with
#     export SLURM_CONF=$SLURM_CI_DIR/etc/slurm.conf      (also written to $SLURM_CI_DIR/env)
#
# Daemons, in start order: munged -> mariadbd -> slurmdbd (accounting, so that `sacct`, the slurm executor
# plugin's default status command, works) -> slurmctld -> slurmd. Each one's PID is appended to
# $SLURM_CI_DIR/pids ("name pid"), and tests/slurm/down.sh stops exactly those.
#
#   NODE_CPUS / NODE_MEM_MB   what the node advertises (default 16 CPUs, 256 GiB): more than the hardware
#                             has, so a real profile's requests fit; jobs are oversubscribed, which is
#                             fine for tests (nothing enforces limits without cgroups).
#   PARTITION                 the one partition's name (default debug).
set -euo pipefail

DIR=${SLURM_CI_DIR:-/run/weakshot-slurm}
NODE_CPUS=${NODE_CPUS:-16}
NODE_MEM_MB=${NODE_MEM_MB:-262144}
PARTITION=${PARTITION:-debug}
export DEBIAN_FRONTEND=noninteractive

die() { echo "slurm up: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (daemons run as root, packages come from apt-get)"

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# The folder is this script's alone: never wipe one it did not make, never start over a running copy.
if [ -e "$DIR" ] && [ ! -e "$DIR/.weakshot-slurm" ]; then
    die "$DIR exists and was not made by this script; set SLURM_CI_DIR to another folder"
fi
if [ -s "$DIR/pids" ]; then
    while read -r name pid; do
        if ours "$name" "$pid"; then
            die "$name ($pid) from an earlier start is still running; run tests/slurm/down.sh first"
        fi
    done < "$DIR/pids"
fi

# --- packages: installed only when missing ----------------------------------------------------------------
packages=(munge mariadb-server slurmdbd slurmctld slurmd slurm-client)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "apt-get not found; install ${missing[*]} yourself"
    echo "installing ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" > "${TMPDIR:-/tmp}/weakshot-slurm-apt.log" 2>&1 \
        || { tail -20 "${TMPDIR:-/tmp}/weakshot-slurm-apt.log" >&2; die "apt-get install failed"; }
fi

# --- folders ----------------------------------------------------------------------------------------------
rm -rf "$DIR"
install -d -m 755 "$DIR"
touch "$DIR/.weakshot-slurm"
install -d -m 755 "$DIR/etc" "$DIR/log" "$DIR/run" "$DIR/spool/slurmd" "$DIR/state"
install -d -m 755 -o munge -g munge "$DIR/munge"
install -d -m 750 -o mysql -g mysql "$DIR/mysql"
: > "$DIR/pids"
# A start that fails half-way stops what it had started.
trap 'status=$?; if [ "$status" != 0 ]; then bash "$(dirname "$0")/down.sh"; fi; exit "$status"' EXIT

start() {  # name, command...: a foreground daemon, detached into its own session
    local name=$1
    shift
    setsid "$@" > "$DIR/log/$name.out" 2>&1 < /dev/null &
    echo "$name $!" >> "$DIR/pids"
}

wait_for() {  # what, command...: retry for up to 30 s
    local what=$1
    shift
    for _ in $(seq 60); do
        if "$@" > /dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    echo "slurm up: timed out waiting for $what; logs in $DIR/log:" >&2
    tail -n 20 "$DIR"/log/* >&2 || true
    return 1
}

port_free() { ! (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null; }
next_port=16817
free_port() {  # sets PORT to the next free port from next_port on
    while ! port_free "$next_port"; do next_port=$((next_port + 1)); done
    PORT=$next_port
    next_port=$((next_port + 1))
}
free_port; CTLD_PORT=$PORT
free_port; SLURMD_PORT=$PORT
free_port; DBD_PORT=$PORT
free_port; DB_PORT=$PORT

# --- munge: a fresh key and a private socket --------------------------------------------------------------
MUNGE_SOCKET=$DIR/munge/munge.socket
dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
chown munge:munge "$DIR/munge/munge.key"
chmod 400 "$DIR/munge/munge.key"
start munged setpriv --reuid=munge --regid=munge --clear-groups \
    /usr/sbin/munged --foreground --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" --seed-file="$DIR/munge/munged.seed" --log-file="$DIR/munge/munged.log"
wait_for munged bash -c "munge --socket='$MUNGE_SOCKET' -n | unmunge --socket='$MUNGE_SOCKET'"

# --- MariaDB: its own data folder, TCP on 127.0.0.1 only ----------------------------------------------------
# --no-defaults: the machine's /etc/mysql settings (socket, data folder) are not ours.
mariadb-install-db --no-defaults --user=mysql --datadir="$DIR/mysql" --skip-test-db \
    --auth-root-authentication-method=socket > "$DIR/log/mariadb-install-db.out" 2>&1 \
    || { tail -20 "$DIR/log/mariadb-install-db.out" >&2; die "mariadb-install-db failed"; }
DB_SOCKET=$DIR/mysql/mariadb.sock
start mariadbd /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DIR/mysql" \
    --socket="$DB_SOCKET" --pid-file="$DIR/mysql/mariadb.pid" --bind-address=127.0.0.1 --port="$DB_PORT" \
    --skip-name-resolve --log-error="$DIR/log/mariadb.log"
wait_for mariadbd mariadb --no-defaults --socket="$DB_SOCKET" -e "select 1"
DB_PASSWORD=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
mariadb --no-defaults --socket="$DB_SOCKET" -e "
    CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASSWORD';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

# --- SLURM configuration ----------------------------------------------------------------------------------
NODE=$(hostname -s)
cat > "$DIR/etc/slurm.conf" << EOF
# Written by tests/slurm/up.sh: one node (this machine, reached over 127.0.0.1), one partition.
ClusterName=weakshotci
SlurmctldHost=${NODE}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=${MUNGE_SOCKET}
CryptoType=crypto/munge
MpiDefault=none
MailProg=/bin/true
# No cgroups in a container: track processes by parent id, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=${DIR}/run/slurmctld.pid
SlurmdPidFile=${DIR}/run/slurmd.pid
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool/slurmd
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=${DBD_PORT}
# With auth/munge this names the munge socket used to talk to slurmdbd (AuthInfo is not used for that).
AccountingStoragePass=${MUNGE_SOCKET}
# Job comments (the slurm executor plugin puts the rule name there) are kept in the accounting database.
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
# Finished jobs stay visible to squeue and scontrol for 10 minutes.
MinJobAge=600
InactiveLimit=0
KillWait=5
SlurmctldTimeout=30
SlurmdTimeout=30
# The node advertises NODE_CPUS and NODE_MEM_MB rather than what slurmd detects.
SlurmdParameters=config_overrides
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${NODE_CPUS} RealMemory=${NODE_MEM_MB} State=UNKNOWN
PartitionName=${PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

# slurmdbd reads slurmdbd.conf from the folder of $SLURM_CONF; it must be private to its user.
cat > "$DIR/etc/slurmdbd.conf" << EOF
AuthType=auth/munge
AuthInfo=socket=${MUNGE_SOCKET}
DbdAddr=127.0.0.1
DbdHost=localhost
DbdPort=${DBD_PORT}
SlurmUser=root
DebugLevel=info
LogFile=${DIR}/log/slurmdbd.log
PidFile=${DIR}/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=${DB_PORT}
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=${DB_PASSWORD}
EOF
chmod 600 "$DIR/etc/slurmdbd.conf"

export SLURM_CONF=$DIR/etc/slurm.conf
# The client commands, wrapped to find this cluster's slurm.conf. Inside a job the slurm executor's job
# step strips every SLURM_* variable (SLURM_CONF too) before it calls srun; a cluster configured under
# /etc needs no such help, this private one does: $DIR/bin goes first on the PATH of the jobs.
install -d "$DIR/bin"
for command in sbatch srun squeue scancel scontrol sinfo sacct sacctmgr sshare; do
    printf '#!/bin/sh\nSLURM_CONF=%s exec /usr/bin/%s "$@"\n' "$SLURM_CONF" "$command" > "$DIR/bin/$command"
    chmod 755 "$DIR/bin/$command"
done
printf 'export SLURM_CONF=%s\nexport PATH=%s:$PATH\n' "$SLURM_CONF" "$DIR/bin" > "$DIR/env"

start slurmdbd /usr/sbin/slurmdbd -D
wait_for slurmdbd sacctmgr --noheader list cluster
start slurmctld /usr/sbin/slurmctld -D -i
wait_for slurmctld scontrol ping
start slurmd /usr/sbin/slurmd -D
wait_for "the node to be idle" bash -c '[ "$(sinfo --noheader --Node --format=%T)" = idle ]'
sinfo

# The PIDs recorded must be the daemons themselves (down.sh stops them by PID).
while read -r name pid; do
    ours "$name" "$pid" || die "recorded PID $pid is not $name; see $DIR/log"
done < "$DIR/pids"
