#!/usr/bin/env bash
# Boots two QEMU guests on this host and measures what ivcom's VM transport stands on:
# the ivshmem device layer (probe in sysfs and VFIO modes; raw polled and doorbell-driven
# ping-pong over BAR2) and the TCP baseline between the same guests over virtio-net
# (64 B and 4 KiB round trips, a bulk transfer with SHA-256 compared on both sides).
# Prints a table; exits non-zero on an integrity error, a failed step or a missing marker.
#
#   scripts/vm-test.sh
# Environment (all optional):
#   VM_ACCEL=tcg|kvm|auto    accelerator (tcg: /dev/kvm on these machines hangs a stock kernel)
#   VM_DOORBELL=auto|on|off  doorbell tests through `ivcom daemon` (auto: when the CLI has it)
#   VM_DOORBELL_SOCKET=PATH  use an ivshmem server already listening there instead of the daemon
#                            (any server of QEMU's protocol; both guests connect to it)
#   VM_QUICK=1               fewer round trips and a 32 MiB bulk transfer
#   VM_GUEST_TIMEOUT=240     seconds before a guest is killed
# Installs what it needs (apt-get) and caches the guest kernel under target/vm/cache.
# How it works and how to boot two VMs by hand: docs/vm-harness.md.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/vm/lib.sh

VM_DOORBELL=${VM_DOORBELL:-auto}
VM_START=${VM_START:-$(date +%s)}
export VM_START

if [ -z "${VM_IN_NETNS:-}" ]; then
    [ "$(id -u)" = 0 ] || vm_die "run as root (apt-get, network namespace, /dev/shm)"
    vm_prepare
fi
# The guests' only link is QEMU's UDP socket on loopback; a private network namespace keeps
# anything they send on this machine.
vm_enter_netns "$@"
rm -rf "$VM_RUN" && mkdir -p "$VM_RUN"
VM_NONCE=$((RANDOM * 32768 + RANDOM + 1))
SHM=/dev/shm/ivcom-vmtest-$$
DAEMON_PID=

cleanup() {
    if [ -n "${HOST_PID:-}" ]; then kill "$HOST_PID" 2>/dev/null || true; fi
    if [ -n "$DAEMON_PID" ]; then kill "$DAEMON_PID" 2>/dev/null || true; wait "$DAEMON_PID" 2>/dev/null || true; fi
    local n
    for n in "${!VM_PID[@]}"; do kill "${VM_PID[$n]}" 2>/dev/null || true; done
    rm -f "$SHM"
}
trap cleanup EXIT

# --- devices: ivshmem-plain always; ivshmem-doorbell when `ivcom daemon` exists ----------
truncate -s 4M "$SHM"
plain_args() {
    echo "-object memory-backend-file,size=4M,share=on,mem-path=$SHM,id=hm -device ivshmem-plain,memdev=hm"
}
doorbell=0
if [ "$VM_DOORBELL" != off ] && [ -n "${VM_DOORBELL_SOCKET:-}" ]; then
    [ -S "$VM_DOORBELL_SOCKET" ] || vm_die "VM_DOORBELL_SOCKET=$VM_DOORBELL_SOCKET is not a socket"
    doorbell=2
elif [ "$VM_DOORBELL" != off ]; then
    if "$VM_IVCOM" daemon --help >/dev/null 2>&1 && "$VM_IVCOM" qemu-args --help >/dev/null 2>&1; then
        doorbell=1
    elif [ "$VM_DOORBELL" = on ]; then
        vm_die "VM_DOORBELL=on but this ivcom has no daemon/qemu-args subcommands"
    else
        vm_log "ivcom has no 'daemon' subcommand yet: doorbell tests skipped (ivshmem-plain only)"
    fi
fi
a_args=$(plain_args); b_args=$(plain_args)
steps=probe,poll_plain,poll_plain_4k
if [ $doorbell = 1 ]; then
    cfg=$VM_RUN/daemon.toml
    cat >"$cfg" <<TOML
socket_dir = "$VM_RUN/sock"
[[group]]
name = "vmtest"
members = ["a", "b"]
size = "4M"
vectors = 1
TOML
    "$VM_IVCOM" daemon --config "$cfg" >"$VM_RUN/daemon.log" 2>&1 &
    DAEMON_PID=$!
    # Sockets are SOCKET_DIR/REGION/MEMBER.sock; wait (bounded) until both are there.
    for _ in $(seq 100); do
        [ -S "$VM_RUN/sock/vmtest/a.sock" ] && [ -S "$VM_RUN/sock/vmtest/b.sock" ] && break
        kill -0 $DAEMON_PID 2>/dev/null || { cat "$VM_RUN/daemon.log" >&2; vm_die "ivcom daemon exited"; }
        sleep 0.1
    done
    [ -S "$VM_RUN/sock/vmtest/b.sock" ] || vm_die "ivcom daemon did not create its sockets in 10 s"
    a_args="$a_args $("$VM_IVCOM" qemu-args --config "$cfg" --region vmtest --member a | tr '\n' ' ')"
    b_args="$b_args $("$VM_IVCOM" qemu-args --config "$cfg" --region vmtest --member b | tr '\n' ' ')"
fi
if [ $doorbell = 2 ]; then
    db="-chardev socket,path=$VM_DOORBELL_SOCKET,id=ivs -device ivshmem-doorbell,chardev=ivs,vectors=1"
    a_args="$a_args $db"; b_args="$b_args $db"
    doorbell=1
fi
[ $doorbell = 1 ] && steps=$steps,poll_doorbell,doorbell
steps=$steps,tcp,poll_host

if [ "${VM_QUICK:-0}" = 1 ]; then
    pp_count=2000 tun="db_count=200 tcp_count=200 tcp_bulk_mib=32"
else
    pp_count=20000 tun="db_count=1000 tcp_count=1000 tcp_bulk_mib=256"
fi
tun="pp_count=$pp_count $tun"

# The host side of step poll_host: a process on the file behind ivshmem-plain, as guest b.
timeout -k 5 "$VM_GUEST_TIMEOUT" "$VM_IVCOM" vm pingpong --role b --shm-file "$SHM" --mode poll \
    --slot 3 --run "$VM_NONCE" --count "$pp_count" --timeout-secs $((VM_GUEST_TIMEOUT > 20 ? VM_GUEST_TIMEOUT - 10 : 10)) \
    >"$VM_RUN/host.log" 2>&1 &
HOST_PID=$!

vm_log "booting a and b (accel $VM_ACCEL, steps $steps)"
T_BOOT=$SECONDS
boot_ok=1
vm_boot_pair "$steps" "$a_args" "$b_args" $tun || boot_ok=0
vm_log "guests done in $((SECONDS - T_BOOT)) s; serial logs in $VM_RUN"
# The guests are gone, so the host side has nobody left to talk to: give it 10 s to finish.
for _ in $(seq 100); do kill -0 $HOST_PID 2>/dev/null || break; sleep 0.1; done
kill $HOST_PID 2>/dev/null || true
host_ok=1
wait $HOST_PID || host_ok=0
HOST_PID=

# --- results ------------------------------------------------------------------------------
nfail=0 npass=0 seen_fail=0 rc=0
fail() { vm_log "FAIL: $*"; rc=1; nfail=$((nfail + 1)); }
need() { # need NAME WORD FILTER...: the first marker line of NAME starting WORD and matching all FILTERs
    local line; line=$(vm_markers "$1" "$2")
    shift 2
    local f
    for f in "$@"; do line=$(printf '%s\n' "$line" | grep -F -- "$f" || true); done
    printf '%s\n' "$line" | head -1
}
rows=()
# row LABEL SHAPE RESULT: a table line; it counts as failed if a check failed since the last row.
row() {
    local ok=ok
    if [ $nfail -gt $seen_fail ]; then ok=FAIL; else npass=$((npass + 1)); fi
    seen_fail=$nfail
    rows+=("$(printf '%-4s %-34s %-44s %s' "$ok" "$1" "$2" "$3")")
}

for g in a b; do
    for s in ${steps//,/ }; do
        line=$(need $g step "name=$s ")
        [ -n "$line" ] || { fail "$g: no marker for step $s"; continue; }
        [ "$(vm_field "$line" rc)" = 0 ] || fail "$g: step $s failed ($line)"
    done
done
[ $boot_ok = 1 ] || fail "a guest failed a step or missed its done marker (see above)"
row "guest steps (a and b)" "$(echo "${steps//,/ }" | wc -w) steps in each guest" "rc=0 and done marker: ${steps//,/ }"
for g in a b; do
    line=$(need $g probe-open kind=plain access=sysfs)
    [ "$(vm_field "$line" ok)" = 1 ] || fail "$g: plain device not opened through sysfs"
done
row "probe (plain, sysfs)" "bar2=$(vm_field "$(need a probe-device kind=plain)" bar2)" "opened in a and b"
if [ $doorbell = 1 ]; then
    for g in a b; do
        line=$(need $g probe-open kind=doorbell access=vfio)
        [ "$(vm_field "$line" ok)" = 1 ] || fail "$g: doorbell device not opened through VFIO"
    done
    pa=$(vm_field "$(need a probe-open kind=doorbell access=vfio)" peer_id)
    pb=$(vm_field "$(need b probe-open kind=doorbell access=vfio)" peer_id)
    [ -n "$pa" ] && [ "$pa" != "$pb" ] || fail "doorbell peer ids not distinct (a=$pa b=$pb)"
    row "probe (doorbell, VFIO)" "peer ids a=$pa b=$pb" "opened in a and b, MSI-X wired"
fi

pp_row() { # pp_row LABEL SLOT B_LOG: a's result in that slot; b's from guest b or the host
    local line; line=$(need a pingpong " slot=$2 ")
    local lb
    if [ "$3" = host ]; then lb=$(tr -d '\r' <"$VM_RUN/host.log" | sed -n 's/^@@ivcom //p' | grep "^pingpong " || true)
    else lb=$(need b pingpong " slot=$2 "); fi
    if [ -z "$line" ] || [ -z "$lb" ]; then fail "no pingpong result for $1"; row "$1" "-" "MISSING"; return; fi
    local e; e=$(( $(vm_field "$line" errors) + $(vm_field "$lb" errors) ))
    [ "$e" = 0 ] || fail "$1: $e corrupted messages"
    local w=""
    [ "$(vm_field "$line" mode)" = Doorbell ] && w=", interrupts a/b $(vm_field "$line" wakeups)/$(vm_field "$lb" wakeups)"
    row "$1" "$(vm_field "$line" size) B x $(vm_field "$line" count)" \
        "rtt mean $(vm_field "$line" rtt_us_mean) us, p50 $(vm_field "$line" rtt_us_p50), p99 $(vm_field "$line" rtt_us_p99)$w"
}
pp_row "ivshmem-plain polled (sysfs)" 0 b
pp_row "ivshmem-plain polled (sysfs)" 4 b
if [ $doorbell = 1 ]; then
    pp_row "ivshmem-doorbell polled (VFIO)" 1 b
    pp_row "ivshmem-doorbell doorbells (VFIO)" 2 b
fi
[ $host_ok = 1 ] || fail "host side of poll_host failed: $(tail -3 "$VM_RUN/host.log" | tr '\n' ' ')"
pp_row "ivshmem-plain polled guest<->host" 3 host

for size in 64 4096; do
    line=$(need a tcp-rtt "size=$size ")
    if [ -z "$line" ]; then fail "no TCP round-trip result at $size B"; row "TCP round trip" "$size B" "MISSING"; continue; fi
    [ "$(vm_field "$line" errors)" = 0 ] || fail "TCP round trips at $size B: echo differed"
    row "TCP round trip (virtio-net)" "$size B x $(vm_field "$line" count)" \
        "rtt mean $(vm_field "$line" rtt_us_mean) us, p50 $(vm_field "$line" rtt_us_p50), p99 $(vm_field "$line" rtt_us_p99)"
done
snd=$(need a tcp-bulk-send); rcv=$(need b tcp-bulk-recv)
if [ -z "$snd" ] || [ -z "$rcv" ]; then
    fail "no TCP bulk result"; row "TCP bulk a->b" "-" "MISSING"
else
    sa=$(vm_field "$snd" sha256); sb=$(vm_field "$rcv" sha256)
    [ -n "$sa" ] && [ "$sa" = "$sb" ] || fail "TCP bulk SHA-256 differs: a=$sa b=$sb"
    row "TCP bulk a->b (virtio-net)" "$(( $(vm_field "$snd" bytes) >> 20 )) MiB, sha256 ${sa:0:12}.. $([ "$sa" = "$sb" ] && echo equal || echo DIFFERENT)" \
        "$(vm_field "$rcv" mb_per_s) MB/s (receiver spent $(vm_field "$rcv" hash_secs) of $(vm_field "$rcv" secs) s hashing)"
fi

{
    echo "VM harness results (accel $VM_ACCEL, kernel $VM_KVER, $(nproc) cores; one vCPU per guest)"
    printf '%-4s %-34s %-44s %s\n' "" "test" "shape" "result"
    printf '%s\n' "${rows[@]}"
} >"$VM_RUN/results.txt"
echo; cat "$VM_RUN/results.txt"
echo "total $(( $(date +%s) - VM_START )) s (guests $((SECONDS - T_BOOT)) s); logs: $VM_RUN/{a,b}.log, table: $VM_RUN/results.txt"
if [ $rc = 0 ]; then echo "vm-test: PASS"; else echo "vm-test: FAIL"; fi
nbad=$((${#rows[@]} - npass))
[ $rc != 0 ] && [ $nbad = 0 ] && nbad=1
echo "vm-test: $npass passed, $nbad failed"
exit $rc
