/* sendfile from a file into a connection, splice from a connection into a pipe and from a
 * pipe into a connection; the bytes arrive intact and in order. A splice from a pipe into a
 * connection whose peer reset it fails with EPIPE and leaves the pipe's bytes in place. */
#include "common.h"
#include <sys/sendfile.h>

#define FSZ (3u << 20)

static void client(int port) {
    int s = connect_to(0, port, 0);
    /* Receive the file, checksum it, send the checksum back. */
    unsigned char *b = malloc(FSZ);
    read_exact(s, b, FSZ);
    uint64_t h = fnv(b, FSZ, 0);
    write_all(s, &h, 8);
    /* Then send 1 MiB that the server splices through a pipe. */
    fill(b, 1u << 20, 99);
    write_all(s, b, 1u << 20);
    /* And receive it back through the server's pipe->socket splice. */
    unsigned char *e = malloc(1u << 20);
    read_exact(s, e, 1u << 20);
    say("client: spliced round trip intact %d", memcmp(b, e, 1u << 20) == 0);
    close(s);
    free(b);
    free(e);
}

static void server(int l) {
    char path[] = "/tmp/ivcom-sendfile-XXXXXX";
    int f = mkstemp(path);
    CHECK(f >= 0, "mkstemp");
    unlink(path);
    unsigned char *b = malloc(FSZ);
    fill(b, FSZ, 5);
    write_all(f, b, FSZ);
    int c = accept_one(l);
    off_t off = 0;
    size_t sent = 0;
    while (sent < FSZ) {
        ssize_t n = sendfile(c, f, &off, FSZ - sent);
        CHECK(n > 0, "sendfile");
        sent += (size_t)n;
    }
    say("server: sendfile sent %zu, offset now %lld", sent, (long long)off);
    uint64_t h;
    read_exact(c, &h, 8);
    say("server: client's checksum of the file matches %d", h == fnv(b, FSZ, 0));
    /* Without an offset, sendfile moves the file position. */
    CHECK(lseek(f, 0, SEEK_SET) == 0, "lseek");
    int p[2];
    CHECK(pipe(p) == 0, "pipe");
    size_t moved = 0;
    unsigned char *got = malloc(1u << 20);
    size_t have = 0;
    while (moved < (1u << 20)) {
        ssize_t n = splice(c, NULL, p[1], NULL, (1u << 20) - moved, 0);
        CHECK(n > 0, "splice in");
        moved += (size_t)n;
        while (have < moved) {
            ssize_t r = read(p[0], got + have, moved - have);
            CHECK(r > 0, "pipe read");
            have += (size_t)r;
        }
    }
    unsigned char *want = malloc(1u << 20);
    fill(want, 1u << 20, 99);
    say("server: splice socket->pipe carried %zu bytes intact %d", moved, memcmp(got, want, 1u << 20) == 0);
    size_t back = 0;
    while (back < (1u << 20)) {
        size_t chunk = (1u << 20) - back < 65536 ? (1u << 20) - back : 65536;
        write_all(p[1], got + back, chunk);
        size_t done = 0;
        while (done < chunk) {
            ssize_t n = splice(p[0], NULL, c, NULL, chunk - done, 0);
            CHECK(n > 0, "splice out");
            done += (size_t)n;
        }
        back += chunk;
    }
    say("server: splice pipe->socket done");
    close(c);
    close(f);
    free(b);
    free(got);
    free(want);
}

static void splice_to_reset_peer(void) {
    int c, s, pp[2];
    local_pair(&c, &s);
    CHECK(pipe(pp) == 0, "pipe");
    close(s);
    msleep(20);
    write_all(c, "x", 1); /* the closed peer answers with a reset */
    msleep(50);
    write_all(pp[1], "abc", 3);
    ssize_t r = splice(pp[0], NULL, c, NULL, 3, 0);
    int e = errno;
    int left = 0;
    CHECK(ioctl(pp[0], FIONREAD, &left) == 0, "FIONREAD");
    say("splice pipe->connection to a reset peer: r=%zd EPIPE %d, bytes left in the pipe %d", r, r < 0 && e == EPIPE, left);
    close(pp[0]);
    close(pp[1]);
    close(c);
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    splice_to_reset_peer();
    pair(0, server, client);
    say("done");
    return 0;
}
