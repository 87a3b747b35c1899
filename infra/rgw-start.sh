#!/usr/bin/env bash
# Start a real S3 server for s3blk's tests: a one-node Ceph cluster (mon + one memstore OSD,
# optionally mgr) and the RADOS Gateway on 127.0.0.1:7480, then create one bucket.
#
# Usage:   eval "$(bash infra/rgw-start.sh)"     # exports S3_* and AWS_* for the S3 user "test"
#          bash infra/rgw-stop.sh                # stops the daemons by PID file
#
# Why Ceph and not a mock: s3blk relies on conditional PUTs (If-None-Match / If-Match), ranged
# GETs, DeleteObjects and ETags behaving like a real server; RGW does (infra/README.md lists
# where it differs from AWS).
#
# stdout carries only `export NAME=value` lines, so `eval` is safe; progress goes to stderr.
# Idempotent: if our gateway already answers, it only (re)creates the bucket and prints the
# settings. Otherwise it stops our leftovers (by PID file), wipes the data dir and bootstraps a
# fresh cluster. No systemd: each daemon runs in the foreground in its own session (setsid) and
# its PID is kept in $RGW_DIR/run/*.pid. Works as root on Debian 12 (Ceph 16) and is written for
# Debian 13 (Ceph 18) too.
#
# Env (all optional):
#   RGW_DIR=${TMPDIR:-/tmp}/s3blk-rgw   config, logs (log/), PID files (run/), daemon data
#   RGW_PORT=7480                       S3 endpoint http://127.0.0.1:$RGW_PORT
#   MON_PORT=3300                       mon msgr2 port; msgr1 is MON_PORT+3489 (6789 by default)
#   OBJECTSTORE=memstore                memstore (RAM, lost on stop) | bluestore (sparse file)
#   MEMSTORE_BYTES=4294967296           RAM the memstore OSD may fill with object data
#   WITH_MGR=0                          1 starts ceph-mgr too (RGW does not need it; `ceph -s` warns)
#   S3_ACCESS_KEY, S3_SECRET_KEY        fixed credentials of the S3 user "test"
#   S3_REGION=us-east-1                 region the clients sign for (RGW accepts any)
#   S3_BUCKET=s3blk-test                bucket created after start; CREATE_BUCKET=0 skips it
#   SKIP_INSTALL=1                      never run apt-get
set -euo pipefail

RGW_DIR=${RGW_DIR:-${TMPDIR:-/tmp}/s3blk-rgw}
RGW_PORT=${RGW_PORT:-7480}
MON_PORT=${MON_PORT:-3300}
MON_PORT1=$((MON_PORT + 3489))
OBJECTSTORE=${OBJECTSTORE:-memstore}
MEMSTORE_BYTES=${MEMSTORE_BYTES:-4294967296}
WITH_MGR=${WITH_MGR:-0}
S3_ACCESS_KEY=${S3_ACCESS_KEY:-AKIATESTTESTTESTTEST}
S3_SECRET_KEY=${S3_SECRET_KEY:-testsecrettestsecrettestsecrettestsecret}
S3_REGION=${S3_REGION:-us-east-1}
S3_BUCKET=${S3_BUCKET:-s3blk-test}
CREATE_BUCKET=${CREATE_BUCKET:-1}
FSID=5b3b1c00-0000-4000-8000-000000007480
CONF=$RGW_DIR/ceph.conf
RUN=$RGW_DIR/run
LOG=$RGW_DIR/log
ENDPOINT=http://127.0.0.1:$RGW_PORT
HERE=$(dirname "$(readlink -f "$0")")

log() { echo "[rgw-start $(date +%T)] $*" >&2; }
die() { log "error: $*"; exit 1; }

print_env() {
  local n
  for n in S3_ENDPOINT S3_ACCESS_KEY S3_SECRET_KEY S3_REGION S3_BUCKET; do
    case $n in
      S3_ENDPOINT) printf 'export %s=%q\n' "$n" "$ENDPOINT" ;;
      *) printf 'export %s=%q\n' "$n" "${!n}" ;;
    esac
  done
  printf 'export AWS_ACCESS_KEY_ID=%q\n' "$S3_ACCESS_KEY"
  printf 'export AWS_SECRET_ACCESS_KEY=%q\n' "$S3_SECRET_KEY"
  printf 'export AWS_REGION=%q\n' "$S3_REGION"
}

# An anonymous GET / answers ListAllMyBucketsResult once RGW serves S3.
rgw_up() { curl -fsS -m 2 "$ENDPOINT/" 2>/dev/null | grep -q ListAllMyBucketsResult; }
# A zombie passes `kill -0`, so look for a command line instead.
pid_alive() { [[ -f $1 ]] && [[ -n $(tr -d '\0' 2>/dev/null <"/proc/$(cat "$1")/cmdline") ]]; }
port_busy() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# PUT /bucket signed with SigV4 by curl (--aws-sigv4, curl >= 7.75). Ceph answers 200 when the
# bucket is new and also when the same user already owns it, 409 only if another user does.
create_bucket() {
  [[ $CREATE_BUCKET == 1 ]] || return 0
  local code
  code=$(curl -sS -m 10 -o "$LOG/create-bucket.out" -w '%{http_code}' -X PUT \
    --aws-sigv4 "aws:amz:$S3_REGION:s3" --user "$S3_ACCESS_KEY:$S3_SECRET_KEY" \
    -H "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" \
    "$ENDPOINT/$S3_BUCKET") || code=000
  case $code in
    200) log "bucket $S3_BUCKET ready" ;;
    409)
      if grep -q BucketAlreadyOwnedByYou "$LOG/create-bucket.out"; then
        log "bucket $S3_BUCKET ready"
      else
        die "bucket $S3_BUCKET exists and belongs to someone else: $(cat "$LOG/create-bucket.out")"
      fi
      ;;
    *) die "creating bucket $S3_BUCKET: HTTP $code $(cat "$LOG/create-bucket.out" 2>/dev/null)" ;;
  esac
}

# ---- 0. already running? ------------------------------------------------------------------
if pid_alive "$RUN/rgw.pid" && rgw_up; then
  log "already running at $ENDPOINT (pid $(cat "$RUN/rgw.pid"))"
  create_bucket
  print_env
  exit 0
fi

# ---- 1. install ---------------------------------------------------------------------------
PKGS=(radosgw ceph-mon ceph-osd ceph-common curl)
BINS=(radosgw radosgw-admin ceph-mon ceph-osd ceph monmaptool curl)
if [[ $WITH_MGR == 1 ]]; then PKGS+=(ceph-mgr); BINS+=(ceph-mgr); fi
missing=()
for b in "${BINS[@]}"; do command -v "$b" >/dev/null || missing+=("$b"); done
if ((${#missing[@]})); then
  [[ ${SKIP_INSTALL:-0} != 1 ]] || die "missing ${missing[*]} and SKIP_INSTALL=1"
  [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; run as root or: apt-get install ${PKGS[*]}"
  log "installing ${PKGS[*]} (apt; missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || log "apt-get update failed; trying the install anyway"
  apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >&2
fi

# ---- 2. port check and leftovers -------------------------------------------------------------
if rgw_up; then
  die "$ENDPOINT already serves S3 but not from $RUN/rgw.pid; stop that server or set RGW_PORT"
fi
ok=0 # on any failure below, stop whatever this run started
trap '[[ $ok == 1 ]] || { log "start failed; stopping daemons (logs in $LOG)"; RGW_DIR=$RGW_DIR bash "$HERE/rgw-stop.sh" >&2; }' EXIT
if [[ -d $RUN ]]; then RGW_DIR=$RGW_DIR bash "$HERE/rgw-stop.sh" >&2 || true; fi
# A mon port held by another cluster is dangerous, not just a failed start: our `ceph` commands
# would talk to that cluster's mon and create an OSD there. So check after stopping ours.
for p in "$MON_PORT" "$MON_PORT1" "$RGW_PORT"; do
  if port_busy "$p"; then die "127.0.0.1:$p is in use by another process; set MON_PORT/RGW_PORT"; fi
done
# Only ever wipe a directory this script made (it holds ceph.conf with our fsid) or an empty one.
if [[ -e $RGW_DIR ]] && ! grep -qs "fsid = $FSID" "$CONF" && [[ -n $(ls -A "$RGW_DIR") ]]; then
  die "$RGW_DIR exists and was not made by this script; remove it or set RGW_DIR"
fi
rm -rf "$RGW_DIR"
mkdir -p "$RUN" "$LOG" "$RGW_DIR/mon/ceph-a" "$RGW_DIR/mgr/ceph-a" "$RGW_DIR/osd/ceph-0" "$RGW_DIR/rgw"

# ---- 3. config ------------------------------------------------------------------------------
cat >"$CONF" <<EOC
[global]
fsid = $FSID
mon_host = [v2:127.0.0.1:$MON_PORT,v1:127.0.0.1:$MON_PORT1]
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
public_network = 127.0.0.0/8
ms_bind_ipv6 = false
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
auth_allow_insecure_global_id_reclaim = false
run_dir = $RUN
admin_socket = $RUN/\$cluster-\$name.asok
log_file = $LOG/\$cluster-\$name.log
keyring = $RGW_DIR/keyring
# one node, one OSD: replica count 1, few PGs, no autoscaler, no free-disk alarms
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_max_pg_per_osd = 1000
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 1
mon_data_avail_crit = 1
osd_pool_default_flag_nodelete = false
debug_ms = 0
[mon]
mon_data = $RGW_DIR/mon/\$cluster-\$id
mon_initial_members = a
# Commit map changes every 0.1 s instead of every 1 s: RGW's first start issues ~12 pool
# commands one after another, and each waited a full interval (start-up went from ~15 s to ~5 s).
paxos_propose_interval = 0.1
paxos_min_wait = 0.01
[mgr]
mgr_data = $RGW_DIR/mgr/\$cluster-\$id
[osd]
osd_data = $RGW_DIR/osd/\$cluster-\$id
osd_objectstore = $OBJECTSTORE
memstore_device_bytes = $MEMSTORE_BYTES
bluestore_block_path = $RGW_DIR/osd/block
bluestore_block_create = true
bluestore_block_size = 21474836480
bluestore_fsck_on_mount = false
osd_memory_target = 1073741824
osd_op_num_shards = 2
osd_op_num_threads_per_shard = 2
[client.rgw.a]
# radosgw defaults to ms_mon_client_mode = secure (cephx), impossible with auth none: it would
# loop on "get_initial_auth_request returned -13".
ms_mon_client_mode = crc
# tcp_nodelay: without it a small response (a 4 KiB ranged GET, a 412) waits ~40 ms for the
# client's delayed ACK (Nagle); measured by bench/s3-probe.mjs.
rgw_frontends = beast endpoint=127.0.0.1:$RGW_PORT tcp_nodelay=1
rgw_data = $RGW_DIR/rgw
rgw_thread_pool_size = 128
rgw_enable_usage_log = false
rgw_enable_ops_log = false
EOC
touch "$RGW_DIR/keyring"
export CEPH_CONF=$CONF
C=(-c "$CONF")

# start_daemon NAME CMD...: foreground daemon, backgrounded here in its own session.
start_daemon() {
  local name=$1
  shift
  setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1 &
  echo $! >"$RUN/${name%%.*}.pid"
  log "started $name pid $!"
}
# wait_for SECONDS NAME CMD...: poll CMD every 0.5 s; give up early if daemon NAME has exited.
wait_for() {
  local tries=$(($1 * 2)) name=$2 i
  shift 2
  for ((i = 0; i < tries; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    pid_alive "$RUN/${name%%.*}.pid" || { log "$name exited (see $LOG/$name.out)"; return 1; }
    sleep 0.5
  done
  log "$name did not come up within $((tries / 2)) s"
  return 1
}

# ---- 4. mon ---------------------------------------------------------------------------------
log "bootstrapping mon (data dir $RGW_DIR)"
monmaptool --create --clobber --fsid "$FSID" \
  --addv a "[v2:127.0.0.1:$MON_PORT,v1:127.0.0.1:$MON_PORT1]" "$RGW_DIR/monmap" >/dev/null
ceph-mon "${C[@]}" --mkfs -i a --monmap "$RGW_DIR/monmap" >>"$LOG/mon.mkfs.out" 2>&1
start_daemon mon.a ceph-mon "${C[@]}" -i a -f
wait_for 30 mon.a timeout 5 ceph "${C[@]}" mon stat || { tail -20 "$LOG/ceph-mon.a.log" >&2; exit 1; }

# ---- 5. mgr (optional) ------------------------------------------------------------------------
if [[ $WITH_MGR == 1 ]]; then start_daemon mgr.a ceph-mgr "${C[@]}" -i a -f; fi

# ---- 6. osd ---------------------------------------------------------------------------------
log "creating osd ($OBJECTSTORE)"
OSD_UUID=$(cat /proc/sys/kernel/random/uuid)
OSD_ID=$(timeout 30 ceph "${C[@]}" osd new "$OSD_UUID")
ceph-osd "${C[@]}" -i "$OSD_ID" --mkfs --osd-uuid "$OSD_UUID" >>"$LOG/osd.mkfs.out" 2>&1
start_daemon "osd.$OSD_ID" ceph-osd "${C[@]}" -i "$OSD_ID" -f
osd_up() { timeout 5 ceph "${C[@]}" osd dump 2>/dev/null | grep -q "^osd.$OSD_ID up"; }
wait_for 60 "osd.$OSD_ID" osd_up || { tail -20 "$LOG/ceph-osd.$OSD_ID.log" >&2; exit 1; }

# ---- 7. rgw ---------------------------------------------------------------------------------
log "starting radosgw on $ENDPOINT"
start_daemon rgw.a radosgw "${C[@]}" -n client.rgw.a -f
wait_for 60 rgw.a rgw_up || { tail -20 "$LOG/ceph-client.rgw.a.log" >&2; exit 1; }

# ---- 8. S3 user with fixed keys, then the bucket ----------------------------------------------
radosgw-admin "${C[@]}" user create --uid=test --display-name="s3blk test user" \
  --access-key="$S3_ACCESS_KEY" --secret-key="$S3_SECRET_KEY" >>"$LOG/user-create.out" 2>&1 ||
  { tail -20 "$LOG/user-create.out" >&2; exit 1; }
create_bucket
ok=1
log "ready: $ENDPOINT, bucket $S3_BUCKET, logs in $LOG"
print_env
