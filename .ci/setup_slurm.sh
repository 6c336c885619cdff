#!/usr/bin/env bash
# A real single-node Slurm on this host for the submit / requeue tests (tests/test_slurm.py).
# Installs Debian's slurm-wlm + munge, writes a localhost slurm.conf (this host's real CPUs and
# memory, partition `debug`, requeue allowed, no cgroups), starts munged, slurmctld and slurmd
# without systemd, and waits until the node is idle. Idempotent: re-running on a working setup
# only checks it. Needs root. Exits non-zero on failure; CI then runs the rest of the suite.
set -euo pipefail

CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
HOST=$(hostname -s)

die() { echo "setup_slurm: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (installs packages and starts daemons)"

# --- packages -------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends slurm-wlm munge \
    || apt-get install -y -q --no-install-recommends slurmd slurmctld slurm-client munge \
    || die "apt-get could not install slurm-wlm / munge"
fi

# --- munge ----------------------------------------------------------------------------------
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
  if command -v mungekey >/dev/null; then mungekey --create --force --keyfile=/etc/munge/munge.key
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged --force || die "munged did not start (see /var/log/munge/munged.log)"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
  munge -n | unmunge >/dev/null || die "munge credentials do not round-trip"
fi

# The node's name must resolve (torchrun's rendezvous and Ray use it); a bare container may not.
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >>/etc/hosts

# --- slurm.conf -----------------------------------------------------------------------------
# `slurmd -C` prints this host's real topology and memory as a NodeName line.
NODE_LINE=$(slurmd -C | grep '^NodeName=') || die "slurmd -C failed"
NODE_LINE=$(sed -E "s/^NodeName=[^ ]+/NodeName=$HOST NodeAddr=127.0.0.1/; s/ UpTime=.*//" <<<"$NODE_LINE")
mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
NEW_CONF=$(cat <<EOF
# Written by .ci/setup_slurm.sh: single-node test cluster on $HOST.
ClusterName=llada
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire seconds before it may start again (default 120)
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# a test cluster: look at pending jobs every couple of seconds, not every 30-60 s
SchedulerParameters=bf_interval=2,sched_interval=2
JobRequeue=1
ReturnToService=2
# keep finished jobs visible to scontrol show job for an hour (there is no slurmdbd)
MinJobAge=3600
KillWait=30
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=60
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
$NODE_LINE State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
)

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop() {  # stop a daemon we started earlier, by its pid file
  if running "$1"; then
    local pid; pid=$(cat "$1"); kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  fi
  rm -f "$1"
}

if [ ! -f "$CONF_DIR/slurm.conf" ] || [ "$(cat "$CONF_DIR/slurm.conf")" != "$NEW_CONF" ]; then
  printf '%s\n' "$NEW_CONF" >"$CONF_DIR/slurm.conf"
  stop /run/slurmd.pid
  stop /run/slurmctld.pid
fi

# --- daemons --------------------------------------------------------------------------------
running /run/slurmctld.pid || slurmctld || die "slurmctld did not start (see $LOG_DIR/slurmctld.log)"
for _ in $(seq 60); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
scontrol ping | grep -q UP || die "slurmctld is not answering (see $LOG_DIR/slurmctld.log)"
running /run/slurmd.pid || slurmd || die "slurmd did not start (see $LOG_DIR/slurmd.log)"

# --- wait for the node ----------------------------------------------------------------------
for i in $(seq 120); do
  state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1)
  case "$state" in
    idle|mixed|allocated) echo "setup_slurm: node $HOST is $state"; sinfo; exit 0 ;;
    down*|drain*|fail*) [ $((i % 10)) = 1 ] && scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.5
done
sinfo -N -l || true
tail -n 20 "$LOG_DIR/slurmd.log" "$LOG_DIR/slurmctld.log" >&2 || true
die "node $HOST did not become idle"
