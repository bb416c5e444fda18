#!/usr/bin/env bash
# Stop the SLURM cluster that tests/slurm/up.sh started: cancel its jobs, then stop exactly the daemons
# listed in $SLURM_CI_DIR/pids, newest first, by PID. A PID whose process is no longer the daemon it was
# recorded for (it exited and the number was reused) is left alone; nothing is stopped by name. Logs,
# configuration and SLURM's state stay in $SLURM_CI_DIR for inspection; the MariaDB data folder goes.
set -uo pipefail

DIR=${SLURM_CI_DIR:-/run/weakshot-slurm}
[ -s "$DIR/pids" ] || exit 0

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Jobs still queued or running (a test that timed out) are cancelled while slurmctld is still up.
if grep -q '^slurmctld ' "$DIR/pids" && [ -f "$DIR/etc/slurm.conf" ]; then
    SLURM_CONF=$DIR/etc/slurm.conf timeout 20 scancel --user=root > /dev/null 2>&1 || true
fi

status=0
while read -r name pid; do
    if ! ours "$name" "$pid"; then
        continue
    fi
    kill -TERM "$pid"
    for _ in $(seq 40); do
        ours "$name" "$pid" || break
        sleep 0.25
    done
    if ours "$name" "$pid"; then
        echo "slurm down: $name ($pid) ignored SIGTERM for 10 s; sending SIGKILL" >&2
        kill -KILL "$pid"
        sleep 0.5
    fi
    if ours "$name" "$pid"; then
        echo "slurm down: could not stop $name ($pid)" >&2
        status=1
    else
        echo "stopped $name ($pid)"
    fi
done < <(tac "$DIR/pids")

if [ "$status" = 0 ]; then
    rm -f "$DIR/pids"
    rm -rf "$DIR/mysql"  # the accounting database: the bulk of the folder (up.sh makes a new one)
fi
exit "$status"
