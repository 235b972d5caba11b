/* epoll on connections: level and edge triggering, EPOLLONESHOT and re-arming with MOD,
 * EPOLLOUT, EPOLLRDHUP and EPOLLHUP, epoll_pwait, a sleeper woken by later data, several
 * connections in one set, and removing or closing a registered descriptor; the kernel's
 * errors for a bad EPOLLEXCLUSIVE registration and a null event array. */
#include "common.h"
#include <sys/epoll.h>

#define N 3

static void client(int port) {
    int s[N];
    for (int i = 0; i < N; i++) s[i] = connect_to(0, port, 0);
    char go;
    for (int round = 0; round < 7; round++) {
        read_exact(s[0], &go, 1);
        msleep(round == 3 ? 100 : 5);
        write_all(s[go - '0'], "abcd", 4);
    }
    read_exact(s[0], &go, 1);
    CHECK(shutdown(s[1], SHUT_WR) == 0, "shutdown");
    read_exact(s[0], &go, 1);
    for (int i = 0; i < N; i++) close(s[i]);
}

static int wait1(int ep, struct epoll_event *ev, int ms) {
    return epoll_wait(ep, ev, 8, ms);
}

static void server(int l) {
    int c[N];
    for (int i = 0; i < N; i++) c[i] = accept_one(l);
    /* The accept order is the connect order for one client doing them in sequence. */
    int ep = epoll_create1(EPOLL_CLOEXEC);
    CHECK(ep >= 0, "epoll_create1");
    struct epoll_event e;
    for (int i = 0; i < N; i++) {
        e.events = EPOLLIN;
        e.data.u64 = 100 + (uint64_t)i;
        CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, c[i], &e) == 0, "add");
    }
    e.events = EPOLLIN;
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, c[0], &e) == -1 && errno == EEXIST, "double add");
    say("server: adding twice gives EEXIST");
    struct epoll_event ev[8];
    CHECK(wait1(ep, ev, 30) == 0, "nothing yet");
    say("server: nothing ready before data");

    /* Level-triggered: reported on every wait until read. */
    write_all(c[0], "1", 1);
    CHECK(wait1(ep, ev, 5000) == 1 && ev[0].data.u64 == 101, "level 1");
    CHECK(wait1(ep, ev, 5000) == 1 && ev[0].data.u64 == 101, "level 2");
    char b[16];
    read_exact(c[1], b, 2);
    CHECK(wait1(ep, ev, 0) == 1, "level, half read");
    read_exact(c[1], b, 2);
    CHECK(wait1(ep, ev, 0) == 0, "level, drained");
    say("server: level-triggered: reported until drained");

    /* Edge-triggered: once per arrival. */
    e.events = EPOLLIN | EPOLLET;
    e.data.u64 = 102;
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, c[2], &e) == 0, "mod et");
    write_all(c[0], "2", 1);
    CHECK(wait1(ep, ev, 5000) == 1 && ev[0].data.u64 == 102, "edge 1");
    CHECK(wait1(ep, ev, 50) == 0, "edge: not again");
    read_exact(c[2], b, 4);
    say("server: edge-triggered: reported once per arrival");

    /* One-shot: once, then again only after MOD. */
    e.events = EPOLLIN | EPOLLONESHOT;
    e.data.u64 = 200;
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, c[0], &e) == 0, "mod oneshot");
    write_all(c[0], "0", 1);
    CHECK(wait1(ep, ev, 5000) == 1 && ev[0].data.u64 == 200, "oneshot 1");
    CHECK(wait1(ep, ev, 50) == 0, "oneshot disarmed");
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, c[0], &e) == 0, "rearm");
    CHECK(wait1(ep, ev, 5000) == 1 && ev[0].data.u64 == 200, "oneshot rearmed");
    read_exact(c[0], b, 4);
    say("server: one-shot: once, again after MOD");

    /* A sleeper woken by data that arrives 100 ms later, through epoll_pwait. */
    e.events = EPOLLIN;
    e.data.u64 = 100;
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, c[0], &e) == 0, "mod back");
    write_all(c[0], "1", 1);
    sigset_t mask;
    sigemptyset(&mask);
    double t0 = now_ms();
    CHECK(epoll_pwait(ep, ev, 8, 10000, &mask) == 1 && ev[0].data.u64 == 101, "pwait wake");
    say("server: epoll_pwait woken by later data, not by its timeout %d", now_ms() - t0 < 5000);
    read_exact(c[1], b, 4);

    /* Output readiness and a removed descriptor. */
    e.events = EPOLLOUT;
    e.data.u64 = 300;
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, c[2], &e) == 0, "mod out");
    CHECK(wait1(ep, ev, 1000) == 1 && ev[0].data.u64 == 300 && (ev[0].events & EPOLLOUT), "out");
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, c[2], NULL) == 0, "del");
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, c[2], NULL) == -1 && errno == ENOENT, "del twice");
    write_all(c[0], "2", 1);
    CHECK(wait1(ep, ev, 100) == 0, "removed: silent");
    read_exact(c[2], b, 4);
    say("server: EPOLLOUT reported; a removed descriptor is silent");

    /* Two connections ready at once. */
    write_all(c[0], "0", 1);
    read_exact(c[0], b, 4);
    write_all(c[0], "1", 1);
    msleep(50);
    e.events = EPOLLIN;
    e.data.u64 = 102;
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, c[2], &e) == 0, "re-add");
    int n = wait1(ep, ev, 5000);
    say("server: one connection with data of three: %d event(s), for #%d", n, (int)(ev[0].data.u64 - 100));
    read_exact(c[1], b, 4);

    /* The peer's half-close: EPOLLRDHUP, not EPOLLHUP. */
    e.events = EPOLLIN | EPOLLRDHUP;
    e.data.u64 = 101;
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, c[1], &e) == 0, "mod rdhup");
    write_all(c[0], "x", 1);
    CHECK(wait1(ep, ev, 5000) == 1 && ev[0].data.u64 == 101, "rdhup");
    say("server: peer half-closed: EPOLLIN %d EPOLLRDHUP %d EPOLLHUP %d", (ev[0].events & EPOLLIN) != 0, (ev[0].events & EPOLLRDHUP) != 0, (ev[0].events & EPOLLHUP) != 0);
    CHECK(shutdown(c[1], SHUT_WR) == 0, "shutdown");
    CHECK(wait1(ep, ev, 5000) == 1, "hup");
    say("server: both halves closed: EPOLLHUP %d", (ev[0].events & EPOLLHUP) != 0);
    /* Closing a registered descriptor removes it. */
    close(c[1]);
    CHECK(wait1(ep, ev, 50) == 0, "closed: gone");
    say("server: a closed descriptor leaves the set");
    write_all(c[0], "x", 1);
    for (int i = 0; i < N; i++)
        if (i != 1) close(c[i]);
    close(ep);
}

static void errors(void) {
    int c, s;
    local_pair(&c, &s);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLEXCLUSIVE | EPOLLONESHOT, .data.u64 = 1};
    int r = epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
    say("errors: ADD with EPOLLEXCLUSIVE|EPOLLONESHOT: r=%d EINVAL %d", r, r < 0 && errno == EINVAL);
    ev.events = EPOLLIN | EPOLLEXCLUSIVE;
    r = epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
    say("errors: ADD with EPOLLEXCLUSIVE: r=%d", r);
    r = epoll_ctl(ep, EPOLL_CTL_MOD, c, &ev);
    say("errors: MOD of an exclusive registration: r=%d EINVAL %d", r, r < 0 && errno == EINVAL);
    write_all(s, "z", 1);
    msleep(20);
    struct epoll_event *volatile none = NULL;
    r = epoll_wait(ep, none, 4, 0);
    say("errors: epoll_wait into a null array with an event ready: r=%d EFAULT %d", r, r < 0 && errno == EFAULT);
    close(ep);
    close(c);
    close(s);
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    errors();
    pair(0, server, client);
    say("done");
    return 0;
}
