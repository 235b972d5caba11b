#!/usr/bin/env bash
# Unmodified programs with and without `ivcom run`, side by side: redis-benchmark against
# redis-server (one client without pipelining, and fifty clients) and iperf3 (one stream,
# both directions). Each round runs the plain TCP case and the ivcom case back to back, so
# both see the same machine; the medians over the rounds and their ratios are printed.
#
#   scripts/bench-apps.sh              3 rounds
#   ROUNDS=5 scripts/bench-apps.sh
#   LOAD=1 scripts/bench-apps.sh       with one busy loop per CPU running throughout
#
# With Debian's linux-perf installed (and perf events allowed: root, or
# kernel.perf_event_paranoid <= -1), it also counts the system calls per request on each side
# of redis-benchmark GET -c 1 -P 1 (`perf stat -e raw_syscalls:sys_enter`), plain and under
# ivcom run.
#
# Needs redis-server, redis-tools and iperf3 (apt-get install redis-server redis-tools iperf3).
# Targets: redis-benchmark -c 1 -P 1 GET >= 10x plain TCP (issue 10; issue 4 asked 4x);
# iperf3 >= 2.5x.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
REQUESTS=${REQUESTS:-100000}
SECONDS_IPERF=${SECONDS_IPERF:-5}
for tool in redis-server redis-benchmark redis-cli iperf3; do
    command -v "$tool" >/dev/null || { echo "bench-apps: $tool is missing (apt-get install redis-server redis-tools iperf3)" >&2; exit 1; }
done

cargo build --release -q
IVCOM=$PWD/target/release/ivcom
WORK=$(mktemp -d)
export IVCOM_RUNTIME_DIR=$WORK/run
SERVER_PID=
LOAD_PIDS=()
cleanup() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    for p in "${LOAD_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
if [ "${LOAD:-0}" = 1 ]; then
    # One busy loop per CPU, each bounded to two hours and ended by the cleanup above.
    for _ in $(seq "$(nproc)"); do timeout 7200 sh -c 'while :; do :; done' & LOAD_PIDS+=($!); done
    echo "bench-apps: $(nproc) busy loops running (LOAD=1)" >&2
fi

# with MODE (plain|ivcom) CMD...: runs CMD plainly or under ivcom.
with() {
    local mode=$1; shift
    if [ "$mode" = ivcom ]; then "$IVCOM" run -- "$@"; else "$@"; fi
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo $((20000 + RANDOM % 20000)); }

# redis MODE CLIENTS TEST [ARGS...]: requests per second of redis-benchmark (ARGS: more
# redis-benchmark options, such as -P 16 or -k 0 and a request count).
redis() {
    local mode=$1 clients=$2 test=$3 port
    shift 3
    port=$(free_port)
    with "$mode" redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
    with "$mode" redis-benchmark -p "$port" -n "$REQUESTS" -c "$clients" -P 1 -t "$test" "$@" --csv 2>/dev/null |
        awk -F'","' -v t="${test^^}" 'index($1, t) {print $2}'
    redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}

# iperf MODE [-R]: receiver's Mbit/s of one iperf3 stream.
iperf() {
    local mode=$1; shift
    local port
    port=$(free_port)
    with "$mode" iperf3 -s -1 -p "$port" >/dev/null 2>&1 &
    SERVER_PID=$!
    sleep 0.3
    with "$mode" iperf3 -c 127.0.0.1 -p "$port" -t "$SECONDS_IPERF" -f m "$@" 2>/dev/null |
        awk '/receiver/ {for (i = 1; i <= NF; i++) if ($i == "Mbits/sec") print $(i-1)}'
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}

median() { sort -g | awk '{a[NR]=$1} END {if (NR == 0) print "nan"; else if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

declare -A R
# -k 0: a new connection per request (connection setup and teardown; CONNECTIONS of them).
CONNECTIONS=${CONNECTIONS:-4000}
cases=("redis GET -c 1 -P 1|redis MODE 1 get" "redis SET -c 1 -P 1|redis MODE 1 set" "redis GET -c 50|redis MODE 50 get"
       "redis GET -c 50 -P 16|redis MODE 50 get -P 16" "redis GET -k 0 (new conn)|redis MODE 1 get -k 0 -n $CONNECTIONS"
       "iperf3 client->server|iperf MODE" "iperf3 server->client (-R)|iperf MODE -R")
for round in $(seq "$ROUNDS"); do
    echo "round $round/$ROUNDS" >&2
    for c in "${cases[@]}"; do
        name=${c%%|*}; cmd=${c#*|}
        for mode in plain ivcom; do
            v=$(${cmd/MODE/$mode} || true)
            R["$name|$mode"]+="${v:-nan} "
        done
    done
done

printf '\n%-28s %14s %14s %8s  %s\n' "case (median of $ROUNDS)" "plain TCP" "ivcom run" "ratio" "target"
for c in "${cases[@]}"; do
    name=${c%%|*}
    p=$(tr ' ' '\n' <<<"${R[$name|plain]}" | grep -v '^$' | median)
    i=$(tr ' ' '\n' <<<"${R[$name|ivcom]}" | grep -v '^$' | median)
    unit=req/s; target=""
    case $name in iperf3*) unit=Mbit/s ;; esac
    case $name in "redis GET -c 1 -P 1") target=">= 10x" ;; *"-k 0"*) target=">= 1.0x" ;; iperf3*) target=">= 2.5x" ;; esac
    ratio=$(awk -v a="$i" -v b="$p" 'BEGIN {if (b > 0) printf "%.2fx", a / b; else print "n/a"}')
    printf '%-28s %14s %14s %8s  %s\n' "$name" "$p $unit" "$i $unit" "$ratio" "$target"
done
echo
echo "each round: plain, then under ivcom run; raw values per round:"
for c in "${cases[@]}"; do name=${c%%|*}; echo "  $name: plain [${R[$name|plain]% }] ivcom [${R[$name|ivcom]% }]"; done

# syscalls MODE: system calls per request of redis-server and redis-benchmark (GET -c 1 -P 1).
syscalls() {
    local mode=$1 port pre=() s c
    port=$(free_port)
    [ "$mode" = ivcom ] && pre=("$IVCOM" run --)
    perf stat -x, -e raw_syscalls:sys_enter -o "$WORK/srv.$mode" -- "${pre[@]}" \
        redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
    perf stat -x, -e raw_syscalls:sys_enter -o "$WORK/cli.$mode" -- "${pre[@]}" \
        redis-benchmark -p "$port" -n "$REQUESTS" -c 1 -P 1 -t get --csv >/dev/null 2>&1
    redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
    # The server's count includes its start and its shutdown: a few hundred calls.
    s=$(awk -F, '/sys_enter/ {print $1}' "$WORK/srv.$mode")
    c=$(awk -F, '/sys_enter/ {print $1}' "$WORK/cli.$mode")
    awk -v m="$mode" -v s="$s" -v c="$c" -v n="$REQUESTS" \
        'BEGIN {printf "  %-6s redis-server %5.2f   redis-benchmark %5.2f\n", m, s / n, c / n}'
}
if command -v perf >/dev/null && perf stat -e raw_syscalls:sys_enter -o /dev/null true 2>/dev/null; then
    echo
    echo "system calls per request, redis-benchmark GET -c 1 -P 1 ($REQUESTS requests; target under ivcom run: <= 0.2 each side):"
    syscalls plain
    syscalls ivcom
else
    echo
    echo "(perf with raw_syscalls events not available: system calls per request not counted)"
fi
