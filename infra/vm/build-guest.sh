#!/usr/bin/env bash
# Build the s3blk test guest: a Debian kernel and a small initramfs whose /init (infra/vm/init.sh)
# formats or checks /dev/vda, a virtio-blk disk that qemu backs with an NBD export.
#
# Usage:   dir=$(bash infra/vm/build-guest.sh)      # prints the build directory, nothing else
#          qemu-system-x86_64 -kernel "$dir/vmlinuz" -initrd "$dir/initrd.cpio.gz" ...
#
# The build directory holds:
#   vmlinuz            the kernel, as shipped in Debian's linux-image-<abi>-amd64 package
#   initrd.cpio.gz     busybox-static, e2fsprogs' mke2fs + e2fsck and their libraries, the
#                      virtio-blk and ext4 modules, /init, the expected data manifest
#   kernel-release     e.g. 6.1.0-56-amd64 (what `uname -r` says in the guest)
#   kernel-package     e.g. linux-image-6.1.0-56-amd64=6.1.192-2
#   modules            the modules /init loads, in that order
#   expected.sha256    the manifest "format" writes and "check" verifies
#
# The kernel package is downloaded with `apt-get download` and unpacked with `dpkg-deb -x` into a
# temporary directory: nothing is installed. Which package: the one linux-image-amd64 depends on
# now (Debian replaces the ABI-numbered packages, so a pinned name would stop downloading).
#
# Idempotent and cached: the directory name is the kernel release plus a hash of every input (the
# kernel package version, this script, init.sh and the host files copied in). If it exists, the
# script only prints it. A new build replaces older ones in the cache dir. Concurrent runs wait for
# each other (flock). The initramfs is reproducible: sorted cpio with fixed owner and mtime
# (SOURCE_DATE_EPOCH, default 0), gzip -n.
#
# Host: Debian (apt, dpkg-deb). Missing qemu-system-x86, busybox-static, e2fsprogs or cpio are
# installed with apt-get when running as root (SKIP_INSTALL=1 never runs apt-get). If the kernel
# package cannot be resolved (no apt lists, no network) and a cached build exists, it is reused.
#
# Env (all optional):
#   S3BLK_VM_DIR=$HOME/.cache/s3blk-vm        cache directory
#   S3BLK_VM_KERNEL_PKG=linux-image-...-amd64  use this kernel package instead of the current one
#   SOURCE_DATE_EPOCH=0                        mtime of every file in the initramfs
#   SKIP_INSTALL=1                             never run apt-get install / update
set -euo pipefail
umask 022
export LC_ALL=C

HERE=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
CACHE=${S3BLK_VM_DIR:-${HOME:-/root}/.cache/s3blk-vm}
SKIP_INSTALL=${SKIP_INSTALL:-0}
EPOCH=${SOURCE_DATE_EPOCH:-0}
# The modules /init needs; their dependencies come from modules.dep. ext4 and jbd2 look up the
# crc32c hash through the crypto API at mount time (a softdep, not in modules.dep), hence
# crc32c_generic.
ROOT_MODULES=(virtio_pci virtio_blk crc32c_generic ext4)
HOST_PACKAGES=(qemu-system-x86 busybox-static e2fsprogs cpio)

log() { echo "build-guest: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

apt_updated=0
apt_update_once() {
  ((apt_updated)) && return 0
  apt_updated=1
  [[ $SKIP_INSTALL == 1 || $EUID != 0 ]] && return 1
  log "apt-get update"
  apt-get update -qq >&2
}

# ---- host tools ---------------------------------------------------------------------------------
installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]; }
missing=()
for p in "${HOST_PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
if ((${#missing[@]})); then
  [[ $SKIP_INSTALL == 1 ]] && die "missing packages: ${missing[*]} (SKIP_INSTALL=1)"
  [[ $EUID == 0 ]] || die "missing packages: ${missing[*]}; run as root or: apt-get install ${missing[*]}"
  apt_update_once || true
  log "apt-get install ${missing[*]}"
  apt_log=$(mktemp)
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$apt_log" 2>&1 ||
    { tail -20 "$apt_log" >&2; die "apt-get install ${missing[*]} failed"; }
  rm -f "$apt_log"
fi

BUSYBOX=$(dpkg-query -L busybox-static | grep -m1 -E '/s?bin/busybox$') || die "busybox-static ships no busybox?"
MKE2FS=$(readlink -f /sbin/mke2fs)
E2FSCK=$(readlink -f /sbin/e2fsck)
MKE2FS_CONF=/etc/mke2fs.conf
# The dynamic loader and the libraries of mke2fs and e2fsck, by the paths ldd reports.
mapfile -t LIBS < <(ldd "$MKE2FS" "$E2FSCK" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// && $1 !~ /:$/ { print $1 }' | sort -u)
((${#LIBS[@]})) || die "ldd found no libraries for $MKE2FS"

# ---- which kernel -------------------------------------------------------------------------------
resolve_kernel() {
  local pkg=${S3BLK_VM_KERNEL_PKG:-}
  if [[ -z $pkg ]]; then
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
      awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
  fi
  [[ -n $pkg ]] || return 1
  local version
  version=$(apt-cache policy "$pkg" 2>/dev/null | awk '$1 == "Candidate:" { print $2 }')
  [[ -n $version && $version != "(none)" ]] || return 1
  echo "$pkg=$version"
}

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

newest_build() { find "$CACHE" -mindepth 2 -maxdepth 2 -name .complete -printf '%T@ %h\n' | sort -rn | awk 'NR == 1 { print $2 }'; }

if ! KPKG=$(resolve_kernel) && ! { apt_update_once && KPKG=$(resolve_kernel); }; then
  [[ -z ${S3BLK_VM_KERNEL_PKG:-} ]] || die "no such kernel package: $S3BLK_VM_KERNEL_PKG"
  old=$(newest_build)
  [[ -n $old ]] || die "cannot resolve the kernel package (apt-cache depends linux-image-amd64); run apt-get update"
  log "warning: cannot resolve the kernel package; reusing $old"
  echo "$old"
  exit 0
fi

# ---- cache key ----------------------------------------------------------------------------------
# out_dir: where the build for $KPKG and the current inputs lives.
out_dir() {
  local key
  key=$(
    {
      echo "$KPKG epoch=$EPOCH modules=${ROOT_MODULES[*]}"
      sha256sum "$HERE/build-guest.sh" "$HERE/init.sh" "$BUSYBOX" "$MKE2FS" "$E2FSCK" "$MKE2FS_CONF" "${LIBS[@]}" | cut -d' ' -f1
    } | sha256sum | cut -c1-12
  )
  local name=${KPKG%%=*}
  echo "$CACHE/${name#linux-image-}-$key"
}
OUT=$(out_dir)
if [[ -f $OUT/.complete ]]; then
  echo "$OUT"
  exit 0
fi

# ---- build --------------------------------------------------------------------------------------
t0=$SECONDS
TMP=$(mktemp -d "$CACHE/.build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

mkdir -p "$TMP/deb"
sandbox=()
[[ $EUID == 0 ]] && sandbox=(-o APT::Sandbox::User=root) # _apt cannot write into our 0700 dir
download() { (cd "$TMP/deb" && apt-get download -qq "${sandbox[@]}" "$KPKG" >&2); }
if ! download; then
  # Stale apt lists name a version the archive no longer has: update once, resolve again.
  apt_update_once || die "apt-get download $KPKG failed"
  KPKG=$(resolve_kernel) || die "cannot resolve the kernel package after apt-get update"
  OUT=$(out_dir)
  if [[ -f $OUT/.complete ]]; then
    echo "$OUT"
    exit 0
  fi
  download || die "apt-get download $KPKG failed"
fi
log "building $OUT from $KPKG"
dpkg-deb -x "$TMP"/deb/*.deb "$TMP/kernel"
rm -rf "$TMP/deb"

vmlinuz=$(find "$TMP/kernel/boot" -maxdepth 1 -name 'vmlinuz-*' | head -1)
[[ -n $vmlinuz ]] || die "$KPKG has no boot/vmlinuz-*"
KREL=${vmlinuz##*/vmlinuz-}
moddir=$(find "$TMP/kernel" -maxdepth 4 -type d -path "*/lib/modules/$KREL" | head -1)
[[ -n $moddir ]] || die "$KPKG has no lib/modules/$KREL"
# The package ships no modules.dep (depmod runs at install time); busybox's depmod makes one.
"$BUSYBOX" depmod -b "${moddir%/lib/modules/*}" "$KREL"

declare -A DEPS=() PATHS=()
while IFS= read -r line; do
  target=${line%%:*}
  name=${target##*/}
  name=${name%%.ko*}
  name=${name//-/_}
  PATHS[$name]=$target
  DEPS[$name]=${line#*: }
  [[ $line == *": "* ]] || DEPS[$name]=
done <"$moddir/modules.dep"

ORDER=()
declare -A SEEN=()
# visit NAME: its dependencies first (depth first), then itself. Built-in modules need no insmod.
visit() {
  local name=${1//-/_} dep
  [[ -n ${SEEN[$name]:-} ]] && return 0
  SEEN[$name]=1
  if [[ -z ${PATHS[$name]:-} ]]; then
    grep -qE "/${name//_/[-_]}\.ko" "$moddir/modules.builtin" && return 0
    die "module $name is neither in modules.dep nor built in"
  fi
  for dep in ${DEPS[$name]}; do
    dep=${dep##*/}
    visit "${dep%%.ko*}"
  done
  ORDER+=("$name")
}
for m in "${ROOT_MODULES[@]}"; do visit "$m"; done

ROOT=$TMP/initrd
mkdir -p "$ROOT"/{bin,sbin,etc/s3blk,dev,proc,sys,mnt,tmp,root,lib/modules}
for name in "${ORDER[@]}"; do
  src=$moddir/${PATHS[$name]}
  case $src in
    *.ko) cp "$src" "$ROOT/lib/modules/$name.ko" ;;
    *.ko.xz) "$BUSYBOX" unxz -c "$src" >"$ROOT/lib/modules/$name.ko" ;;
    *.ko.gz) "$BUSYBOX" zcat "$src" >"$ROOT/lib/modules/$name.ko" ;;
    *.ko.zst) zstd -q -d -c "$src" >"$ROOT/lib/modules/$name.ko" || die "zstd needed for $src" ;;
    *) die "unknown module file $src" ;;
  esac
done
printf '%s\n' "${ORDER[@]}" >"$ROOT/etc/s3blk/modules"

cp "$BUSYBOX" "$ROOT/bin/busybox"
# Every applet but mke2fs, whose place is taken by e2fsprogs' (busybox's cannot make ext4).
for applet in $("$BUSYBOX" --list); do
  [[ $applet == busybox || $applet == mke2fs ]] && continue
  ln -s busybox "$ROOT/bin/$applet"
done
cp "$MKE2FS" "$ROOT/sbin/mke2fs"
cp "$E2FSCK" "$ROOT/sbin/e2fsck"
ln -s mke2fs "$ROOT/sbin/mkfs.ext4"
for lib in "${LIBS[@]}"; do
  mkdir -p "$ROOT$(dirname "$lib")"
  cp -L "$lib" "$ROOT$lib"
done
cp "$MKE2FS_CONF" "$ROOT/etc/mke2fs.conf"
ln -s /proc/mounts "$ROOT/etc/mtab"
cp "$HERE/init.sh" "$ROOT/init"
chmod 0755 "$ROOT/init"
"$BUSYBOX" sh "$HERE/init.sh" --print-manifest >"$ROOT/etc/s3blk/expected.sha256"

mkdir -p "$TMP/out"
find "$ROOT" -exec touch -h -d "@$EPOCH" {} +
(cd "$ROOT" && find . -mindepth 1 | sort | cpio -o -H newc -R 0:0 --reproducible --quiet) |
  gzip -9 -n >"$TMP/out/initrd.cpio.gz"
cp "$vmlinuz" "$TMP/out/vmlinuz"
echo "$KREL" >"$TMP/out/kernel-release"
echo "$KPKG" >"$TMP/out/kernel-package"
cp "$ROOT/etc/s3blk/modules" "$TMP/out/modules"
cp "$ROOT/etc/s3blk/expected.sha256" "$TMP/out/expected.sha256"
touch "$TMP/out/.complete"

# Replace older builds and leftovers of interrupted ones; the lock keeps concurrent runs out.
find "$CACHE" -mindepth 1 -maxdepth 1 -type d ! -path "$TMP" -exec rm -rf {} +
mv "$TMP/out" "$OUT"
log "done in $((SECONDS - t0)) s: kernel $KREL, initrd $(du -k "$OUT/initrd.cpio.gz" | cut -f1) KiB, modules: ${ORDER[*]}"
echo "$OUT"
