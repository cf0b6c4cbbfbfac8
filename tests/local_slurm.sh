#!/usr/bin/env bash
# A real single-host SLURM cluster for the tests (tests/test_slurm.py): Debian's slurm-wlm,
# munge, and slurmdbd on mariadb for accounting (without it, submitit cannot see that a job
# crashed). Two slurmd daemons, n1 and n2, act as two nodes. Needs root and apt (Debian 12).
#   tests/local_slurm.sh start   # installs what is missing, starts the daemons (pids in /run)
#   tests/local_slurm.sh stop    # stops the daemons by their pids
set -euo pipefail

stop() {
  for f in /run/slurmd-*.pid /run/slurmctld.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  sleep 1
  for f in /run/slurmdbd.pid /run/lmalign-mariadb.pid /run/munge/munged.pid; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
}

start() {
  export DEBIAN_FRONTEND=noninteractive
  local packages="slurm-wlm munge slurmdbd mariadb-server"
  if ! dpkg -s $packages >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq $packages >/dev/null
  fi
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge /run/mysqld /var/log/slurm \
    /var/spool/lmalign-slurmctld /var/spool/slurmd/n1 /var/spool/slurmd/n2
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chown mysql:mysql /run/mysqld
  runuser -u munge -- /usr/sbin/munged

  /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 >/var/log/lmalign-mariadb.log 2>&1 &
  echo $! >/run/lmalign-mariadb.pid
  for _ in $(seq 120); do mariadb -uroot -e 'select 1' >/dev/null 2>&1 && break; sleep 0.5; done
  # Accounting starts empty on every start: sacct -j <id> reports any older job of the same id
  # (ids restart whenever a cluster's state is new), and submitit would take its state.
  mariadb -uroot -e "DROP DATABASE IF EXISTS lmalign_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost';
    ALTER USER 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    GRANT ALL ON lmalign_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  cat >/etc/slurm/slurmdbd.conf <<'EOF'
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StorageUser=slurm
StoragePass=slurm
StorageLoc=lmalign_acct_db
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
EOF
  chmod 600 /etc/slurm/slurmdbd.conf
  : >/var/log/slurm/slurmdbd.log
  /usr/sbin/slurmdbd
  for _ in $(seq 120); do grep -q "slurmdbd version .* started" /var/log/slurm/slurmdbd.log && break; sleep 0.5; done

  # nproc --all: plain nproc honours OMP_NUM_THREADS, which make test's workers set to 1
  cat >/etc/slurm/slurm.conf <<EOF
ClusterName=lmalign
SlurmctldHost=localhost
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# its own state (job ids go on across restarts), beside its own accounting database
StateSaveLocation=/var/spool/lmalign-slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=$(nproc --all) RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  /usr/sbin/slurmctld
  /usr/sbin/slurmd -N n1
  /usr/sbin/slurmd -N n2
  for _ in $(seq 120); do [ "$(sinfo -h -t idle -o %D 2>/dev/null)" = 2 ] && return 0; sleep 0.5; done
  echo "the two nodes did not become idle:" >&2; sinfo >&2; return 1
}

"$1"
