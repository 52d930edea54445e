#!/bin/busybox sh
# /init of the lab initramfs: mount the host's root read-only over 9p with a tmpfs overlay,
# mount the results share, then switch to that root and run /lab-results/job.sh there
# (and then systemd, when the job asks for it).
/bin/busybox mkdir -p /proc /sys /dev /usr/bin /sbin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "lab-init: $*"; echo o > /proc/sysrq-trigger; sleep 5; }
for m in $(cat /modules.load); do insmod "/$m" || fail "insmod $m"; done
mkdir -p /lower /rw /newroot
opts=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "$opts,ro,cache=loose" hostroot /lower || fail "cannot mount the host root"
mount -t tmpfs -o size=75% tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot \
    || fail "cannot mount the overlay root"
mkdir -p /newroot/lab-results
mount -t 9p -o "$opts" results /newroot/lab-results || fail "cannot mount the results share"
for d in proc sys dev; do mount --move /$d /newroot/$d; done
echo "lab-init: root ready"
exec switch_root /newroot /bin/sh -c '
    mount -t tmpfs tmpfs /run  # not /tmp: the checkout under test may live there
    /bin/sh /lab-results/job.sh >/lab-results/job.log 2>&1
    echo $? >/lab-results/job.rc
    sync
    # A job that prepared a root for systemd (tests/lab/firstboot.py) boots it: PID 1 stays 1.
    [ -e /run/lab-boot-systemd ] && exec /lib/systemd/systemd
    echo o >/proc/sysrq-trigger
    sleep 30'
