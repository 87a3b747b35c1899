#!/bin/sh
# /init of the s3blk test guest (built into the initramfs by infra/vm/build-guest.sh).
#
# The guest has one job per boot, chosen on the kernel command line with s3blk.mode=:
#   format  mkfs.ext4 /dev/vda, mount it, write the data files and MANIFEST.sha256, sync,
#           unmount; prints "S3BLK-VM: FORMAT-OK" or "S3BLK-VM: FORMAT-FAIL <reason>".
#   check   e2fsck -fn /dev/vda, mount it read-only, compare MANIFEST.sha256 with the manifest
#           baked into the initramfs and run sha256sum -c on it; prints "S3BLK-VM: CHECK-OK" or
#           "S3BLK-VM: CHECK-FAIL <reason>".
#   boot    mount /dev/vda (a root filesystem, infra/vm/build-rootfs.sh) read-only, run its
#           /usr/local/bin/s3blk-answer in a chroot, and print "S3BLK-VM: BOOT-OK <answer>"; the
#           lines "boot: mount" and "boot: answer" carry the uptime the benchmark measures between.
#   shell   an interactive shell on the console, for debugging by hand.
# Then it powers off (the host runs qemu with -no-reboot, so a panic ends qemu too).
#
# Every step prints "s3blk-vm: <command> -> exit N", so a failure in CI can be read from the serial
# log alone. The marker is the last line a test needs; it starts a line of its own.
#
# The data files are generated, not shipped: 512-byte records, each a header line with the file's
# seed, the record index and a Park-Miller pseudo-random word, padded with dots. File data starts
# on a block boundary, so every sector of every file differs, and a sector written to or read from
# the wrong place changes a checksum. (awk runs about 60 times slower under TCG than natively; one
# awk iteration per sector rather than per short line keeps "format" at a few seconds.) Not all
# sizes are multiples of 4 KiB, so a partial last block is exercised too. The same function runs
# on the build host (`busybox sh init.sh --print-manifest`, with the same static busybox) to make
# /etc/s3blk/expected.sha256, so "check" also catches a disk whose manifest and files agree with
# each other but are not what this guest writes (a stale or foreign disk).

# name:size_bytes:seed
FILES="file-1.bin:1048576:1 file-2.bin:3150001:2 file-3.bin:8388608:3"
MANIFEST=MANIFEST.sha256
EXPECTED=/etc/s3blk/expected.sha256
DISK=/dev/vda
MNT=/mnt
# Absolute paths: Debian's busybox-static shell runs its own applets before searching PATH, and
# busybox's mke2fs cannot make ext4.
MKE2FS=/sbin/mke2fs
E2FSCK=/sbin/e2fsck

# gen SIZE_BYTES SEED: the content of one data file on stdout.
gen() {
  busybox awk -v n="$1" -v seed="$2" 'BEGIN {
    fill = "."
    while (length(fill) < 512) fill = fill fill
    x = seed; m = 2147483647
    for (i = 0; out < n; i++) {
      x = (x * 16807) % m
      head = sprintf("s3blk-vm file %d sector %010d word %08x\n", seed, i, x)
      sector = head substr(fill, 1, 511 - length(head)) "\n"
      printf "%s", sector
      out += length(sector)
    }
  }' | busybox head -c "$1"
}

# The manifest as sha256sum would write it in the directory that holds the files.
print_manifest() {
  for spec in $FILES; do
    name=${spec%%:*}; rest=${spec#*:}; size=${rest%%:*}; seed=${rest#*:}
    bytes=$(gen "$size" "$seed" | busybox wc -c) || return 1
    [ "$bytes" -eq "$size" ] || { echo "gen $size $seed made $bytes bytes" >&2; return 1; }
    hash=$(gen "$size" "$seed" | busybox sha256sum) || return 1
    echo "${hash%% *}  $name"
  done
}

if [ "${1:-}" = "--print-manifest" ]; then
  print_manifest
  exit $?
fi

# ---- from here on we are PID 1 in the guest ----------------------------------------------------
export PATH=/sbin:/bin
umask 022

say() {
  read -r up _ </proc/uptime
  echo "s3blk-vm: [${up}s] $*"
}

# run CMD...: run it, print its exit status, return it (in $rc too).
run() {
  "$@"
  rc=$?
  say "$* -> exit $rc"
  return $rc
}

power_off() {
  sync
  poweroff -f
  # Not reached unless poweroff failed; the sysrq fallback needs no ACPI.
  echo o >/proc/sysrq-trigger
  sleep 10
  exit 1 # PID 1 exiting panics the kernel; with panic=-1 and -no-reboot that ends qemu
}

# marker RESULT [REASON]: the line the host looks for, then power off.
marker() {
  echo
  echo "S3BLK-VM: $*"
  power_off
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

mode=
read -r cmdline </proc/cmdline
for arg in $cmdline; do
  case $arg in s3blk.mode=*) mode=${arg#s3blk.mode=} ;; esac
done
say "mode=${mode:-<unset>} kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)s"
case $mode in
  format) MODE=FORMAT ;;
  check) MODE=CHECK ;;
  boot) MODE=BOOT ;;
  shell) MODE=SHELL ;;
  *) MODE=GUEST ;;
esac
fail() { marker "$MODE-FAIL $*"; }
[ "$MODE" = GUEST ] && fail "unknown s3blk.mode '${mode}' (format|check|boot|shell)"

# Modules in dependency order, as computed from modules.dep at build time.
while read -r module; do
  run insmod "/lib/modules/$module.ko" || fail "insmod $module exit $rc"
done </etc/s3blk/modules

# virtio-blk probes asynchronously; the node appears within a few hundred ms under TCG.
tries=0
while [ ! -b "$DISK" ] && [ $tries -lt 200 ]; do
  usleep 50000
  tries=$((tries + 1))
done
[ -b "$DISK" ] || fail "no $DISK after 10 s"
say "$DISK: $(cat /sys/block/vda/size) sectors, ro=$(cat /sys/block/vda/ro), after $((tries * 50)) ms"

if [ "$MODE" = BOOT ]; then
  say "boot: mount"
  run mount -t ext4 -o ro "$DISK" "$MNT" || fail "mount exit $rc"
  mount -t proc proc "$MNT/proc" && mount -t devtmpfs devtmpfs "$MNT/dev" || fail "chroot mounts"
  answer=$(chroot "$MNT" /usr/local/bin/s3blk-answer 2>&1)
  rc=$?
  say "boot: answer"
  echo "$answer"
  [ $rc -eq 0 ] || fail "s3blk-answer exit $rc"
  umount "$MNT/dev" "$MNT/proc" "$MNT"
  marker "BOOT-OK $answer"
fi

if [ "$MODE" = SHELL ]; then
  say "shell: exit it to power off"
  setsid cttyhack sh
  power_off
fi

if [ "$MODE" = FORMAT ]; then
  run "$MKE2FS" -q -F -t ext4 -L s3blk-vm "$DISK" || fail "mke2fs exit $rc"
  run mount -t ext4 "$DISK" "$MNT" || fail "mount exit $rc"
  for spec in $FILES; do
    name=${spec%%:*}; rest=${spec#*:}; size=${rest%%:*}; seed=${rest#*:}
    gen "$size" "$seed" >"$MNT/$name"
    rc=$?
    say "write $name ($size bytes) -> exit $rc"
    [ $rc -eq 0 ] || fail "write $name exit $rc"
  done
  names=
  for spec in $FILES; do names="$names ${spec%%:*}"; done
  # shellcheck disable=SC2086 # word splitting of $names is wanted
  (cd "$MNT" && sha256sum $names >"$MANIFEST")
  rc=$?
  say "sha256sum > $MANIFEST -> exit $rc"
  [ $rc -eq 0 ] || fail "sha256sum exit $rc"
  run cmp "$MNT/$MANIFEST" "$EXPECTED" || fail "written files differ from the expected manifest"
  run sync || fail "sync exit $rc"
  run umount "$MNT" || fail "umount exit $rc"
  marker FORMAT-OK
fi

# MODE=CHECK. Keep going after a failed step, so the log shows every symptom; report the first.
reason=
run "$E2FSCK" -fn "$DISK"
[ $rc -eq 0 ] || reason="e2fsck exit $rc"
run mount -t ext4 -o ro "$DISK" "$MNT" || fail "${reason:-mount exit $rc}"
ls -l "$MNT"
for spec in $FILES; do
  name=${spec%%:*}; rest=${spec#*:}; size=${rest%%:*}
  bytes=$(stat -c %s "$MNT/$name")
  [ "$bytes" = "$size" ] || reason=${reason:-"$name has ${bytes:-no} bytes, not $size"}
done
run cmp "$MNT/$MANIFEST" "$EXPECTED" || reason=${reason:-"$MANIFEST differs from the expected manifest"}
(cd "$MNT" && sha256sum -c "$MANIFEST")
rc=$?
say "sha256sum -c $MANIFEST -> exit $rc"
[ $rc -eq 0 ] || reason=${reason:-"sha256sum -c exit $rc"}
run umount "$MNT" || reason=${reason:-"umount exit $rc"}
[ -z "$reason" ] || fail "$reason"
marker CHECK-OK
