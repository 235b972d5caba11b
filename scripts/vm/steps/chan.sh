# Guest steps of scripts/vm-test.sh that measure ivcom channels (sourced by /init): each guest
# runs `ivcom agent` on its ivshmem-doorbell device (VFIO: doorbells wake it) and the
# `ivcom vm-chan` commands talk through it. Listener names: poll (default spin), spin (1 ms
# spin), irq (--spin-us 0: every wait sleeps until a doorbell), hostpoll/hostirq (guest a, for
# the host), cut (guest b, the power-off test).
# Tunables (kernel command line): chan_poll_count, chan_irq_count, chan_bulk_mib (the host
# side's counts are vm-test.sh's).

IVCOM_AGENT=/tmp/ivcom/agent.sock
export IVCOM_AGENT

# The PCI address of the ivshmem-doorbell device: the 1af4:1110 device with a BAR1 (MSI-X).
chan_doorbell_bdf() {
    for d in /sys/bus/pci/devices/*; do
        [ "$(cat "$d/vendor")" = 0x1af4 ] && [ "$(cat "$d/device")" = 0x1110 ] || continue
        set -- $(sed -n 2p "$d/resource")
        [ "${1:-0}" != 0x0000000000000000 ] && [ "${1:-0}" != 0 ] && { basename "$d"; return 0; }
    done
    return 1
}

# Starts this guest's agent once (it outlives the step: later steps use it too).
chan_agent() {
    [ -S "$IVCOM_AGENT" ] && return 0
    bdf=$(chan_doorbell_bdf) || { echo "no ivshmem-doorbell device"; return 1; }
    ivcom agent --device "$bdf" --device-access vfio --socket "$IVCOM_AGENT" >/tmp/agent.log 2>&1 &
    chan_agent_pid=$!
    i=0
    while [ ! -S "$IVCOM_AGENT" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    if [ ! -S "$IVCOM_AGENT" ]; then
        echo "agent did not start:"; cat /tmp/agent.log
        return 1
    fi
    marker chan-agent bdf=$bdf pid=$chan_agent_pid
}

# The PCI address of the ivshmem-plain device holding the plain channel region: the 1af4:1110
# device without BAR1 (no MSI-X) whose BAR2 is 8 MiB (the raw tests' plain device has 4 MiB).
chan_plain_bdf() {
    for d in /sys/bus/pci/devices/*; do
        [ "$(cat "$d/vendor")" = 0x1af4 ] && [ "$(cat "$d/device")" = 0x1110 ] || continue
        set -- $(sed -n 2p "$d/resource")
        [ "${1:-0}" = 0x0000000000000000 ] || [ "${1:-0}" = 0 ] || continue
        set -- $(sed -n 3p "$d/resource")
        [ $(($2 - $1 + 1)) = $((8 << 20)) ] && { basename "$d"; return 0; }
    done
    return 1
}

# a <-> b over ivshmem-plain: no doorbells and no daemon at run time, so each guest's agent
# polls the region (sysfs access, backing off to 20 ms when idle) and keeps its own peer entry
# and heartbeat; processes that sleep are woken by their agent's scans. Round trips polled and
# sleeping, a 32 MiB transfer, and the idle CPU of polling agents.
step_chan_plain() {
    bdf=$(chan_plain_bdf) || { echo "no 8 MiB ivshmem-plain device"; return 1; }
    sock=/tmp/ivcom/agent-plain.sock
    peer=0
    [ "$role" = b ] && peer=1
    ivcom agent --device "$bdf" --device-access sysfs --peer-id $peer --socket $sock >/tmp/agent-plain.log 2>&1 &
    apid=$!
    i=0
    while [ ! -S $sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    [ -S $sock ] || { echo "plain agent did not start:"; cat /tmp/agent-plain.log; return 1; }
    marker chan-plain-agent bdf=$bdf peer=$peer
    rc=0
    if [ "$role" = b ]; then
        IVCOM_AGENT=$sock timeout 120 ivcom vm-chan serve plainpoll --connections 3 &
        p1=$!
        IVCOM_AGENT=$sock timeout 120 ivcom vm-chan serve plainirq --connections 1 --spin-us 0 &
        p2=$!
        wait $p1 || rc=1
        wait $p2 || rc=1
    else
        pc=${chan_poll_count:-20000} ic=${chan_irq_count:-2000}
        export IVCOM_AGENT=$sock
        ivcom vm-chan rtt plainpoll --size 64 --count $((pc / 10)) --label plainpoll64 || rc=1
        ivcom vm-chan rtt plainirq --size 64 --count $((ic / 10)) --spin-us 0 --label plainirq64 || rc=1
        ivcom vm-chan transfer plainpoll --bytes $((32 << 20)) --label plainbulk || rc=1
        ivcom vm-chan idle plainpoll --secs 3 || rc=1
        export IVCOM_AGENT=/tmp/ivcom/agent.sock
    fi
    kill $apid 2>/dev/null
    wait $apid 2>/dev/null
    return $rc
}

# a <-> b: round trips polled and interrupt-driven, a 256 MiB transfer, then the idle test.
step_chan() {
    chan_agent || return 1
    pc=${chan_poll_count:-20000} ic=${chan_irq_count:-2000} mib=${chan_bulk_mib:-256}
    if [ "$role" = b ]; then
        # One server per spin policy: accepted streams take the listener's.
        timeout 200 ivcom vm-chan serve poll --connections 4 &
        p1=$!
        timeout 200 ivcom vm-chan serve irq --connections 2 --spin-us 0 &
        p2=$!
        timeout 200 ivcom vm-chan serve spin --connections 2 --spin-us 1000 &
        p3=$!
        wait $p1; r1=$?
        wait $p2; r2=$?
        wait $p3; r3=$?
        [ $r1 = 0 ] && [ $r2 = 0 ] && [ $r3 = 0 ]
        return
    fi
    rc=0
    ivcom vm-chan rtt poll --size 64 --count "$pc" --label poll64 || rc=1
    ivcom vm-chan rtt poll --size 4096 --count "$pc" --label poll4k || rc=1
    # The same with a spin budget longer than a doorbell wakeup takes here (see vm-harness.md).
    ivcom vm-chan rtt spin --size 64 --count "$pc" --spin-us 1000 --label spin64 || rc=1
    ivcom vm-chan rtt spin --size 4096 --count "$pc" --spin-us 1000 --label spin4k || rc=1
    ivcom vm-chan rtt irq --size 64 --count "$ic" --spin-us 0 --label irq64 || rc=1
    ivcom vm-chan rtt irq --size 4096 --count "$ic" --spin-us 0 --label irq4k || rc=1
    ivcom vm-chan transfer poll --bytes $((mib << 20)) --label bulk || rc=1
    # Both ends blocked in a read, agents running: how busy is each guest?
    ivcom vm-chan idle poll --secs 3 || rc=1
    return $rc
}

# Guest a serves the host (scripts/vm-test.sh runs the clients through its own agent, which
# joined the daemon's group as member "host"). Guest b has nothing to do here.
step_chan_host() {
    [ "$role" = a ] || return 0
    chan_agent || return 1
    timeout 120 ivcom vm-chan serve hostpoll --connections 2 &
    p1=$!
    timeout 120 ivcom vm-chan serve hostirq --connections 1 --spin-us 0 &
    p2=$!
    wait $p1; r1=$?
    wait $p2; r2=$?
    [ $r1 = 0 ] && [ $r2 = 0 ]
}

# Guest b powers off in the middle of a long transfer from a; a's transfer must end with an
# error, and says how long after its last progress (the harness bounds it). b's step returns
# 200, which /init takes as "passed, power off now" (the server is still reading).
step_chan_poweroff() {
    chan_agent || return 1
    if [ "$role" = b ]; then
        rm -f /tmp/cut.out
        (timeout 200 ivcom vm-chan serve cut --connections 1 2>&1 | tee /tmp/cut.out) &
        i=0
        while ! grep -q chan-sink-progress /tmp/cut.out 2>/dev/null; do
            [ $i -lt 900 ] || { echo "no transfer arrived in 180 s"; return 1; }
            sleep 0.2
            i=$((i + 1))
        done
        marker chan-poweroff uptime=$(cut -d' ' -f1 /proc/uptime)
        return 200
    fi
    ivcom vm-chan transfer cut --cut --bytes $((64 << 30)) --progress-bytes $((32 << 20)) \
        --write-timeout 20 --label cut
    rc=$?
    # What the agent saw (its log has the peer table changes).
    tail -n 4 /tmp/agent.log | tr -d '\033' | sed 's/\[[0-9;]*m//g; s/^/agent-log: /'
    return $rc
}
