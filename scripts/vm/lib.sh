#!/usr/bin/env bash
# The VM harness: prepare a guest kernel, a busybox initramfs carrying a static `ivcom`,
# boot QEMU guests under TCG (or KVM) and collect the marker lines they print.
#
# Source this file from bash (`. scripts/vm/lib.sh`), then:
#   vm_prepare                         install/download/build everything (cached under target/vm/)
#   vm_enter_netns "$@"                re-run the calling script in a private network namespace
#   vm_boot NAME "KEY=VAL ..." ARGS..  start one guest in the background (extra QEMU args after)
#   vm_wait SECONDS NAME...            wait until each guest powered off (or kill it at the deadline)
#   vm_boot_pair STEPS A_ARGS B_ARGS   boot guests "a" and "b" running the same step list
#   vm_markers NAME [FILTER]           the guest's "@@ivcom ..." marker lines
# See docs/vm-harness.md. Every wait is bounded; QEMU runs under `timeout -k`.

VM_REPO=${VM_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
VM_DIR=${VM_DIR:-$VM_REPO/target/vm}
VM_CACHE=$VM_DIR/cache
VM_RUN=${VM_RUN:-$VM_DIR/run}
VM_CARGO_TARGET_DIR=${VM_CARGO_TARGET_DIR:-${CARGO_TARGET_DIR:-$VM_REPO/target}}
# tcg (default: /dev/kvm on these machines is a nested paravirtual host that hangs a stock
# kernel), kvm, or auto (kvm when /dev/kvm is usable, tried with a probe boot).
VM_ACCEL=${VM_ACCEL:-tcg}
VM_MEM=${VM_MEM:-256}
# Guest CPU model under TCG (KVM uses host).
VM_GUEST_TIMEOUT=${VM_GUEST_TIMEOUT:-240}

# The kernel modules the guests load, by name; their dependencies are added and ordered.
VM_MODULES=(virtio_pci virtio_net vfio_iommu_type1 vfio_pci)

declare -A VM_PID=()

vm_log() { printf '[vm %s] %s\n' "$(date +%T)" "$*" >&2; }
vm_die() { vm_log "error: $*"; exit 1; }

# Installs the host packages the harness needs, only those missing (the list is
# scripts/deps.sh's group "vm").
vm_install_deps() {
    "$VM_REPO/scripts/deps.sh" vm || vm_die "the harness's packages are missing (scripts/deps.sh vm)"
}

# True if $1 needs no dynamic loader (ldd says "not a dynamic executable" or "statically linked").
vm_is_static() {
    LC_ALL=C ldd "$1" 2>&1 | grep -qE 'not a dynamic executable|statically linked'
}

# Downloads (once) the kernel that linux-image-amd64 depends on and unpacks it into
# target/vm/cache/linux-image-VER-amd64/; extracts the uncompressed vmlinux for QEMU's PVH entry.
# Sets VM_KVER, VM_KDIR, VM_VMLINUX.
vm_kernel() {
    mkdir -p "$VM_CACHE"
    local pkg
    pkg=$(cat "$VM_CACHE/kernel-package" 2>/dev/null || true)
    if [ -z "$pkg" ] || ! ls "$VM_CACHE"/"$pkg"_*.deb >/dev/null 2>&1; then
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
        if [ -z "$pkg" ]; then
            apt-get update -q >/dev/null || vm_die "apt-get update failed"
            pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
        fi
        [ -n "$pkg" ] || vm_die "cannot tell which kernel linux-image-amd64 depends on"
        vm_log "downloading $pkg"
        (cd "$VM_CACHE" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >/dev/null) || vm_die "apt-get download $pkg failed"
        echo "$pkg" >"$VM_CACHE/kernel-package"
    fi
    local deb
    deb=$(ls "$VM_CACHE"/"$pkg"_*.deb | head -1)
    VM_KDIR=$VM_CACHE/${pkg}
    if [ ! -d "$VM_KDIR/lib/modules" ] && [ ! -d "$VM_KDIR/usr/lib/modules" ]; then
        vm_log "unpacking $(basename "$deb")"
        rm -rf "$VM_KDIR.tmp" && dpkg-deb -x "$deb" "$VM_KDIR.tmp" && mv "$VM_KDIR.tmp" "$VM_KDIR"
    fi
    local vmlinuz
    vmlinuz=$(ls "$VM_KDIR"/boot/vmlinuz-* | head -1)
    VM_KVER=${vmlinuz##*/vmlinuz-}
    VM_VMLINUX=$VM_KDIR/vmlinux
    if [ ! -s "$VM_VMLINUX" ]; then
        # bzImage = setup code + decompressor + an xz stream holding the ELF vmlinux.
        local off
        off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$vmlinuz" | head -1 | cut -d: -f1)
        [ -n "$off" ] || vm_die "no xz stream in $vmlinuz"
        tail -c +$((off + 1)) "$vmlinuz" | xz -dc --single-stream >"$VM_VMLINUX.tmp" 2>/dev/null || true
        [ "$(head -c 4 "$VM_VMLINUX.tmp" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] ||
            vm_die "extracted vmlinux is not an ELF file"
        mv "$VM_VMLINUX.tmp" "$VM_VMLINUX"
    fi
}

vm_moddir() {
    if [ -d "$VM_KDIR/lib/modules/$VM_KVER" ]; then echo "$VM_KDIR/lib/modules/$VM_KVER"
    else echo "$VM_KDIR/usr/lib/modules/$VM_KVER"; fi
}

# Prints the .ko paths for the named modules and their dependencies, dependencies first.
# The .deb has no modules.dep: dependencies come from each module's `depends=` modinfo field.
vm_resolve_modules() {
    local moddir; moddir=$(vm_moddir)
    declare -A path=() seen=()
    local f n
    while IFS= read -r f; do
        n=${f##*/}; n=${n%%.ko*}; n=${n//-/_}
        path[$n]=$f
    done < <(find "$moddir/kernel" -name '*.ko*')
    local order=()
    visit() {
        local m=${1//-/_}
        [ -n "${seen[$m]:-}" ] && return 0
        seen[$m]=1
        local p=${path[$m]:-}
        [ -n "$p" ] || { vm_log "module $m not found (built in?)"; return 0; }
        local deps
        deps=$(vm_modinfo_depends "$p")
        local d
        for d in ${deps//,/ }; do visit "$d"; done
        order+=("$p")
    }
    for n in "$@"; do visit "$n"; done
    printf '%s\n' "${order[@]}"
}

vm_modinfo_depends() {
    case $1 in
        *.xz) xz -dc "$1" ;;
        *.zst) zstd -dc "$1" ;;
        *) cat "$1" ;;
    esac | LC_ALL=C tr '\0' '\n' | sed -n 's/^depends=//p' | head -1
}

# Builds the static guest binary. Sets VM_IVCOM.
vm_build_guest_bin() {
    vm_log "building static ivcom (release, crt-static)"
    (cd "$VM_REPO" && RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=$VM_CARGO_TARGET_DIR \
        cargo build -q --release --target x86_64-unknown-linux-gnu -p ivcom-cli) ||
        vm_die "cargo build of the static guest binary failed"
    VM_IVCOM=$VM_CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/ivcom
    vm_is_static "$VM_IVCOM" || vm_die "$VM_IVCOM is dynamically linked: the guest has no libc"
}

# Builds target/vm/initrd.gz: busybox, the modules, ivcom, /init and the step files.
vm_initramfs() {
    local root=$VM_DIR/initramfs
    rm -rf "$root"
    mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,mnt,lib/modules,steps}
    cp /bin/busybox "$root/bin/busybox"
    local a
    for a in $(/bin/busybox --list); do
        [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"
    done
    local i=0 p n order=()
    while IFS= read -r p; do
        n=${p##*/}; n=${n%%.ko*}
        i=$((i + 1))
        local dst; dst=$(printf '%s/lib/modules/%02d-%s.ko' "$root" "$i" "$n")
        case $p in *.xz) xz -dc "$p" >"$dst" ;; *.zst) zstd -dc "$p" >"$dst" ;; *) cp "$p" "$dst" ;; esac
        order+=("$n")
    done < <(vm_resolve_modules "${VM_MODULES[@]}")
    vm_log "guest modules: ${order[*]}"
    # Debug info stays on the host (the guest decompresses every byte of the initramfs).
    strip -o "$root/bin/ivcom" "$VM_IVCOM" 2>/dev/null || cp "$VM_IVCOM" "$root/bin/ivcom"
    cp "$VM_REPO/scripts/vm/init" "$root/init"
    cp "$VM_REPO"/scripts/vm/steps/*.sh "$root/steps/"
    chmod +x "$root/init"
    VM_INITRD=$VM_DIR/initrd.gz
    (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1 >"$VM_INITRD.tmp") &&
        mv "$VM_INITRD.tmp" "$VM_INITRD"
}

# Decides the accelerator: tcg unless asked for kvm (or auto and a probe boot under KVM works).
vm_pick_accel() {
    case $VM_ACCEL in
        tcg | kvm) ;;
        auto)
            VM_ACCEL=tcg
            if [ -w /dev/kvm ]; then
                vm_log "probing KVM with a short boot"
                mkdir -p "$VM_RUN"
                local log=$VM_RUN/kvm-probe.log
                : >"$log"
                timeout -k 2 10 qemu-system-x86_64 -accel kvm -cpu host -m 128 -smp 1 -nodefaults \
                    -no-user-config -display none -no-reboot -monitor none -serial "file:$log" \
                    -kernel "$VM_VMLINUX" -initrd "$VM_INITRD" \
                    -append "console=ttyS0 panic=-1 quiet steps=none" >/dev/null 2>&1 || true
                grep -q '@@ivcom done' "$log" && VM_ACCEL=kvm
            fi
            vm_log "accelerator: $VM_ACCEL"
            ;;
        *) vm_die "VM_ACCEL must be tcg, kvm or auto" ;;
    esac
}

# Everything a boot needs. Sets VM_VMLINUX, VM_INITRD, VM_IVCOM.
vm_prepare() {
    vm_install_deps
    vm_kernel
    vm_build_guest_bin
    vm_initramfs
    vm_pick_accel
    mkdir -p "$VM_RUN"
}

# vm_enter_netns "$@": re-executes the calling script ($0) once inside a new network namespace,
# with what vm_prepare set exported; inside it, brings up loopback. Call after vm_prepare:
#   [ -n "${VM_IN_NETNS:-}" ] || vm_prepare; vm_enter_netns "$@"
vm_enter_netns() {
    if [ -z "${VM_IN_NETNS:-}" ]; then
        export VM_IN_NETNS=1 VM_VMLINUX VM_INITRD VM_IVCOM VM_ACCEL VM_KVER
        exec unshare --net -- bash "$0" "$@"
    fi
    ip link set lo up 2>/dev/null || /bin/busybox ip link set lo up
}

# vm_boot NAME "KEY=VAL ..." [QEMU ARGS...]
# Starts guest NAME in the background; its serial console goes to $VM_RUN/NAME.log.
# The KEY=VAL words go on the kernel command line and become environment variables of /init.
vm_boot() {
    local name=$1 params=$2; shift 2
    local log=$VM_RUN/$name.log
    : >"$log"
    local cpu=${VM_CPU:-qemu64} machine=q35
    # Under KVM the emulated IOMMU wants the split irqchip (untested here: no usable KVM).
    [ "$VM_ACCEL" = kvm ] && cpu=host machine=q35,kernel-irqchip=split
    timeout -k 5 "$VM_GUEST_TIMEOUT" qemu-system-x86_64 \
        -accel "$VM_ACCEL" -cpu "$cpu" -machine "$machine" -device intel-iommu \
        -m "$VM_MEM" -smp 1 -nodefaults -no-user-config -display none -no-reboot -monitor none \
        -serial "file:$log" -kernel "$VM_VMLINUX" -initrd "$VM_INITRD" \
        -append "console=ttyS0 panic=-1 quiet intel_iommu=on name=$name $params" \
        "$@" >"$VM_RUN/$name.qemu.log" 2>&1 &
    VM_PID[$name]=$!
    vm_log "booted $name (pid ${VM_PID[$name]}): $params"
}

# vm_wait SECONDS NAME...: waits for the guests to power off; kills (by PID) any still running
# at the deadline. Returns non-zero if a guest did not end with "@@ivcom done".
vm_wait() {
    local secs=$1; shift
    local deadline=$((SECONDS + secs)) name rc=0
    for name in "$@"; do
        local pid=${VM_PID[$name]}
        while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            vm_log "$name still running at the deadline: killing pid $pid"
            kill "$pid" 2>/dev/null; sleep 1; kill -9 "$pid" 2>/dev/null
            rc=1
        fi
        wait "$pid" 2>/dev/null || true
        if ! grep -q '@@ivcom done' "$VM_RUN/$name.log"; then
            vm_log "$name ended without its done marker; last lines of $VM_RUN/$name.log:"
            tail -n 25 "$VM_RUN/$name.log" | tr -d '\r' | sed 's/^/    /' >&2
            [ -s "$VM_RUN/$name.qemu.log" ] && sed 's/^/    qemu: /' "$VM_RUN/$name.qemu.log" >&2
            rc=1
        fi
    done
    return $rc
}

# vm_markers NAME [WORD]: marker lines of a guest ("@@ivcom WORD ..."), without the prefix.
vm_markers() {
    local m
    m=$(tr -d '\r' <"$VM_RUN/$1.log" | sed -n 's/^.*@@ivcom //p')
    if [ -n "${2:-}" ]; then printf '%s\n' "$m" | grep "^$2\b" || true; else printf '%s\n' "$m"; fi
}

# vm_field "LINE" KEY: the value of KEY=VALUE in a marker line.
vm_field() { printf '%s\n' "$1" | tr ' ' '\n' | sed -n "s/^$2=//p" | head -1; }

# vm_boot_pair STEPS "A QEMU ARGS" "B QEMU ARGS" [COMMON KEY=VAL...]
# Boots guests "a" and "b" (role=a / role=b) with the same step list, connected by
# virtio-net over UDP on loopback (10.0.2.1 / 10.0.2.2), plus whatever QEMU args are given
# (ivshmem devices). Waits for both; non-zero if either misses its done marker or a step failed.
vm_boot_pair() {
    local steps=$1 a_args=$2 b_args=$3; shift 3
    local common="steps=$steps run=${VM_NONCE:-$RANDOM$RANDOM} $*"
    local pa=$((20000 + RANDOM % 20000)); local pb=$((pa + 1))
    # shellcheck disable=SC2086
    vm_boot a "role=a ip=10.0.2.1 peer=10.0.2.2 $common" $a_args \
        -netdev "socket,id=n0,udp=127.0.0.1:$pb,localaddr=127.0.0.1:$pa" \
        -device virtio-net-pci,netdev=n0,mac=52:54:00:00:00:0a
    # shellcheck disable=SC2086
    vm_boot b "role=b ip=10.0.2.2 peer=10.0.2.1 $common" $b_args \
        -netdev "socket,id=n0,udp=127.0.0.1:$pa,localaddr=127.0.0.1:$pb" \
        -device virtio-net-pci,netdev=n0,mac=52:54:00:00:00:0b
    local rc=0
    vm_wait "$VM_GUEST_TIMEOUT" a b || rc=1
    local name
    for name in a b; do
        local done_line; done_line=$(vm_markers "$name" done)
        [ "$(vm_field "$done_line" failed)" = 0 ] || { vm_log "$name: ${done_line:-no done marker}"; rc=1; }
    done
    return $rc
}
