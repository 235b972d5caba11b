"""A memcached client over a raw socket (the text protocol), checking every answer.

    memcache_client.py PORT check   store values of 0 B to 512 KiB, read them back (one by
                                    one and in one multi-get), incr, delete; exit 1 on a
                                    wrong answer
    memcache_client.py PORT stats   print the server's counters NAME VALUE, one a line
"""
import hashlib
import socket
import sys


class Conn:
    def __init__(self, port: int):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def _fill(self) -> None:
        d = self.s.recv(1 << 16)
        if not d:
            raise SystemExit("the server closed the connection")
        self.buf += d

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def expect(self, want: bytes, what: str) -> None:
        got = self.line()
        if got != want:
            raise SystemExit(f"{what}: got {got[:80]!r}, want {want!r}")

    def get_values(self, keys: list) -> dict:
        self.send(b"get " + b" ".join(keys) + b"\r\n")
        out = {}
        while True:
            line = self.line()
            if line == b"END":
                return out
            parts = line.split()
            if parts[0] != b"VALUE":
                raise SystemExit(f"get: {line[:80]!r}")
            out[parts[1]] = self.exact(int(parts[3]) + 2)[:-2]


def value(i: int) -> bytes:
    size = [0, 1, 100, 4096, 65536, 300000, 524288][i % 7]
    seed = hashlib.sha256(b"%d" % i).digest()
    return (seed * (size // len(seed) + 1))[:size]


def check(port: int) -> None:
    c = Conn(port)
    keys = [b"ivcom:%d" % i for i in range(70)]
    for i, k in enumerate(keys):
        v = value(i)
        c.send(b"set %s %d 0 %d\r\n%s\r\n" % (k, i, len(v), v))
        c.expect(b"STORED", f"set {k!r}")
    for i, k in enumerate(keys):
        got = c.get_values([k])
        if got != {k: value(i)}:
            raise SystemExit(f"get {k!r}: wrong value")
    got = c.get_values(keys)
    if got != {k: value(i) for i, k in enumerate(keys)}:
        raise SystemExit("multi-get: wrong values")
    c.send(b"set counter 0 0 1\r\n5\r\n")
    c.expect(b"STORED", "set counter")
    for n in range(6, 106):
        c.send(b"incr counter 1\r\n")
        c.expect(b"%d" % n, "incr")
    for k in keys[:10]:
        c.send(b"delete %s\r\n" % k)
        c.expect(b"DELETED", f"delete {k!r}")
    if c.get_values(keys[:10]) != {}:
        raise SystemExit("deleted keys still there")
    c.send(b"quit\r\n")
    print(f"client: {len(keys)} values of 0 B to 512 KiB stored and read back, 100 incr, 10 deletes")


def stats(port: int) -> None:
    c = Conn(port)
    c.send(b"stats\r\n")
    while True:
        line = c.line()
        if line == b"END":
            break
        _, name, val = line.decode().split(" ", 2)
        print(name, val)
    c.send(b"quit\r\n")


if __name__ == "__main__":
    {"check": check, "stats": stats}[sys.argv[2]](int(sys.argv[1]))
