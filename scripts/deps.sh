#!/usr/bin/env bash
# What the tests need from the system (Debian packages), installed when missing.
#
#   scripts/deps.sh [--check] [GROUP...]
#
# Groups (default: tests):
#   tests  everything `cargo test --workspace` uses: a C compiler (linking, the C test
#          programs), `ip` (network namespaces), QEMU (the daemon's test against real QEMU),
#          and the real programs run under `ivcom run`: redis, iperf3, Python, Node.js, curl,
#          nginx, memcached and its tools, PostgreSQL with pgbench
#   vm     what the VM harness (scripts/vm-test.sh) needs besides QEMU
#
# Installs only what is missing: with apt-get when run as root on a machine that has it
# (service start-up by the packages' scripts is refused while installing, so nothing is left
# running); otherwise prints what is missing and the command that installs it, and exits 1.
# `--check` only reports (exit 1 if anything is missing). Idempotent: once everything is
# there it only looks.
set -euo pipefail

check_only=0
groups=()
for a in "$@"; do
    case "$a" in
        --check) check_only=1 ;;
        tests | vm) groups+=("$a") ;;
        -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "deps.sh: unknown argument '$a' (groups: tests vm; option: --check)" >&2; exit 2 ;;
    esac
done
[ ${#groups[@]} -gt 0 ] || groups=(tests)

# A program the tests run, looked for where Debian installs it (the tests look there too, not
# in $PATH, so a program of another origin earlier in $PATH does not count).
have_prog() {
    local d
    for d in /usr/bin /usr/sbin /bin /sbin; do
        [ -x "$d/$1" ] && return 0
    done
    return 1
}
# A path (a glob allowed) that exists.
have_path() {
    local p
    for p in $1; do
        [ -e "$p" ] && return 0
    done
    return 1
}

missing=()
why=()
# want PACKAGE KIND WHAT DESCRIPTION: PACKAGE is needed unless WHAT (a program or a path) is there.
want() {
    local pkg=$1 kind=$2 what=$3
    case "$kind" in
        prog) have_prog "$what" && return 0 ;;
        path) have_path "$what" && return 0 ;;
        pkg) dpkg -s "$what" >/dev/null 2>&1 && return 0 ;;
    esac
    local m
    for m in "${missing[@]:-}"; do
        [ "$m" = "$pkg" ] && return 0
    done
    missing+=("$pkg")
    why+=("$pkg ($kind $what)")
}

for g in "${groups[@]}"; do
    case "$g" in
        tests)
            want gcc prog cc
            want libc6-dev path /usr/include/stdio.h
            want iproute2 prog ip
            want util-linux prog setpriv
            want passwd prog useradd
            want qemu-system-x86 prog qemu-system-x86_64
            want redis-server prog redis-server
            want redis-tools prog redis-benchmark
            want redis-tools prog redis-cli
            want iperf3 prog iperf3
            want python3 prog python3
            want nodejs prog node
            want curl prog curl
            want nginx prog nginx
            want memcached prog memcached
            want libmemcached-tools prog memcslap
            # Debian's PostgreSQL server: initdb, postgres and pgbench live in
            # /usr/lib/postgresql/VERSION/bin (only psql and pgbench's wrapper are in $PATH).
            want postgresql path '/usr/lib/postgresql/*/bin/postgres'
            want postgresql path '/usr/lib/postgresql/*/bin/initdb'
            want postgresql path '/usr/lib/postgresql/*/bin/pgbench'
            ;;
        vm)
            want qemu-system-x86 prog qemu-system-x86_64
            want busybox-static pkg busybox-static
            want cpio prog cpio
            want xz-utils prog xz
            want util-linux prog unshare
            ;;
    esac
done

[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$check_only" = 1 ] || [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "deps.sh: missing for the tests (${groups[*]}):" >&2
    printf '  %s\n' "${why[@]}" >&2
    if command -v apt-get >/dev/null 2>&1; then
        echo "install them with:  sudo apt-get install -y ${missing[*]}" >&2
        echo "(or run scripts/deps.sh ${groups[*]} as root)" >&2
    else
        echo "these are Debian package names; install the same programs with your system's package manager" >&2
    fi
    exit 1
fi

echo "deps.sh: installing ${missing[*]}" >&2
# The packages' maintainer scripts would start nginx, memcached, redis and PostgreSQL as
# system services: refuse that while installing (invoke-rc.d and deb-systemd-invoke ask
# policy-rc.d), unless the machine already has a policy of its own.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# written by ivcom scripts/deps.sh while it installs packages\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    made_policy=1
fi
drop_policy() {
    if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi
}
trap drop_policy EXIT
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q "${missing[@]}"
