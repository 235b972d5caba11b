/* Buffering as large as loopback TCP's: a peer that does not read takes megabytes of
 * non-blocking writes; both ends write 2 MiB (blocking) before either reads and neither
 * deadlocks; a server that closes right after one large non-blocking write delivers every
 * byte the write took (Node's `server.close()` after `res.end()`). */
#include "common.h"

#define BIG (2u << 20)

static unsigned char out_c[BIG], out_s[BIG], in_buf[BIG];

static void timeout(int sig) {
    (void)sig;
    static const char m[] = "FAIL: deadlocked (no progress within 30 s)\n";
    (void)!write(2, m, sizeof m - 1);
    _exit(3);
}

/* Part 1: the client writes without blocking until EAGAIN while the server sleeps. */
static size_t fill_nonblocking(int s) {
    int fl = fcntl(s, F_GETFL);
    CHECK(fcntl(s, F_SETFL, fl | O_NONBLOCK) == 0, "nonblocking");
    size_t total = write_until_full(s, 'n');
    CHECK(fcntl(s, F_SETFL, fl) == 0, "blocking again");
    return total;
}

static void client(int port) {
    signal(SIGALRM, timeout);
    alarm(30);
    int s = connect_to(0, port, 0);
    size_t total = fill_nonblocking(s);
    say("client: a peer that does not read took at least 2 MiB of non-blocking writes: %d", total >= BIG);
    char trailer[32];
    int tl = snprintf(trailer, sizeof trailer, "#%zu;", total);
    write_all(s, trailer, (size_t)tl);
    /* Part 2: both ends write 2 MiB before reading. */
    char go;
    read_exact(s, &go, 1);
    fill(out_c, BIG, 7);
    write_all(s, out_c, BIG);
    read_exact(s, in_buf, BIG);
    fill(out_s, BIG, 8);
    say("client: both ends wrote 2 MiB before reading; what came is the server's: %d", memcmp(in_buf, out_s, BIG) == 0);
    close(s);
    /* Part 3: one large non-blocking write, then close at once. */
    s = connect_to(0, port, 0);
    msleep(300);
    size_t got = 0;
    for (;;) {
        ssize_t r = read(s, in_buf + got, BIG - got);
        if (r < 0 && errno == EINTR) continue;
        CHECK(r >= 0, "read the closing server's answer");
        if (r == 0) break;
        got += (size_t)r;
        CHECK(got <= BIG, "more than was written");
    }
    fill(out_s, 1u << 20, 9);
    say("client: a server that closed right after a 1 MiB write delivered %zu bytes intact: %d", got,
        got == (1u << 20) && memcmp(in_buf, out_s, got) == 0);
    close(s);
    alarm(0);
}

static void server(int l) {
    signal(SIGALRM, timeout);
    alarm(30);
    int c = accept_one(l);
    msleep(500);
    /* Drain the 'n's up to the "#COUNT;" trailer. */
    static unsigned char buf[65536];
    size_t ns = 0, tlen = 0;
    char tail[32];
    while (tlen == 0 || tail[tlen - 1] != ';') {
        ssize_t r = read(c, buf, tlen == 0 ? sizeof buf : 1);
        CHECK(r > 0, "drain");
        for (ssize_t i = 0; i < r; i++) {
            if (tlen == 0 && buf[i] == 'n') {
                ns++;
            } else {
                CHECK(tlen < sizeof tail - 1, "trailer too long");
                tail[tlen++] = (char)buf[i];
            }
        }
    }
    tail[tlen] = 0;
    size_t claimed = 0;
    CHECK(sscanf(tail, "#%zu;", &claimed) == 1, "trailer %s", tail);
    say("server: every byte of the non-blocking writes arrived: %d", claimed == ns);
    write_all(c, "g", 1);
    fill(out_s, BIG, 8);
    write_all(c, out_s, BIG);
    read_exact(c, in_buf, BIG);
    fill(out_c, BIG, 7);
    say("server: both ends wrote 2 MiB before reading; what came is the client's: %d", memcmp(in_buf, out_c, BIG) == 0);
    close(c);
    c = accept_one(l);
    int fl = fcntl(c, F_GETFL);
    CHECK(fcntl(c, F_SETFL, fl | O_NONBLOCK) == 0, "nonblocking");
    fill(out_s, 1u << 20, 9);
    ssize_t w = write(c, out_s, 1u << 20);
    say("server: one non-blocking write took the whole 1 MiB: %d", w == (ssize_t)(1u << 20));
    close(c);
    alarm(0);
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    pair(0, server, client);
    say("done");
    return 0;
}
