#!/usr/bin/env bash
# Stop the daemons that infra/rgw-start.sh started, by PID file only: a PID is signalled only
# while /proc says it still runs the expected binary with our ceph.conf, so a reused PID is never
# hit. SIGTERM, up to 10 s grace, then SIGKILL. Memstore data is lost on stop; logs and config
# stay in $RGW_DIR (WIPE=1 deletes the directory).
#
# Env: RGW_DIR=${TMPDIR:-/tmp}/s3blk-rgw (same as rgw-start.sh), WIPE=0
set -uo pipefail
RGW_DIR=${RGW_DIR:-${TMPDIR:-/tmp}/s3blk-rgw}
RUN=$RGW_DIR/run
CONF=$RGW_DIR/ceph.conf

# ours PID BINARY: PID runs BINARY with our config file.
ours() {
  local cmd
  cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline") || return 1
  [[ $cmd == *"$2"* && $cmd == *"$CONF"* ]]
}

for d in rgw:radosgw osd:ceph-osd mgr:ceph-mgr mon:ceph-mon; do
  name=${d%%:*} bin=${d##*:} f=$RUN/${d%%:*}.pid
  [[ -f $f ]] || continue
  pid=$(cat "$f")
  if [[ $pid =~ ^[0-9]+$ ]] && ours "$pid" "$bin"; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 100); do ours "$pid" "$bin" || break; sleep 0.1; done
    if ours "$pid" "$bin"; then
      kill -KILL "$pid" 2>/dev/null
      echo "killed -9 $name ($pid)"
    else
      echo "stopped $name ($pid)"
    fi
  else
    echo "$name ($pid) was not running"
  fi
  rm -f "$f"
done
if [[ ${WIPE:-0} == 1 ]]; then rm -rf "$RGW_DIR" && echo "wiped $RGW_DIR"; fi
exit 0
