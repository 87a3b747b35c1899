#!/usr/bin/env bash
# Build the boot benchmark's root filesystem: a Debian minbase (debootstrap) with Python 3 in it,
# as a raw ext4 image, plus the program the guest runs from it (/usr/local/bin/s3blk-answer).
#
# Usage:   image=$(bash infra/vm/build-rootfs.sh)     # prints the image's path, nothing else
#
# The guest (infra/vm/init.sh, s3blk.mode=boot) mounts the image read-only, runs the program in a
# chroot, and prints its answer: a boot's cold read of a language runtime (the interpreter, its
# shared libraries, a dozen standard-library packages) scattered over a real filesystem, which is
# what `npm run bench`'s boot row measures.
#
# The image is made without mounting anything: debootstrap into a directory, then
# `mke2fs -t ext4 -d DIR` (e2fsprogs 1.43 or later). It is sparse: blocks no file uses are holes,
# so `s3blk import` stores only the chunks that hold data.
#
# Cached in ${S3BLK_ROOTFS_DIR:-~/.cache/s3blk-rootfs}/rootfs-<hash>/ (not in build-guest.sh's
# cache directory, whose new builds delete everything else in it; the hash covers this script, the
# suite, the mirror and the package list); a cached image is printed in well under a second, a
# new one takes a few minutes (about 60 MB of packages). Concurrent runs wait for each other. Runs
# as root (debootstrap needs it); debootstrap is installed with apt-get when missing.
#
# Env (all optional):
#   S3BLK_ROOTFS_DIR=$HOME/.cache/s3blk-rootfs  cache directory
#   S3BLK_ROOTFS_MIRROR=<the first deb URI in /etc/apt/sources.list.d/debian.sources>
#   S3BLK_ROOTFS_SUITE=bookworm
set -euo pipefail
umask 022
export LC_ALL=C

HERE=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
CACHE=${S3BLK_ROOTFS_DIR:-${HOME:-/root}/.cache/s3blk-rootfs}
SUITE=${S3BLK_ROOTFS_SUITE:-bookworm}
PACKAGES=python3
IMAGE_SIZE=1G

log() { echo "build-rootfs: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

default_mirror() {
  local uri
  uri=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [[ -n $uri ]] || uri=$(awk '/^deb / { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
  echo "${uri:-http://deb.debian.org/debian}"
}
MIRROR=${S3BLK_ROOTFS_MIRROR:-$(default_mirror)}

mkdir -p "$CACHE"
exec 9>"$CACHE/.rootfs-lock"
flock 9

key=$(
  {
    echo "$SUITE $MIRROR $PACKAGES $IMAGE_SIZE"
    sha256sum "$HERE/build-rootfs.sh" | cut -d' ' -f1
  } | sha256sum | cut -c1-12
)
OUT=$CACHE/rootfs-$key
if [[ -f $OUT/.complete ]]; then
  echo "$OUT/root.raw"
  exit 0
fi

[[ $EUID == 0 ]] || die "debootstrap needs root"
if ! command -v debootstrap >/dev/null; then
  log "apt-get install debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >&2 ||
    die "apt-get install debootstrap failed"
fi

t0=$SECONDS
TMP=$(mktemp -d "$CACHE/.rootfs.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
log "debootstrap --variant=minbase --include=$PACKAGES $SUITE from $MIRROR"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$TMP/root" "$MIRROR" >"$TMP/debootstrap.log" 2>&1 ||
  {
    tail -20 "$TMP/debootstrap.log" >&2
    die "debootstrap failed"
  }
rm -rf "$TMP/root/var/cache/apt/archives/"*.deb "$TMP/root/var/lib/apt/lists/"*

# The program: start the interpreter, import a spread of the standard library (each import reads
# its package's files from the disk), do a little work, and print one line.
cat >"$TMP/root/usr/local/bin/s3blk-answer" <<'EOF'
#!/usr/bin/python3
import argparse, asyncio, csv, decimal, email.parser, hashlib, http.client, json
import logging, sqlite3, unittest, urllib.request, xml.etree.ElementTree as ET, zipfile

db = sqlite3.connect(":memory:")
db.execute("create table t (n integer)")
db.executemany("insert into t values (?)", [(i,) for i in range(1000)])
total = db.execute("select sum(n) from t").fetchone()[0]
doc = ET.fromstring("<a><b n='%d'/></a>" % total)
digest = hashlib.sha256(json.dumps({"total": total, "n": doc[0].get("n")}).encode()).hexdigest()
print("answer", total, digest[:16])
EOF
chmod 755 "$TMP/root/usr/local/bin/s3blk-answer"

mkdir -p "$TMP/out"
mke2fs -q -F -t ext4 -L s3blk-root -d "$TMP/root" "$TMP/out/root.raw" "$IMAGE_SIZE" >&2 ||
  die "mke2fs -d failed"
used=$(du -sk "$TMP/root" | cut -f1)
rm -rf "$TMP/root"
rm -rf "$CACHE"/rootfs-*
mv "$TMP/out" "$OUT"
touch "$OUT/.complete"
log "done in $((SECONDS - t0)) s: $OUT/root.raw ($IMAGE_SIZE, $((used / 1024)) MiB of files)"
echo "$OUT/root.raw"
