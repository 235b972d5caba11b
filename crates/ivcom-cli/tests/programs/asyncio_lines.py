"""A line server and its client on asyncio (the event loop over epoll, stream readers and
writers with flow control): every line the client sends comes back as its length and SHA-256.

    asyncio_lines.py server PORTFILE CONNECTIONS   serve that many connections, then exit
    asyncio_lines.py client PORT CONNECTIONS       run them at once; exit 1 on a wrong reply

Each connection makes request/response rounds, then a pipelined burst (lines of 1 B to 256 KiB
written before any reply is read), then closes. Both print one summary line.
"""
import asyncio
import hashlib
import os
import sys

LIMIT = 1 << 20  # the longest line a reader accepts (asyncio's default is 64 KiB)
ROUNDS = 200
SIZES = [1, 10, 100, 1000, 5000, 65536, 262144]


def reply_for(body: bytes) -> bytes:
    return b"%d %s\n" % (len(body), hashlib.sha256(body).hexdigest().encode())


def line(conn: int, i: int, size: int) -> bytes:
    # Deterministic, distinct per connection and line, never a newline.
    seed = b"%d:%d:" % (conn, i)
    return (seed * (size // len(seed) + 1))[:size]


async def serve(portfile: str, conns: int) -> None:
    served = 0
    lines = 0
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served, lines
        while True:
            data = await reader.readline()
            if not data:
                break
            writer.write(reply_for(data.rstrip(b"\n")))
            await writer.drain()
            lines += 1
        writer.close()
        await writer.wait_closed()
        served += 1
        if served == conns:
            done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=LIMIT)
    port = server.sockets[0].getsockname()[1]
    tmp = portfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(port))
    os.rename(tmp, portfile)
    await done.wait()
    server.close()
    await server.wait_closed()
    print(f"server: {served} connections, {lines} lines")


async def one(port: int, conn: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=LIMIT)
    n = 0
    for i in range(ROUNDS):
        body = line(conn, i, 1 + (i * 37) % 300)
        writer.write(body + b"\n")
        await writer.drain()
        got = await reader.readline()
        if got != reply_for(body):
            raise SystemExit(f"connection {conn} round {i}: got {got[:80]!r}")
        n += 1
    burst = [line(conn, ROUNDS + k, s) for k, s in enumerate(SIZES * 3)]
    for body in burst:
        writer.write(body + b"\n")
    await writer.drain()
    for k, body in enumerate(burst):
        got = await reader.readline()
        if got != reply_for(body):
            raise SystemExit(f"connection {conn} burst line {k}: got {got[:80]!r}")
        n += 1
    writer.write_eof()
    if await reader.read() != b"":
        raise SystemExit(f"connection {conn}: data after the last reply")
    writer.close()
    await writer.wait_closed()
    return n


async def client(port: int, conns: int) -> None:
    counts = await asyncio.gather(*(one(port, c) for c in range(conns)))
    print(f"client: {conns} connections, {sum(counts)} lines, every reply correct")


def main() -> None:
    role = sys.argv[1]
    if role == "server":
        asyncio.run(serve(sys.argv[2], int(sys.argv[3])))
    elif role == "client":
        asyncio.run(client(int(sys.argv[2]), int(sys.argv[3])))
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main()
