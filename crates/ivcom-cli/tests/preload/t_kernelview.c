/* What only the kernel's socket knows, seen as over TCP: urgent data (POLLPRI, select's
 * exception set, SIOCATMARK, recv(MSG_OOB)) among ring bytes; a receive low-water mark;
 * a peek offset; signal-driven input (O_ASYNC, F_SETSIG). The library hands such
 * connections back to the kernel (or answers from the kernel) where its ring cannot
 * follow. */
#include "common.h"
#include <sys/epoll.h>
#include <linux/sockios.h>
#include <sys/select.h>

static volatile sig_atomic_t sigio_fd = -1;
static void on_sigio(int sig, siginfo_t *si, void *ctx) {
    (void)sig;
    (void)ctx;
    sigio_fd = si->si_fd;
}

static void urgent(void) {
    int c, s;
    local_pair(&c, &s);
    write_all(c, "abc", 3);
    CHECK(send(c, "!", 1, MSG_OOB) == 1, "send MSG_OOB");
    write_all(c, "def", 3);
    msleep(50);
    struct pollfd p = {.fd = s, .events = POLLIN | POLLPRI};
    CHECK(poll(&p, 1, 1000) == 1, "poll");
    say("urgent: poll IN %d PRI %d", !!(p.revents & POLLIN), !!(p.revents & POLLPRI));
    fd_set r, x;
    FD_ZERO(&r);
    FD_ZERO(&x);
    FD_SET(s, &r);
    FD_SET(s, &x);
    struct timeval tv = {1, 0};
    int n = select(s + 1, &r, NULL, &x, &tv);
    say("urgent: select %d readable %d exception %d", n, FD_ISSET(s, &r), FD_ISSET(s, &x));
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLPRI, .data.u32 = 9};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev) == 0, "epoll_ctl");
    n = epoll_wait(ep, &ev, 1, 1000);
    say("urgent: epoll %d IN %d PRI %d", n, !!(ev.events & EPOLLIN), !!(ev.events & EPOLLPRI));
    close(ep);
    int mark = -1;
    CHECK(ioctl(s, SIOCATMARK, &mark) == 0, "SIOCATMARK");
    say("urgent: at the mark before reading %d", mark);
    char b[16] = {0};
    ssize_t got = read(s, b, sizeof b);
    say("urgent: read stops at the mark: %zd '%.*s'", got, (int)(got > 0 ? got : 0), b);
    CHECK(ioctl(s, SIOCATMARK, &mark) == 0, "SIOCATMARK");
    say("urgent: at the mark after reading %d", mark);
    char u = 0;
    ssize_t o = recv(s, &u, 1, MSG_OOB);
    say("urgent: recv(MSG_OOB) %zd '%c'", o, u);
    got = read(s, b, sizeof b);
    say("urgent: then %zd '%.*s'", got, (int)(got > 0 ? got : 0), b);
    write_all(s, "back", 4);
    read_exact(c, b, 4);
    say("urgent: the other way still works '%.4s'", b);
    close(c);
    close(s);
}

static void low_water(void) {
    int c, s;
    local_pair(&c, &s);
    int lw = 10;
    CHECK(setsockopt(s, SOL_SOCKET, SO_RCVLOWAT, &lw, sizeof lw) == 0, "SO_RCVLOWAT");
    write_all(c, "12345", 5);
    msleep(50);
    struct pollfd p = {.fd = s, .events = POLLIN};
    say("low water 10, 5 bytes: poll %d", poll(&p, 1, 100));
    write_all(c, "67890abc", 8);
    msleep(50);
    say("low water 10, 13 bytes: poll %d", poll(&p, 1, 1000));
    char b[32];
    say("low water: read %zd", read(s, b, sizeof b));
    close(c);
    close(s);
}

static void peek_offset(void) {
    int c, s;
    local_pair(&c, &s);
    int off = 0;
    CHECK(setsockopt(s, SOL_SOCKET, SO_PEEK_OFF, &off, sizeof off) == 0, "SO_PEEK_OFF");
    write_all(c, "0123456789", 10);
    msleep(50);
    char b[8] = {0};
    ssize_t a = recv(s, b, 3, MSG_PEEK);
    say("peek offset: first peek %zd '%.3s'", a, b);
    a = recv(s, b, 3, MSG_PEEK);
    say("peek offset: second peek %zd '%.3s'", a, b);
    socklen_t l = sizeof off;
    CHECK(getsockopt(s, SOL_SOCKET, SO_PEEK_OFF, &off, &l) == 0, "get SO_PEEK_OFF");
    say("peek offset: now %d", off);
    a = read(s, b, 4);
    say("peek offset: read %zd '%.4s'", a, b);
    close(c);
    close(s);
}

static void signal_driven(void) {
    int c, s;
    local_pair(&c, &s);
    struct sigaction sa = {0};
    sa.sa_sigaction = on_sigio;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    CHECK(sigaction(SIGRTMIN + 4, &sa, NULL) == 0, "sigaction");
    CHECK(fcntl(s, F_SETOWN, getpid()) == 0, "F_SETOWN");
    CHECK(fcntl(s, F_SETSIG, SIGRTMIN + 4) == 0, "F_SETSIG");
    CHECK(fcntl(s, F_SETFL, fcntl(s, F_GETFL) | O_ASYNC | O_NONBLOCK) == 0, "O_ASYNC");
    write_all(c, "ping", 4);
    for (int i = 0; i < 100 && sigio_fd < 0; i++) msleep(10);
    say("signal-driven: signal for the connection %d", sigio_fd == s);
    char b[8];
    say("signal-driven: read %zd", read(s, b, sizeof b));
    close(c);
    close(s);
}

/* Reads after our own SHUT_RD still get what arrived, then EOF; an empty write after the
 * peer closed is 0; SIOCOUTQ is 0 once everything is read; a source address bound with
 * IP_BIND_ADDRESS_NO_PORT is the one the server sees; an empty error queue says EAGAIN. */
static void stream_edges(void) {
    int c, s;
    local_pair(&c, &s);
    write_all(c, "before", 6);
    msleep(50);
    CHECK(shutdown(s, SHUT_RD) == 0, "shutdown");
    char b[16];
    ssize_t a = read(s, b, sizeof b);
    say("shut_rd: read %zd then %zd", a, read(s, b, sizeof b));
    int q = -1;
    CHECK(ioctl(c, SIOCOUTQ, &q) == 0, "SIOCOUTQ");
    say("outq after the peer read everything: %d", q);
    errno = 0;
    a = recv(s, b, sizeof b, MSG_ERRQUEUE | MSG_DONTWAIT);
    say("empty error queue: %zd EAGAIN %d", a, errno == EAGAIN);
    close(c);
    msleep(50);
    say("empty write after the peer closed: %zd", write(s, b, 0));
    close(s);

    int port;
    int l = listen_any(0, &port);
    int k = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    CHECK(setsockopt(k, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one) == 0, "NO_PORT");
    struct sockaddr_in src = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000004)};
    CHECK(bind(k, (struct sockaddr *)&src, sizeof src) == 0, "bind 127.0.0.4");
    struct sockaddr_storage ss;
    socklen_t len = loopback(0, port, &ss);
    CHECK(connect(k, (struct sockaddr *)&ss, len) == 0, "connect");
    struct sockaddr_in peer;
    socklen_t pl = sizeof peer;
    int t = accept(l, (struct sockaddr *)&peer, &pl);
    CHECK(t >= 0, "accept");
    char ip[32];
    inet_ntop(AF_INET, &peer.sin_addr, ip, sizeof ip);
    write_all(k, "hi", 2);
    read_exact(t, b, 2);
    say("bound source address seen by the server: %s", ip);
    close(k);
    close(t);
    close(l);
}

/* TCP_INFO's byte counters (tcpi_bytes_acked at byte 120, tcpi_bytes_received at 128 of
 * the kernel's struct tcp_info, newer than glibc's header) count what the connection
 * carried. */
static uint64_t tcp_counter(int fd, size_t off) {
    unsigned char info[256] = {0};
    socklen_t l = sizeof info;
    CHECK(getsockopt(fd, IPPROTO_TCP, TCP_INFO, info, &l) == 0 && l >= off + 8, "TCP_INFO");
    uint64_t v;
    memcpy(&v, info + off, sizeof v);
    return v;
}

static void tcp_counters(void) {
    int c, s;
    local_pair(&c, &s);
    uint64_t acked0 = tcp_counter(c, 120), received0 = tcp_counter(s, 128);
    static char buf[1 << 20];
    fflush(stdout);
    pid_t k = fork();
    CHECK(k >= 0, "fork");
    if (k == 0) {
        write_all(c, buf, sizeof buf);
        _exit(0);
    }
    read_exact(s, buf, sizeof buf);
    int st;
    waitpid(k, &st, 0);
    msleep(50);
    uint64_t acked = tcp_counter(c, 120) - acked0, received = tcp_counter(s, 128) - received0;
    say("tcp_info: sender's bytes_acked grew by 1 MiB or more %d, receiver's bytes_received %d",
        acked >= sizeof buf, received >= sizeof buf);
    close(c);
    close(s);
}

/* connect(AF_UNSPEC) dissolves a connection; a next connect on the socket is a new one. */
static void dissolve(void) {
    int port;
    int l = listen_any(0, &port);
    int c = connect_to(0, port, 0);
    int s1 = accept_one(l);
    char b[4] = {0};
    write_all(c, "one", 3);
    read_exact(s1, b, 3);
    write_all(s1, "ack", 3);
    read_exact(c, b, 3);
    struct sockaddr sa = {.sa_family = AF_UNSPEC};
    CHECK(connect(c, &sa, sizeof sa) == 0, "connect AF_UNSPEC");
    struct sockaddr_storage ss;
    socklen_t len = loopback(0, port, &ss);
    CHECK(connect(c, (struct sockaddr *)&ss, len) == 0, "reconnect");
    int s2 = accept_one(l);
    write_all(c, "two", 3);
    read_exact(s2, b, 3);
    say("dissolved and reconnected: the new peer got '%.3s'", b);
    errno = 0;
    ssize_t r = read(s1, b, 3);
    say("dissolved: the old peer reads %zd ECONNRESET %d", r, errno == ECONNRESET);
    close(c);
    close(s1);
    close(s2);
    close(l);
}

int main(void) {
    dissolve();
    tcp_counters();
    stream_edges();
    urgent();
    low_water();
    peek_offset();
    signal_driven();
    say("done");
    return 0;
}
