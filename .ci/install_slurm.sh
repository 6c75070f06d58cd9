#!/usr/bin/env bash
# Install Debian's Slurm and munge so the Slurm integration tests can start a one-node cluster.
# Idempotent: does nothing when sbatch, slurmctld, slurmd and munged are already on PATH.
set -euo pipefail

have_all() {
    local tool
    for tool in sbatch srun scontrol scancel squeue slurmctld slurmd munged; do
        command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || return 1
    done
}

if have_all; then
    echo "install_slurm: slurm-wlm and munge already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# The packages' postinst scripts try to start services; there is no init here, so that part fails
# harmlessly. policy-rc.d tells invoke-rc.d not to try at all.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
$SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null

if ! have_all; then
    echo "install_slurm: slurm-wlm / munge installed but a tool is still missing" >&2
    exit 1
fi
echo "install_slurm: installed slurm-wlm $(dpkg-query -W -f="\${Version}" slurm-wlm)"
