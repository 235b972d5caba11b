/* Signals during blocking calls, as over TCP: a handler without SA_RESTART ends a blocked
 * read, write or accept with EINTR (a write that moved bytes returns their count); with
 * SA_RESTART the call goes on; poll and epoll_wait end with EINTR either way; SO_RCVTIMEO
 * and SO_SNDTIMEO end blocked calls with EAGAIN. */
#include "common.h"
#include <sys/epoll.h>
#include <sys/time.h>

static volatile sig_atomic_t hits;
static void on_alarm(int sig) {
    (void)sig;
    hits++;
}

/* SIGALRM in `ms` milliseconds, its handler with or without SA_RESTART. */
static void alarm_in(int ms, int restart) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = restart ? SA_RESTART : 0;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it = {{0, 0}, {ms / 1000, (ms % 1000) * 1000}};
    setitimer(ITIMER_REAL, &it, NULL);
}

static void client(int port) {
    int s = connect_to(0, port, 0);
    char b[4];
    /* (a) read, no SA_RESTART. */
    alarm_in(200, 0);
    errno = 0;
    ssize_t r = read(s, b, 1);
    say("client: read without SA_RESTART: %zd EINTR %d", r, errno == EINTR);
    write_all(s, "a", 1);
    /* (b) read, SA_RESTART: goes on until the data (sent 600 ms after "b"). */
    write_all(s, "b", 1);
    alarm_in(200, 1);
    r = read(s, b, 1);
    say("client: read with SA_RESTART: %zd %c", r, r == 1 ? b[0] : '-');
    /* (c) poll and (d) epoll_wait end with EINTR even with SA_RESTART. */
    struct pollfd p = {s, POLLIN, 0};
    alarm_in(200, 1);
    errno = 0;
    int n = poll(&p, 1, 5000);
    say("client: poll: %d EINTR %d", n, errno == EINTR);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 1};
    epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
    alarm_in(200, 1);
    errno = 0;
    n = epoll_wait(ep, &ev, 1, 5000);
    say("client: epoll_wait: %d EINTR %d", n, errno == EINTR);
    close(ep);
    /* (e) SO_RCVTIMEO. */
    struct timeval tv = {0, 300000};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    errno = 0;
    r = recv(s, b, 1, 0);
    say("client: recv with SO_RCVTIMEO: %zd EAGAIN %d", r, errno == EAGAIN || errno == EWOULDBLOCK);
    tv.tv_usec = 0;
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    /* (f) a write that blocks because the peer reads nothing: without SA_RESTART it returns
     * what it moved (or EINTR); (g) SO_SNDTIMEO the same with EAGAIN. */
    size_t big = 64 << 20;
    char *buf = calloc(1, big);
    alarm_in(300, 0);
    errno = 0;
    r = write(s, buf, big);
    say("client: blocked write without SA_RESTART: returned what it moved, or EINTR: %d",
        (r > 0 && (size_t)r < big) || (r < 0 && errno == EINTR));
    size_t moved = r > 0 ? (size_t)r : 0;
    tv.tv_usec = 300000;
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    errno = 0;
    r = write(s, buf, big);
    say("client: blocked write with SO_SNDTIMEO: returned what it moved, or EAGAIN: %d",
        (r > 0 && (size_t)r < big) || (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)));
    moved += r > 0 ? (size_t)r : 0;
    /* Tell the server how much to drain, then finish. */
    alarm_in(0, 0);
    shutdown(s, SHUT_WR);
    r = read(s, b, 4);
    say("client: server drained everything: %zd %.2s", r, b);
    (void)moved;
    free(buf);
    close(s);
}

static void server(int l) {
    int c = accept_one(l);
    char b[1];
    read_exact(c, b, 1); /* "a": (a) done */
    read_exact(c, b, 1); /* "b" */
    msleep(600);
    write_all(c, "B", 1);
    msleep(2500); /* the client's writes block meanwhile */
    /* Drain what the blocked writes moved, until EOF. */
    char *buf = malloc(1 << 20);
    size_t total = 0;
    for (;;) {
        ssize_t r = read(c, buf, 1 << 20);
        CHECK(r >= 0, "drain");
        if (r == 0) break;
        total += (size_t)r;
    }
    free(buf);
    write_all(c, "ok", 2);
    close(c);
    /* (h) accept without SA_RESTART, nobody connecting. */
    alarm_in(200, 0);
    errno = 0;
    int x = accept(l, NULL, NULL);
    say("server: accept without SA_RESTART: %d EINTR %d", x, errno == EINTR);
    alarm_in(0, 0);
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    pair(0, server, client);
    return 0;
}
