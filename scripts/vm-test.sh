#!/usr/bin/env bash
# Boots two QEMU guests on this host and measures what ivcom's VM transport stands on:
# the ivshmem device layer (probe in sysfs and VFIO modes; raw polled and doorbell-driven
# ping-pong over BAR2), ivcom channels between the guests through their agents over the
# ivshmem-doorbell region `ivcom daemon` serves (polled and interrupt-driven round trips, a
# 256 MiB transfer with SHA-256 compared, a guest powering off mid-transfer, idle CPU), a
# channel between a host process and a guest, and the TCP baseline between the same guests
# over virtio-net (64 B and 4 KiB round trips, a 256 MiB transfer measured the same way).
# Prints a table and ivcom-vs-TCP ratios; exits non-zero on an integrity error, a failed step,
# a missing marker, or a power-off that was not noticed in bounded time (never on speed).
#
#   scripts/vm-test.sh
# Environment (all optional):
#   VM_ACCEL=tcg|kvm|auto    accelerator (tcg: /dev/kvm on these machines hangs a stock kernel)
#   VM_DOORBELL=auto|on|off  doorbell tests through `ivcom daemon` (auto: when the CLI has it)
#   VM_DOORBELL_SOCKET=PATH  use an ivshmem server already listening there instead of the daemon
#                            (any server of QEMU's protocol; both guests connect to it)
#   VM_QUICK=1               fewer round trips and 32 MiB transfers
#   VM_GUEST_TIMEOUT=240     seconds before a guest is killed
# Installs what it needs (apt-get) and caches the guest kernel under target/vm/cache.
# How it works and how to boot two VMs by hand: docs/vm-harness.md.
set -euo pipefail
cd "$(dirname "$0")/.."
# The 256 MiB transfers are sent from and received into memory.
VM_MEM=${VM_MEM:-768}
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
    if [ -n "${HOSTCHAN_PID:-}" ]; then kill "$HOSTCHAN_PID" 2>/dev/null || true; fi
    if [ -n "${WATCH_PID:-}" ]; then kill "$WATCH_PID" 2>/dev/null || true; fi
    if [ -n "${HOSTAGENT_PID:-}" ]; then kill "$HOSTAGENT_PID" 2>/dev/null || true; wait "$HOSTAGENT_PID" 2>/dev/null || true; fi
    if [ -n "$DAEMON_PID" ]; then kill "$DAEMON_PID" 2>/dev/null || true; wait "$DAEMON_PID" 2>/dev/null || true; fi
    local n
    for n in "${!VM_PID[@]}"; do kill "${VM_PID[$n]}" 2>/dev/null || true; done
    rm -f "$SHM"
    [ "${doorbell:-0}" = 1 ] && rm -f /dev/shm/ivcom.vmplain
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
chan=0
if [ $doorbell = 1 ]; then
    # Members a and b are the guests, "host" a process on this machine (ivcom agent --join).
    # 64 MiB: the daemon's directory then gives each channel 1 MiB rings per direction.
    # 8 vectors: each channel gets its own interrupt vector (the process sleeps on it).
    cfg=$VM_RUN/daemon.toml
    cat >"$cfg" <<TOML
socket_dir = "$VM_RUN/sock"
[[group]]
name = "vmtest"
members = ["a", "b", "host"]
size = "64M"
vectors = 8
[[group]]
name = "vmplain"
members = ["a", "b"]
size = "8M"
plain = true
TOML
    # The plain region's file outlives the daemon: start from a fresh one.
    rm -f /dev/shm/ivcom.vmplain
    "$VM_IVCOM" daemon --config "$cfg" >"$VM_RUN/daemon.log" 2>&1 &
    DAEMON_PID=$!
    # Sockets are SOCKET_DIR/REGION/MEMBER.sock; wait (bounded) until all three are there.
    for _ in $(seq 100); do
        [ -S "$VM_RUN/sock/vmtest/a.sock" ] && [ -S "$VM_RUN/sock/vmtest/b.sock" ] &&
            [ -S "$VM_RUN/sock/vmtest/host.sock" ] && break
        kill -0 $DAEMON_PID 2>/dev/null || { cat "$VM_RUN/daemon.log" >&2; vm_die "ivcom daemon exited"; }
        sleep 0.1
    done
    [ -S "$VM_RUN/sock/vmtest/host.sock" ] || vm_die "ivcom daemon did not create its sockets in 10 s"
    # The host's member of the group: an agent that joins through the daemon (it maps the
    # region's memfd and rings the guests through their eventfds).
    HOST_AGENT_SOCK=$VM_RUN/host-agent.sock
    "$VM_IVCOM" agent --join "$VM_RUN/sock/vmtest/host.sock" --socket "$HOST_AGENT_SOCK" \
        >"$VM_RUN/host-agent.log" 2>&1 &
    HOSTAGENT_PID=$!
    for _ in $(seq 100); do
        [ -S "$HOST_AGENT_SOCK" ] && break
        kill -0 $HOSTAGENT_PID 2>/dev/null || { cat "$VM_RUN/host-agent.log" >&2; vm_die "host agent exited"; }
        sleep 0.1
    done
    [ -S "$HOST_AGENT_SOCK" ] || vm_die "host agent did not create its socket in 10 s"
    chan=1
    a_args="$a_args $("$VM_IVCOM" qemu-args --config "$cfg" --region vmtest --member a | tr '\n' ' ')"
    b_args="$b_args $("$VM_IVCOM" qemu-args --config "$cfg" --region vmtest --member b | tr '\n' ' ')"
    # After the others, so the raw tests' plain device stays the first plain one.
    a_args="$a_args $("$VM_IVCOM" qemu-args --config "$cfg" --region vmplain --member a --plain | tr '\n' ' ')"
    b_args="$b_args $("$VM_IVCOM" qemu-args --config "$cfg" --region vmplain --member b --plain | tr '\n' ' ')"
fi
if [ $doorbell = 2 ]; then
    db="-chardev socket,path=$VM_DOORBELL_SOCKET,id=ivs -device ivshmem-doorbell,chardev=ivs,vectors=1"
    a_args="$a_args $db"; b_args="$b_args $db"
    doorbell=1
fi
[ $doorbell = 1 ] && steps=$steps,poll_doorbell,doorbell
# Order matters: spinning sides need a core each (2 cores: two guests, or a guest and a host
# process), so the host tests come after the guest-to-guest ones, while guest b waits
# (asleep) in chan_poweroff for guest a; the power-off test comes last.
steps=$steps,tcp
[ $chan = 1 ] && steps=$steps,chan,chan_plain
steps=$steps,poll_host
[ $chan = 1 ] && steps=$steps,chan_host,chan_poweroff

if [ "${VM_QUICK:-0}" = 1 ]; then
    pp_count=2000 bulk_mib=32 host_poll=2000 host_irq=200
    tun="db_count=200 tcp_count=200 chan_poll_count=2000 chan_irq_count=200"
else
    pp_count=20000 bulk_mib=256 host_poll=20000 host_irq=1000
    tun="db_count=1000 tcp_count=1000 chan_poll_count=20000 chan_irq_count=2000"
fi
tun="pp_count=$pp_count tcp_bulk_mib=$bulk_mib chan_bulk_mib=$bulk_mib $tun"
HOST_BULK_MIB=16

# The host side of step poll_host: a process on the file behind ivshmem-plain, as guest b.
timeout -k 5 "$VM_GUEST_TIMEOUT" "$VM_IVCOM" vm pingpong --role b --shm-file "$SHM" --mode poll \
    --slot 3 --run "$VM_NONCE" --count "$pp_count" --timeout-secs $((VM_GUEST_TIMEOUT > 20 ? VM_GUEST_TIMEOUT - 10 : 10)) \
    >"$VM_RUN/host.log" 2>&1 &
HOST_PID=$!

# The host side of step chan_host: once guest a listens, round trips and a transfer through the
# host's agent (same commands as in the guests).
host_chan() {
    local deadline=$((SECONDS + VM_GUEST_TIMEOUT)) rc=0
    until grep -q 'chan-listening name=hostirq' "$VM_RUN/a.log" 2>/dev/null &&
        grep -q 'chan-listening name=hostpoll' "$VM_RUN/a.log" 2>/dev/null; do
        [ $SECONDS -lt $deadline ] || { echo "guest a never listened on hostpoll/hostirq"; return 1; }
        sleep 0.2
    done
    export IVCOM_AGENT=$HOST_AGENT_SOCK
    timeout -k 2 60 "$VM_IVCOM" vm-chan rtt hostpoll --size 64 --count "$host_poll" --label host-poll64 || rc=1
    timeout -k 2 60 "$VM_IVCOM" vm-chan rtt hostirq --size 64 --count "$host_irq" --spin-us 0 --label host-irq64 || rc=1
    timeout -k 2 60 "$VM_IVCOM" vm-chan transfer hostpoll --bytes $((HOST_BULK_MIB << 20)) --label host-bulk || rc=1
    return $rc
}

# Host clock for the power-off test: from guest b's last marker before `poweroff -f` to guest
# a's marker saying its transfer broke, both seen in the serial logs (polled every 20 ms).
poweroff_watch() {
    local deadline=$((SECONDS + VM_GUEST_TIMEOUT)) t_off= t_cut=
    until grep -q 'chan-listening name=cut' "$VM_RUN/b.log" 2>/dev/null; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.5
    done
    while [ $SECONDS -lt $deadline ]; do
        [ -z "$t_off" ] && grep -q '@@ivcom chan-poweroff' "$VM_RUN/b.log" && t_off=$(date +%s.%N)
        [ -n "$t_off" ] && grep -q '@@ivcom chan-transfer-cut label' "$VM_RUN/a.log" && t_cut=$(date +%s.%N) && break
        sleep 0.02
    done
    [ -n "$t_cut" ] || return 1
    echo "@@ivcom host-poweroff-watch secs=$(awk -v a="$t_off" -v b="$t_cut" 'BEGIN { printf "%.2f", b - a }')"
}

vm_log "booting a and b (accel $VM_ACCEL, steps $steps)"
T_BOOT=$SECONDS
boot_ok=1
if [ $chan = 1 ]; then
    host_chan >"$VM_RUN/host-chan.log" 2>&1 &
    HOSTCHAN_PID=$!
    poweroff_watch >"$VM_RUN/poweroff-watch.log" 2>&1 &
    WATCH_PID=$!
fi
vm_boot_pair "$steps" "$a_args" "$b_args" $tun || boot_ok=0
vm_log "guests done in $((SECONDS - T_BOOT)) s; serial logs in $VM_RUN"
# The guests are gone, so the host side has nobody left to talk to: give it 10 s to finish.
for _ in $(seq 100); do kill -0 $HOST_PID 2>/dev/null || break; sleep 0.1; done
kill $HOST_PID 2>/dev/null || true
host_ok=1
wait $HOST_PID || host_ok=0
HOST_PID=
hostchan_ok=1
if [ -n "${HOSTCHAN_PID:-}" ]; then
    for _ in $(seq 100); do kill -0 $HOSTCHAN_PID 2>/dev/null || break; sleep 0.1; done
    kill $HOSTCHAN_PID 2>/dev/null || true
    wait $HOSTCHAN_PID || hostchan_ok=0
    HOSTCHAN_PID=
fi
if [ -n "${WATCH_PID:-}" ]; then
    for _ in $(seq 20); do kill -0 $WATCH_PID 2>/dev/null || break; sleep 0.1; done
    kill $WATCH_PID 2>/dev/null || true
    wait $WATCH_PID 2>/dev/null || true
    WATCH_PID=
fi

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
    rows+=("$(printf '%-4s %-40s %-40s %s' "$ok" "$1" "$2" "$3")")
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
tcp_mbs=
if [ -z "$snd" ] || [ -z "$rcv" ]; then
    fail "no TCP bulk result"; row "TCP bulk a->b" "-" "MISSING"
else
    sa=$(vm_field "$snd" sha256); sb=$(vm_field "$rcv" sha256)
    [ -n "$sa" ] && [ "$sa" = "$sb" ] || fail "TCP bulk SHA-256 differs: a=$sa b=$sb"
    tcp_mbs=$(vm_field "$snd" mb_per_s)
    row "TCP bulk a->b (virtio-net)" "$(( $(vm_field "$snd" bytes) >> 20 )) MiB, sha256 ${sa:0:12}.. $([ "$sa" = "$sb" ] && echo equal || echo DIFFERENT)" \
        "$tcp_mbs MB/s (hashing untimed: a $(vm_field "$snd" hash_secs) s, b $(vm_field "$rcv" hash_secs) s)"
fi

# --- ivcom channels (through the agents) -----------------------------------------------------
us() { awk -v n="$1" 'BEGIN { if (n == "") print "-"; else printf "%.1f", n / 1000 }'; }
ns() { awk -v n="$1" 'BEGIN { if (n != "") print n * 1000 }'; }
# ratio A B: A / B with one decimal, or "-" if either is missing or zero.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || a + 0 == 0 || b + 0 == 0) print "-"; else printf "%.1f", a / b }'; }
host_markers() { tr -d '\r' <"$VM_RUN/host-chan.log" 2>/dev/null | sed -n 's/^@@ivcom //p' | grep "^$1 " || true; }
declare -A chan_p50=()
chan_rtt_row() { # chan_rtt_row TEST LINE LABEL
    local line=$2
    if [ -z "$line" ]; then fail "no ivcom round-trip result $3"; row "$1" "-" "MISSING"; return; fi
    chan_p50[$3]=$(vm_field "$line" p50_ns)
    row "$1" "$(vm_field "$line" size) B x $(vm_field "$line" count)" \
        "rtt p50 $(us "$(vm_field "$line" p50_ns)") us, p99 $(us "$(vm_field "$line" p99_ns)"), p99.9 $(us "$(vm_field "$line" p999_ns)"); doorbells/msg $(vm_field "$line" signals_per_msg), sleeps $(vm_field "$line" sleeps)"
}
# xfer_check SND RCV WHAT: fails unless the sender says its SHA-256 matched the receiver's and
# both markers carry the same one; sets xfer_shape to the table's shape column.
xfer_check() {
    local sa sb
    sa=$(vm_field "$1" sha256); sb=$(vm_field "$2" sha256)
    [ "$(vm_field "$1" match)" = yes ] && [ -n "$sa" ] && [ "$sa" = "$sb" ] ||
        fail "$3 transfer SHA-256 differs: sender $sa, receiver $sb"
    xfer_shape="$(( $(vm_field "$1" bytes) >> 20 )) MiB, sha256 ${sa:0:12}.. $([ "$sa" = "$sb" ] && echo equal || echo DIFFERENT)"
}
# idle_row TEST A_LINE B_LINE NOTE: each guest's CPU use while idle; only a polling loop would
# make a guest more than half busy (the number itself is reported).
idle_row() {
    if [ -z "$2" ] || [ -z "$3" ]; then
        fail "no idle CPU result for $1"; row "$1" "-" "MISSING"; return
    fi
    local pa pb v
    pa=$(vm_field "$2" cpu_busy_pct); pb=$(vm_field "$3" cpu_busy_pct)
    for v in "a:$pa" "b:$pb"; do
        awk -v p="${v#*:}" 'BEGIN { exit !(p + 0 <= 50) }' || fail "guest ${v%%:*} is ${v#*:} % busy in '$1' (a polling loop?)"
    done
    row "$1" "$(vm_field "$2" secs) s, /proc/stat in each guest" "guest a $pa % busy, guest b $pb % ($4)"
}
chan_mbs= chan_sig=
if [ $chan = 1 ]; then
    for l in poll64:polled poll4k:polled "spin64:polled, 1 ms spin" "spin4k:polled, 1 ms spin" \
        irq64:interrupt-driven irq4k:interrupt-driven; do
        chan_rtt_row "ivcom channel a<->b, ${l#*:}" "$(need a chan-rtt "label=${l%%:*} ")" "${l%%:*}"
    done
    snd=$(need a chan-transfer "label=bulk "); rcv=$(need b chan-sink "name=poll " "sha256=")
    if [ -z "$snd" ] || [ -z "$rcv" ]; then
        fail "no ivcom transfer result (a: ${snd:-none}; b: ${rcv:-none})"; row "ivcom transfer a->b" "-" "MISSING"
    else
        xfer_check "$snd" "$rcv" "ivcom a->b"
        chan_mbs=$(vm_field "$snd" mb_per_s)
        sig_a=$(vm_field "$snd" signals_sent); sig_b=$(vm_field "$rcv" signals_sent)
        chan_sig=$(awk -v a="$sig_a" -v b="$sig_b" -v w="$(vm_field "$snd" writes)" 'BEGIN { printf "%.4f", (a + b) / w }')
        row "ivcom transfer a->b" "$xfer_shape" \
            "$chan_mbs MB/s; doorbells per 64 KiB write $chan_sig (a $sig_a, b $sig_b in $(vm_field "$snd" writes) writes)"
    fi
    idle_row "idle CPU, agents + idle channel" "$(need a chan-idle "name=poll ")" "$(need b chan-idle-server "name=poll ")" \
        "both ends blocked in a read"

    for l in "plainpoll64:polled" "plainirq64:sleeping, woken by polling agents"; do
        chan_rtt_row "ivcom channel a<->b ivshmem-plain, ${l#*:}" "$(need a chan-rtt "label=${l%%:*} ")" "${l%%:*}"
    done
    snd=$(need a chan-transfer "label=plainbulk "); rcv=$(need b chan-sink "name=plainpoll " "sha256=")
    if [ -z "$snd" ] || [ -z "$rcv" ]; then
        fail "no ivshmem-plain transfer result"; row "ivcom transfer a->b ivshmem-plain" "-" "MISSING"
    else
        xfer_check "$snd" "$rcv" "ivshmem-plain a->b"
        row "ivcom transfer a->b ivshmem-plain" "$xfer_shape" "$(vm_field "$snd" mb_per_s) MB/s"
    fi
    idle_row "idle CPU, polling agents" "$(need a chan-idle "name=plainpoll ")" "$(need b chan-idle-server "name=plainpoll ")" \
        "agents poll, backing off to 20 ms"

    [ $hostchan_ok = 1 ] || fail "host side of chan_host failed: $(grep -v '^@@ivcom' "$VM_RUN/host-chan.log" | tail -3 | tr '\n' ' ')"
    chan_rtt_row "ivcom channel host<->a, polled" "$(host_markers chan-rtt | grep 'label=host-poll64 ' || true)" host-poll64
    chan_rtt_row "ivcom channel host<->a, interrupt-driven" "$(host_markers chan-rtt | grep 'label=host-irq64 ' || true)" host-irq64
    snd=$(host_markers chan-transfer | grep 'label=host-bulk ' || true); rcv=$(need a chan-sink "name=hostpoll " "sha256=")
    if [ -z "$snd" ] || [ -z "$rcv" ]; then
        fail "no host->guest transfer result"; row "ivcom transfer host->a" "-" "MISSING"
    else
        xfer_check "$snd" "$rcv" "host->guest"
        row "ivcom transfer host->a" "$xfer_shape" \
            "$(vm_field "$snd" mb_per_s) MB/s; doorbells per 64 KiB write $(vm_field "$snd" signals_per_write) (host side)"
    fi

    cut=$(need a chan-transfer-cut "bytes_sent="); off=$(need b chan-poweroff)
    if [ -z "$cut" ] || [ -z "$off" ]; then
        fail "power-off test incomplete (a: ${cut:-no result}; b: ${off:-did not power off})"
        row "guest b powers off mid-transfer" "-" "MISSING"
    else
        st=$(vm_field "$cut" stalled_secs)
        [ "$(vm_field "$cut" broke)" = yes ] || fail "a's transfer did not end with an error after b powered off ($cut)"
        awk -v s="$st" 'BEGIN { exit !(s != "" && s + 0 <= 5) }' || fail "a's transfer took $st s (> 5 s) to fail after b powered off"
        hw=$(vm_field "$(sed -n 's/^@@ivcom //p' "$VM_RUN/poweroff-watch.log" 2>/dev/null)" secs)
        row "guest b powers off mid-transfer" "a->b stream, b: poweroff -f" \
            "a's write failed ($(vm_field "$cut" error)) $st s after its last progress (bound 5 s); host clock, b's last marker to a's: ${hw:-?} s; $(( $(vm_field "$cut" bytes_sent) >> 20 )) MiB sent"
    fi
fi

{
    echo "VM harness results (accel $VM_ACCEL, kernel $VM_KVER, $(nproc) cores; one vCPU per guest)"
    printf '%-4s %-40s %-40s %s\n' "" "test" "shape" "result"
    printf '%s\n' "${rows[@]}"
    if [ $chan = 1 ]; then
        tcp64=$(vm_field "$(need a tcp-rtt "size=64 ")" rtt_us_p50); tcp4k=$(vm_field "$(need a tcp-rtt "size=4096 ")" rtt_us_p50)
        echo
        echo "ivcom channel vs TCP between the same two guests (round trips: p50; targets are reported, never enforced)"
        printf '  %-40s %12s %12s %10s %10s  %s\n' "measure" "ivcom" "TCP" "ratio" "target" ""
        cmp_row() { # cmp_row MEASURE IVCOM TCP RATIO TARGET_MIN
            local met=missed
            awk -v r="$4" -v t="$5" 'BEGIN { exit !(r != "-" && r + 0 >= t) }' && met=met
            printf '  %-40s %12s %12s %10s %10s  %s\n' "$1" "$2" "$3" "$([ "$4" = - ] && echo - || echo "${4}x")" ">= ${5}x" "$met"
        }
        cmp_row "64 B round trip, polled (us)" "$(us "${chan_p50[poll64]:-}")" "$tcp64" "$(ratio "$(ns "$tcp64")" "${chan_p50[poll64]:-}")" 50
        cmp_row "4 KiB round trip, polled (us)" "$(us "${chan_p50[poll4k]:-}")" "$tcp4k" "$(ratio "$(ns "$tcp4k")" "${chan_p50[poll4k]:-}")" 50
        cmp_row "64 B round trip, polled, 1 ms spin (us)" "$(us "${chan_p50[spin64]:-}")" "$tcp64" "$(ratio "$(ns "$tcp64")" "${chan_p50[spin64]:-}")" 50
        cmp_row "4 KiB round trip, polled, 1 ms spin (us)" "$(us "${chan_p50[spin4k]:-}")" "$tcp4k" "$(ratio "$(ns "$tcp4k")" "${chan_p50[spin4k]:-}")" 50
        cmp_row "64 B round trip, interrupt-driven (us)" "$(us "${chan_p50[irq64]:-}")" "$tcp64" "$(ratio "$(ns "$tcp64")" "${chan_p50[irq64]:-}")" 2
        cmp_row "4 KiB round trip, interrupt-driven (us)" "$(us "${chan_p50[irq4k]:-}")" "$tcp4k" "$(ratio "$(ns "$tcp4k")" "${chan_p50[irq4k]:-}")" 2
        cmp_row "$bulk_mib MiB transfer (MB/s)" "${chan_mbs:--}" "${tcp_mbs:--}" "$(ratio "$chan_mbs" "$tcp_mbs")" 5
        met=missed
        awk -v s="$chan_sig" 'BEGIN { exit !(s != "" && s + 0 < 0.01) }' && met=met
        printf '  %-40s %12s %12s %10s %10s  %s\n' "doorbells per 64 KiB write, streaming" "${chan_sig:--}" "-" "" "< 0.01" "$met"
    fi
} >"$VM_RUN/results.txt"
echo; cat "$VM_RUN/results.txt"
echo "total $(( $(date +%s) - VM_START )) s (guests $((SECONDS - T_BOOT)) s); logs: $VM_RUN/{a,b}.log, table: $VM_RUN/results.txt"
if [ $rc = 0 ]; then echo "vm-test: PASS"; else echo "vm-test: FAIL"; fi
nbad=$((${#rows[@]} - npass))
[ $rc != 0 ] && [ $nbad = 0 ] && nbad=1
echo "vm-test: $npass passed, $nbad failed"
exit $rc
