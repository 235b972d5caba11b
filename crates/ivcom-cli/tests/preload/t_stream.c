/* Byte stream semantics over one connection: every read and write call, flags, FIONREAD,
 * addresses, half-close, a 16 MiB transfer in odd-sized pieces. */
#include "common.h"
#include <sys/uio.h>

#define BIG (16u << 20)

static int v6;

static void client(int port) {
    int s = connect_to(v6, port, 0);
    struct sockaddr_storage me, peer;
    socklen_t l1 = sizeof me, l2 = sizeof peer;
    CHECK(getsockname(s, (struct sockaddr *)&me, &l1) == 0, "getsockname");
    CHECK(getpeername(s, (struct sockaddr *)&peer, &l2) == 0, "getpeername");
    uint16_t pport = v6 ? ((struct sockaddr_in6 *)&peer)->sin6_port : ((struct sockaddr_in *)&peer)->sin_port;
    say("client: peer port matches %d", ntohs(pport) == port);
    /* Tell the server our port, so it can compare with accept's address. */
    uint16_t myport = v6 ? ((struct sockaddr_in6 *)&me)->sin6_port : ((struct sockaddr_in *)&me)->sin_port;
    write_all(s, &myport, 2);

    /* Every write call. */
    write_all(s, "write.", 6);
    CHECK(send(s, "send.", 5, 0) == 5, "send");
    CHECK(sendto(s, "sendto.", 7, 0, NULL, 0) == 7, "sendto");
    struct iovec iov[3] = {{"wr", 2}, {"it", 2}, {"ev.", 3}};
    CHECK(writev(s, iov, 3) == 7, "writev");
    struct msghdr m;
    memset(&m, 0, sizeof m);
    struct iovec iov2[2] = {{"send", 4}, {"msg.", 4}};
    m.msg_iov = iov2;
    m.msg_iovlen = 2;
    CHECK(sendmsg(s, &m, MSG_NOSIGNAL) == 8, "sendmsg");

    /* A large transfer in odd-sized writes. */
    unsigned char *b = malloc(BIG);
    fill(b, BIG, 7);
    size_t off = 0, step = 1;
    while (off < BIG) {
        size_t n = step < BIG - off ? step : BIG - off;
        write_all(s, b + off, n);
        off += n;
        step = step * 3 + 1;
        if (step > 300000) step = 1;
    }
    /* The server echoes it back; read with recv, MSG_WAITALL. */
    unsigned char *e = malloc(BIG);
    CHECK(recv(s, e, BIG, MSG_WAITALL) == (ssize_t)BIG, "recv waitall");
    say("client: echo of %u bytes intact %d", BIG, memcmp(b, e, BIG) == 0);

    /* Half-close: the server sees EOF, then still answers. */
    CHECK(shutdown(s, SHUT_WR) == 0, "shutdown");
    char reply[64];
    ssize_t n = recv(s, reply, sizeof reply, MSG_WAITALL);
    say("client: after half-close got %zd bytes: %.*s", n, (int)(n > 0 ? n : 0), reply);
    CHECK(read(s, reply, 1) == 0, "EOF after reply");
    say("client: EOF after the reply");
    close(s);
    free(b);
    free(e);
}

static void server(int l) {
    struct sockaddr_storage from;
    socklen_t fl = sizeof from;
    int c = accept(l, (struct sockaddr *)&from, &fl);
    CHECK(c >= 0, "accept");
    uint16_t cport;
    read_exact(c, &cport, 2);
    uint16_t fport = v6 ? ((struct sockaddr_in6 *)&from)->sin6_port : ((struct sockaddr_in *)&from)->sin_port;
    say("server: accept address is the client's %d, family %d", fport == cport, from.ss_family);
    struct sockaddr_storage me;
    socklen_t ml = sizeof me;
    CHECK(getsockname(c, (struct sockaddr *)&me, &ml) == 0, "getsockname");
    int lo = v6 ? memcmp(&((struct sockaddr_in6 *)&me)->sin6_addr, &in6addr_loopback, 16) == 0
                : ((struct sockaddr_in *)&me)->sin_addr.s_addr == htonl(INADDR_LOOPBACK);
    say("server: local address is loopback %d", lo);

    /* 6+5+7+7+8 = 33 bytes, read with different calls. */
    char buf[64] = {0};
    /* MSG_PEEK does not consume. */
    int avail = 0;
    while (avail < 33) {
        CHECK(ioctl(c, FIONREAD, &avail) == 0, "FIONREAD");
        if (avail < 33) msleep(1);
    }
    say("server: FIONREAD sees at least 33: %d", avail >= 33);
    CHECK(recv(c, buf, 6, MSG_PEEK) == 6, "peek");
    say("server: peeked %.6s", buf);
    CHECK(read(c, buf, 6) == 6, "read");
    say("server: read %.6s", buf);
    CHECK(recv(c, buf, 5, 0) == 5, "recv");
    say("server: recv %.5s", buf);
    struct sockaddr_in src;
    socklen_t sl = sizeof src;
    CHECK(recvfrom(c, buf, 7, 0, (struct sockaddr *)&src, &sl) == 7, "recvfrom");
    say("server: recvfrom %.7s", buf);
    char a[3], b2[4];
    struct iovec iov[2] = {{a, 3}, {b2, 4}};
    CHECK(readv(c, iov, 2) == 7, "readv");
    say("server: readv %.3s|%.4s", a, b2);
    struct msghdr m;
    memset(&m, 0, sizeof m);
    struct iovec iv = {buf, 8};
    m.msg_iov = &iv;
    m.msg_iovlen = 1;
    CHECK(recvmsg(c, &m, MSG_WAITALL) == 8, "recvmsg");
    say("server: recvmsg %.8s flags %d", buf, m.msg_flags);

    /* Nothing more yet: MSG_DONTWAIT says so. */
    /* (the big transfer may already be arriving, so only check the call works) */
    unsigned char *big = malloc(BIG);
    unsigned char *want = malloc(BIG);
    fill(want, BIG, 7);
    /* A peek that waits for its whole length, one that fills two buffers, then 10 bytes
     * discarded with MSG_TRUNC (no buffer): the stream goes on after them. */
    CHECK(recv(c, big, 1000, MSG_PEEK | MSG_WAITALL) == 1000, "peek waitall");
    say("server: MSG_PEEK|MSG_WAITALL saw 1000 bytes intact %d", memcmp(big, want, 1000) == 0);
    struct iovec pv[2] = {{big, 100}, {big + 100, 300}};
    memset(&m, 0, sizeof m);
    m.msg_iov = pv;
    m.msg_iovlen = 2;
    ssize_t pk = recvmsg(c, &m, MSG_PEEK);
    say("server: recvmsg MSG_PEEK into two buffers: %zd intact %d", pk, memcmp(big, want, 400) == 0);
    CHECK(recv(c, NULL, 10, MSG_TRUNC) == 10, "MSG_TRUNC");
    size_t got = 10;
    while (got < BIG) {
        ssize_t n = read(c, big + got, BIG - got < 100000 ? BIG - got : 100000);
        CHECK(n > 0, "read big");
        got += (size_t)n;
    }
    say("server: %u bytes intact %d", BIG, memcmp(big, want, BIG) == 0);
    write_all(c, big, BIG);
    /* Wait for the client's half-close. */
    CHECK(read(c, buf, 1) == 0, "EOF from client");
    say("server: EOF after the client's shutdown");
    write_all(c, "still-answering", 15);
    close(c);
    free(big);
    free(want);
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    v6 = argc > 1 && strcmp(argv[1], "6") == 0;
    pair(v6, server, client);
    say("done");
    return 0;
}
