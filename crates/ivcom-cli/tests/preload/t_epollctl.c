/* epoll_ctl the way event loops use it on every request (redis's ae, libuv): write interest
 * turned on and off, a registration removed and added again. Under ivcom run these changes
 * cost no system call (the library keeps its registration in the kernel and records the
 * program's), so each must still give exactly the kernel's answers and errors; and the
 * program's other descriptors (here a pipe) are reported while a connection stays ready,
 * within the documented bound of FAIR_CALLS waits. */
#include "common.h"
#include <sys/epoll.h>
#include <sys/select.h>

/* The library's bound (crates/ivcom-interpose/src/epoll.rs FAIR_CALLS) plus the wait that
 * asks the kernel. */
#define FAIR_BOUND 33

static const char *err(int r) {
    if (r == 0) return "ok";
    return errno == ENOENT ? "ENOENT" : errno == EEXIST ? "EEXIST" : errno == EINVAL ? "EINVAL" : strerror(errno);
}

/* A client's request loop as redis-benchmark drives it: add for writing, write, remove,
 * add for reading, read the answer, remove. */
static void churn(void) {
    int c, s;
    local_pair(&c, &s);
    int ep = epoll_create1(0);
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = 1}, ev[4];
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, c, &e) == 0, "add");
    say("churn: add twice: %s", err(epoll_ctl(ep, EPOLL_CTL_ADD, c, &e)));
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, c, NULL) == 0, "del");
    int wrong = 0;
    char b[8];
    for (int i = 0; i < 300; i++) {
        e.events = EPOLLOUT;
        e.data.u64 = 2;
        CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, c, &e) == 0, "add out");
        int n = wait_ms(ep, ev, 4, 2000);
        if (n != 1 || ev[0].events != EPOLLOUT || ev[0].data.u64 != 2) wrong++;
        write_all(c, "q", 1);
        CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, c, NULL) == 0, "del out");
        e.events = EPOLLIN;
        e.data.u64 = 3;
        CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, c, &e) == 0, "add in");
        read_exact(s, b, 1);
        write_all(s, "a", 1);
        n = wait_ms(ep, ev, 4, 2000);
        if (n != 1 || ev[0].events != EPOLLIN || ev[0].data.u64 != 3) wrong++;
        read_exact(c, b, 1);
        /* and the other style: write interest switched on and off with MOD */
        e.events = EPOLLIN | EPOLLOUT;
        CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, c, &e) == 0, "mod in|out");
        n = wait_ms(ep, ev, 4, 2000);
        if (n != 1 || ev[0].events != EPOLLOUT) wrong++;
        e.events = EPOLLIN;
        CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, c, &e) == 0, "mod in");
        if (wait_ms(ep, ev, 4, 0) != 0) wrong++;
        CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, c, NULL) == 0, "del in");
    }
    say("churn: 300 rounds, wrong answers %d", wrong);
    say("churn: removed, delete again: %s", err(epoll_ctl(ep, EPOLL_CTL_DEL, c, NULL)));
    e.events = EPOLLIN;
    say("churn: removed, modify: %s", err(epoll_ctl(ep, EPOLL_CTL_MOD, c, &e)));
    write_all(s, "late", 4);
    say("churn: removed, data arrives: %d event(s)", wait_ms(ep, ev, 4, 100));
    e.data.u64 = 4;
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, c, &e) == 0, "add again");
    int n = wait_ms(ep, ev, 4, 2000);
    say("churn: added again with data pending: %d event(s), data %llu", n,
        n > 0 ? (unsigned long long)ev[0].data.u64 : 0ull);
    say("churn: read %zd", read(c, b, sizeof b));
    /* Edge-triggered: re-added after removal, pending data is one new edge. */
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, c, NULL) == 0, "del");
    write_all(s, "et", 2);
    e.events = EPOLLIN | EPOLLET;
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, c, &e) == 0, "add et");
    int first = wait_ms(ep, ev, 4, 2000);
    /* The edge was reported and the data is left unread: a wait sleeps (no CPU) until its
     * timeout, as the kernel's does. */
    double cpu0 = thread_cpu_ms();
    int second = wait_ms(ep, ev, 4, 300);
    say("churn: edge-triggered re-add: %d then %d, the second slept: %s", first, second,
        thread_cpu_ms() - cpu0 < 100 ? "yes" : "no");
    say("churn: read %zd", read(c, b, sizeof b));
    /* An exclusive registration cannot be modified; removed, it can be added again. */
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, c, NULL) == 0, "del");
    e.events = EPOLLIN | EPOLLEXCLUSIVE;
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, c, &e) == 0, "add exclusive");
    e.events = EPOLLIN;
    say("churn: modify an exclusive registration: %s", err(epoll_ctl(ep, EPOLL_CTL_MOD, c, &e)));
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, c, NULL) == 0, "del exclusive");
    say("churn: exclusive removed, add plain: %s", err(epoll_ctl(ep, EPOLL_CTL_ADD, c, &e)));
    close(c);
    close(s);
    close(ep);
}

/* A removed registration, then its number closed while a dup stays open and another socket
 * put at that number and added: only the new socket's events are reported under it. */
static void reused_number(void) {
    int c, s, x, y;
    local_pair(&c, &s);
    local_pair(&x, &y);
    int ep = epoll_create1(0);
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = 5}, ev[4];
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, c, &e) == 0, "add");
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, c, NULL) == 0, "del");
    int d = dup(c);
    CHECK(dup2(x, c) == c, "dup2");
    close(x);
    e.data.u64 = 9;
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, c, &e) == 0, "add the new socket");
    write_all(s, "old", 3);
    say("reused: data for the old socket: %d event(s)", wait_ms(ep, ev, 4, 100));
    write_all(y, "new", 3);
    int n = wait_ms(ep, ev, 4, 2000);
    say("reused: data for the new socket: %d event(s), data %llu", n,
        n > 0 ? (unsigned long long)ev[0].data.u64 : 0ull);
    char b[8];
    ssize_t got = read(c, b, sizeof b);
    say("reused: read new %zd, old through the dup %zd", got, read(d, b, sizeof b));
    close(c);
    close(d);
    close(s);
    close(y);
    close(ep);
}

/* A removed registration whose connection then goes back to TCP (SO_RCVLOWAT above 1 is
 * one reason): adding it again works, and it reports as TCP does. */
static void handed_back(void) {
    int c, s;
    local_pair(&c, &s);
    int ep = epoll_create1(0);
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = 6}, ev[4];
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, s, &e) == 0, "add");
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, s, NULL) == 0, "del");
    int two = 2;
    CHECK(setsockopt(s, SOL_SOCKET, SO_RCVLOWAT, &two, sizeof two) == 0, "SO_RCVLOWAT");
    say("handed back: add again: %s", err(epoll_ctl(ep, EPOLL_CTL_ADD, s, &e)));
    write_all(c, "h", 1);
    say("handed back: one byte under a low-water mark of 2: %d event(s)", wait_ms(ep, ev, 4, 100));
    write_all(c, "i", 1);
    int n = wait_ms(ep, ev, 4, 2000);
    say("handed back: two bytes: %d event(s), data %llu", n, n > 0 ? (unsigned long long)ev[0].data.u64 : 0ull);
    char b[8];
    say("handed back: read %zd", read(s, b, sizeof b));
    const char *del1 = err(epoll_ctl(ep, EPOLL_CTL_DEL, s, NULL));
    say("handed back: delete: %s, again: %s", del1, err(epoll_ctl(ep, EPOLL_CTL_DEL, s, NULL)));
    close(c);
    close(s);
    close(ep);
}

/* A connection that stays readable (never drained, level-triggered) beside a pipe: the pipe
 * is reported within FAIR_BOUND waits, for waits of several events and of one. */
static void fair(int max) {
    int c, s, p[2];
    local_pair(&c, &s);
    CHECK(pipe(p) == 0, "pipe");
    int ep = epoll_create1(0);
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = 1}, ev[4];
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, s, &e) == 0, "add s");
    e.data.u64 = 100;
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &e) == 0, "add pipe");
    write_all(c, "ready", 5);
    CHECK(wait_ms(ep, ev, max, 2000) >= 1, "first wait");
    /* Many waits answered while only the connection is ready. */
    for (int i = 0; i < 100; i++) CHECK(wait_ms(ep, ev, max, 2000) >= 1, "wait");
    write_all(p[1], "p", 1);
    int calls = 0, seen = 0;
    while (calls < 200 && !seen) {
        int n = wait_ms(ep, ev, max, 2000);
        calls++;
        for (int i = 0; i < n; i++) seen |= ev[i].data.u64 == 100;
    }
    say("fair (%d per wait): the pipe reported within %d waits: %s", max, FAIR_BOUND,
        seen && calls <= FAIR_BOUND ? "yes" : "no");
    close(p[0]);
    close(p[1]);
    close(c);
    close(s);
    close(ep);
}

/* The same bound for poll and select, which ask the kernel per thread. */
static void fair_poll(int use_select) {
    int c, s, p[2];
    local_pair(&c, &s);
    CHECK(pipe(p) == 0, "pipe");
    write_all(c, "ready", 5);
    int calls = 0, seen = 0;
    for (int i = 0; i < 300 && !seen; i++) {
        if (i == 100) write_all(p[1], "p", 1);
        int got_pipe = 0, n;
        if (use_select) {
            fd_set r;
            FD_ZERO(&r);
            FD_SET(s, &r);
            FD_SET(p[0], &r);
            struct timeval tv = {2, 0};
            n = select((s > p[0] ? s : p[0]) + 1, &r, NULL, NULL, &tv);
            got_pipe = n > 0 && FD_ISSET(p[0], &r);
        } else {
            struct pollfd f[2] = {{.fd = s, .events = POLLIN}, {.fd = p[0], .events = POLLIN}};
            n = poll(f, 2, 2000);
            got_pipe = n > 0 && (f[1].revents & POLLIN);
        }
        CHECK(n >= 1, "wait");
        if (i >= 100) calls++;
        seen = got_pipe;
    }
    say("fair (%s): the pipe reported within %d waits: %s", use_select ? "select" : "poll", FAIR_BOUND,
        seen && calls <= FAIR_BOUND ? "yes" : "no");
    close(p[0]);
    close(p[1]);
    close(c);
    close(s);
}

int main(void) {
    churn();
    reused_number();
    handed_back();
    fair(4);
    fair(1);
    fair_poll(0);
    fair_poll(1);
    say("done");
    return 0;
}
