# Guest steps of scripts/vm-test.sh (sourced by /init). Each step_NAME runs in both guests
# ($role is a or b) and prints "@@ivcom ..." markers; a non-zero status fails the step.
# Tunables arrive as kernel command-line words (environment variables here):
#   run (shared nonce), pp_count, pp_size, tcp_count, tcp_bulk_mib, peer (b's or a's IP).

# Lists the ivshmem devices and opens each one; doorbell devices also through VFIO.
step_probe() {
    ivcom vm probe --vfio --role "$role"
}

# Lists and opens through sysfs only (for a guest without an IOMMU or VFIO modules).
step_probe_sysfs() {
    ivcom vm probe --role "$role"
}

# Polled ping-pong over ivshmem-plain, BAR2 mapped through sysfs.
step_poll_plain() {
    ivcom vm pingpong --role "$role" --device plain --access sysfs --mode poll \
        --size "${pp_size:-64}" --count "${pp_count:-20000}" --slot 0 --run "$run" --timeout-secs 60
}

# The same with 4 KiB messages (the size of the TCP baseline's second round trip).
step_poll_plain_4k() {
    ivcom vm pingpong --role "$role" --device plain --access sysfs --mode poll \
        --size 4096 --count "${pp_count:-20000}" --slot 4 --run "$run" --timeout-secs 60
}

# Polled ping-pong over ivshmem-doorbell's memory, owned through VFIO.
step_poll_doorbell() {
    ivcom vm pingpong --role "$role" --device doorbell --access vfio --mode poll \
        --size "${pp_size:-64}" --count "${pp_count:-20000}" --slot 1 --run "$run" --timeout-secs 60
}

# Doorbell-driven ping-pong: ring the peer after each message, sleep on the MSI-X eventfd.
step_doorbell() {
    ivcom vm pingpong --role "$role" --device doorbell --access vfio --mode doorbell \
        --size "${pp_size:-64}" --count "${db_count:-1000}" --slot 2 --run "$run" --timeout-secs 60
}

# Polled ping-pong between guest a and a host process mapping the plain device's file
# (vm-test.sh starts the host side: `ivcom vm pingpong --role b --shm-file ... --slot 3`).
# Guest b has nothing to do here: run it after b's other steps so it is powered off.
step_poll_host() {
    [ "$role" = a ] || return 0
    ivcom vm pingpong --role a --device plain --access sysfs --mode poll \
        --size "${pp_size:-64}" --count "${pp_count:-20000}" --slot 3 --run "$run" --timeout-secs 60
}

# TCP over virtio-net: 64 B and 4 KiB round trips, then a bulk transfer with SHA-256.
step_tcp() {
    ivcom vm tcp --role "$role" --peer 10.0.2.2 --port 7070 --sizes 64,4096 \
        --count "${tcp_count:-1000}" --bulk-mib "${tcp_bulk_mib:-256}" --run "$run" --timeout-secs 120
}

# Kernel and device facts, for debugging a new setup.
step_info() {
    uname -r
    for d in /sys/bus/pci/devices/*; do
        echo "$(basename "$d") $(cat "$d/vendor"):$(cat "$d/device") driver=$(basename "$(readlink "$d/driver" 2>/dev/null)" 2>/dev/null) group=$(basename "$(readlink "$d/iommu_group" 2>/dev/null)" 2>/dev/null)"
    done
    ls /dev/vfio 2>/dev/null
    ip addr show eth0 2>/dev/null | grep inet
}
