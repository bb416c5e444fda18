# Shared by up.sh and down.sh (sourced; needs $DIR, the cluster's folder).

ours() {  # name, pid: is pid still the daemon `name` started for $DIR (its arguments or SLURM_CONF say so)?
    local cmdline
    [ -r "/proc/$2/cmdline" ] || return 1
    cmdline=$(tr '\0' '\n' < "/proc/$2/cmdline")
    [ "$(basename "$(head -n 1 <<< "$cmdline")")" = "$1" ] || return 1
    grep -qF "$DIR/" <<< "$cmdline" \
        || tr '\0' '\n' < "/proc/$2/environ" 2> /dev/null | grep -qxF "SLURM_CONF=$DIR/etc/slurm.conf"
}
