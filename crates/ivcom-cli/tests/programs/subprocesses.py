"""Subprocesses started while a TCP connection is open, on both ends (CPython's subprocess
uses vfork/posix_spawn or fork+exec and closes every descriptor above 2 in the child:
close_fds=True, the default; os.popen runs /bin/sh).

    subprocesses.py server PORTFILE   serve one connection, then exit
    subprocesses.py client PORT       exit 1 on a wrong reply

The client makes request/response rounds, runs subprocesses, makes more rounds, asks the
server to run subprocesses (it does, between reading the request and replying), and ends with
a 1 MiB round trip. Both print what they did.
"""
import hashlib
import os
import socket
import subprocess
import sys

ROUNDS = 20


def spawn_all(tag: str) -> list:
    """Every way of starting a program this test covers; returns their outputs."""
    out = []
    out.append(subprocess.run(["/bin/echo", f"{tag} run"], capture_output=True, check=True).stdout)
    out.append(subprocess.run(["/bin/sh", "-c", f"echo {tag} shell"], stdout=subprocess.PIPE, check=True).stdout)
    out.append(subprocess.check_output(["/bin/echo", f"{tag} check_output"], close_fds=True))
    with os.popen(f"echo {tag} popen") as p:
        out.append(p.read().encode())
    with subprocess.Popen(["/bin/cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as p:
        o, _ = p.communicate(f"{tag} communicate\n".encode())
        out.append(o)
    # A child that inherits nothing but stdio and exits with a status.
    r = subprocess.run(["/bin/sh", "-c", "exit 3"])
    out.append(b"status %d\n" % r.returncode)
    return out


def expected(tag: str) -> list:
    return [f"{tag} {w}\n".encode() for w in ["run", "shell", "check_output", "popen", "communicate"]] + [b"status 3\n"]


def recv_line(f) -> bytes:
    line = f.readline()
    if not line:
        raise SystemExit("connection closed early")
    return line


def server(portfile: str) -> None:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    tmp = portfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(ls.getsockname()[1]))
    os.rename(tmp, portfile)
    conn, _ = ls.accept()
    ls.close()
    f = conn.makefile("rwb", buffering=0)
    requests = spawned = 0
    while True:
        line = f.readline()
        if not line:
            break
        cmd, _, arg = line.rstrip(b"\n").partition(b" ")
        requests += 1
        if cmd == b"ECHO":
            conn.sendall(b"OK " + arg + b"\n")
        elif cmd == b"SPAWN":
            outs = spawn_all("server")
            ok = outs == expected("server")
            spawned += 1
            conn.sendall(b"SPAWNED %s\n" % (b"ok" if ok else b"wrong: " + repr(outs).encode()))
        elif cmd == b"BIG":
            n = int(arg)
            data = b""
            while len(data) < n:
                chunk = conn.recv(n - len(data))
                if not chunk:
                    raise SystemExit("EOF inside BIG")
                data += chunk
            conn.sendall(hashlib.sha256(data).hexdigest().encode() + b"\n" + data)
        else:
            raise SystemExit(f"unknown request {line!r}")
    conn.close()
    print(f"server: {requests} requests, subprocesses started during {spawned} of them")


def client(port: int) -> None:
    conn = socket.create_connection(("127.0.0.1", port))
    f = conn.makefile("rb", buffering=0)
    rounds = 0

    def echo(i: int) -> None:
        nonlocal rounds
        conn.sendall(b"ECHO %d\n" % i)
        got = recv_line(f)
        if got != b"OK %d\n" % i:
            raise SystemExit(f"round {i}: got {got!r}")
        rounds += 1

    for i in range(ROUNDS):
        echo(i)
    for k in range(3):
        if spawn_all("client") != expected("client"):
            raise SystemExit("the client's subprocesses printed the wrong thing")
        for i in range(ROUNDS):
            echo(1000 * (k + 1) + i)
        conn.sendall(b"SPAWN x\n")
        got = recv_line(f)
        if got != b"SPAWNED ok\n":
            raise SystemExit(f"server's subprocesses: {got!r}")
        echo(5000 + k)
    data = bytes((i * 131 + 7) % 256 for i in range(1 << 20))
    conn.sendall(b"BIG %d\n" % len(data) + data)
    digest = recv_line(f)
    back = b""
    while len(back) < len(data):
        chunk = f.read(len(data) - len(back))
        if not chunk:
            raise SystemExit("EOF inside the 1 MiB reply")
        back += chunk
    if digest.strip() != hashlib.sha256(data).hexdigest().encode() or back != data:
        raise SystemExit("the 1 MiB round trip came back wrong")
    conn.shutdown(socket.SHUT_WR)
    if f.read() != b"":
        raise SystemExit("data after the end")
    conn.close()
    print(f"client: {rounds} rounds, 3 times subprocesses on each side, 1 MiB round trip intact")


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(sys.argv[2])
    elif sys.argv[1] == "client":
        client(int(sys.argv[2]))
    else:
        raise SystemExit(f"unknown role {sys.argv[1]}")
