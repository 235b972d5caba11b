/* Non-blocking sockets: connect with EINPROGRESS, accept4 flags, O_NONBLOCK and FIONBIO,
 * EAGAIN on an empty or full connection, dup/dup2/dup3/F_DUPFD keep the connection. */
#include "common.h"

static void client(int port) {
    int s = connect_to(0, port, 1);
    struct pollfd p = {s, POLLOUT, 0};
    CHECK(poll(&p, 1, 5000) == 1, "poll for connect");
    int err = -1;
    socklen_t el = sizeof err;
    CHECK(getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &el) == 0, "SO_ERROR");
    say("client: connected, SO_ERROR %d, POLLOUT %d", err, (p.revents & POLLOUT) != 0);
    int nd = -1;
    socklen_t nl = sizeof nd;
    CHECK(getsockopt(s, IPPROTO_TCP, TCP_NODELAY, &nd, &nl) == 0, "getsockopt TCP_NODELAY");
    say("client: TCP_NODELAY by default %d", nd);
    int one = 1;
    CHECK(setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) == 0, "setsockopt TCP_NODELAY");
    nl = sizeof nd;
    CHECK(getsockopt(s, IPPROTO_TCP, TCP_NODELAY, &nd, &nl) == 0, "getsockopt TCP_NODELAY");
    say("client: TCP_NODELAY after setting it %d", nd);
    char c;
    CHECK(read(s, &c, 1) == -1, "read on empty");
    say("client: empty read gives EAGAIN %d", errno == EAGAIN || errno == EWOULDBLOCK);
    /* Fill until EAGAIN: the server does not read yet. */
    size_t total = write_until_full(s, 'x');
    say("client: writes stop with EAGAIN when the peer does not read");
    write_all(s, "", 0);
    /* Tell the server how much came, over a second connection... simpler: as a trailer
     * after the server drains; wait for writability first. */
    p.events = POLLOUT;
    CHECK(poll(&p, 1, 10000) == 1, "POLLOUT after the peer drains");
    say("client: POLLOUT again once the peer reads");
    char trailer[32];
    int tl = snprintf(trailer, sizeof trailer, "#%zu;", total);
    int off = 0;
    while (off < tl) {
        ssize_t w = write(s, trailer + off, (size_t)(tl - off));
        if (w < 0 && errno == EAGAIN) {
            poll(&p, 1, 1000);
            continue;
        }
        CHECK(w > 0, "write trailer");
        off += (int)w;
    }
    /* Duplicates: write through each, then close all but one. */
    int d1 = dup(s);
    int d2 = dup2(s, 50);
    int d3 = dup3(s, 51, O_CLOEXEC);
    int d4 = fcntl(s, F_DUPFD, 60);
    int d5 = fcntl(s, F_DUPFD_CLOEXEC, 70);
    CHECK(d1 >= 0 && d2 == 50 && d3 == 51 && d4 >= 60 && d5 >= 70, "dups");
    say("client: dup3 O_CLOEXEC %d, F_DUPFD_CLOEXEC %d", fcntl(d3, F_GETFD) == FD_CLOEXEC, fcntl(d5, F_GETFD) == FD_CLOEXEC);
    int fds[6] = {s, d1, d2, d3, d4, d5};
    for (int i = 0; i < 6; i++) {
        char ch = (char)('a' + i);
        while (write(fds[i], &ch, 1) != 1) poll(&p, 1, 100);
    }
    close(s);
    close(d1);
    close(d2);
    close(d3);
    close(d4);
    /* Blocking again through FIONBIO off, on the last duplicate. */
    int off0 = 0;
    CHECK(ioctl(d5, FIONBIO, &off0) == 0, "FIONBIO");
    char r[3];
    read_exact(d5, r, 3);
    say("client: blocking read on the last duplicate: %.3s", r);
    close(d5);
}

static void server(int l) {
    int fl = fcntl(l, F_GETFL);
    CHECK(fcntl(l, F_SETFL, fl | O_NONBLOCK) == 0, "listener nonblocking");
    int c;
    for (;;) {
        c = accept4(l, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (c >= 0) break;
        CHECK(errno == EAGAIN || errno == EWOULDBLOCK, "accept4");
        struct pollfd p = {l, POLLIN, 0};
        poll(&p, 1, 1000);
    }
    say("server: accept4 flags nonblock %d cloexec %d", (fcntl(c, F_GETFL) & O_NONBLOCK) != 0, fcntl(c, F_GETFD) == FD_CLOEXEC);
    msleep(300);
    /* Drain everything up to the six letters written through the duplicates. */
    static char buf[65536];
    size_t xs = 0, tlen = 0;
    char tail[64];
    struct pollfd p = {c, POLLIN, 0};
    for (;;) {
        ssize_t n = read(c, buf, sizeof buf);
        if (n < 0 && errno == EAGAIN) {
            CHECK(poll(&p, 1, 5000) == 1, "poll in");
            continue;
        }
        CHECK(n > 0, "drain");
        for (ssize_t i = 0; i < n; i++) {
            if (tlen == 0 && buf[i] == 'x') {
                xs++;
            } else {
                CHECK(tlen < sizeof tail - 1, "trailer too long");
                tail[tlen++] = buf[i];
            }
        }
        if (tlen >= 6 && memcmp(tail + tlen - 6, "abcdef", 6) == 0) break;
    }
    tail[tlen] = 0;
    size_t claimed = 0;
    CHECK(sscanf(tail, "#%zu;", &claimed) == 1, "trailer %s", tail);
    say("server: every byte of the full connection arrived %d, then the letters in order", claimed == xs);
    int flags = fcntl(c, F_GETFL);
    CHECK(fcntl(c, F_SETFL, flags & ~O_NONBLOCK) == 0, "F_SETFL blocking");
    write_all(c, "dup", 3);
    /* Read until EOF: the client closes every duplicate. */
    while (read(c, buf, sizeof buf) > 0) {
    }
    say("server: EOF once every duplicate is closed");
    close(c);
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    pair(0, server, client);
    say("done");
    return 0;
}
