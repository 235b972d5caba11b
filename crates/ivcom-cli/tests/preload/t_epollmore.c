/* Readiness, continued: an epoll registration lives as long as its open file (a dup of the
 * registered number keeps it); a wait for fewer events than are ready takes turns; the
 * peer's FIN is reported through three nested instances to an edge-triggered innermost one
 * and to select on the outermost; a descriptor closed while poll sleeps on it is POLLNVAL; a
 * connection another thread adds or re-arms while one waits wakes the waiter. */
#include "common.h"
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/select.h>

#define FAIR 6

static void lifetime(void) {
    int c, s;
    local_pair(&c, &s);
    int ep = epoll_create1(0);
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = 77}, ev[4];
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, s, &e) == 0, "add");
    int d = dup(s);
    close(s);
    write_all(c, "x", 1);
    int n = wait_ms(ep, ev, 4, 2000);
    say("lifetime: registered number closed, dup open: %d event(s), data %llu", n,
        n > 0 ? (unsigned long long)ev[0].data.u64 : 0ull);
    char b[4];
    say("lifetime: read through the dup %zd", read(d, b, sizeof b));
    say("lifetime: then idle %d", wait_ms(ep, ev, 4, 50));
    int d2 = dup2(d, 200);
    close(d);
    write_all(c, "y", 1);
    n = wait_ms(ep, ev, 4, 2000);
    say("lifetime: moved again: %d event(s), data %llu", n, n > 0 ? (unsigned long long)ev[0].data.u64 : 0ull);
    say("lifetime: read %zd", read(d2, b, sizeof b));
    close(d2);
    write_all(c, "z", 1);
    say("lifetime: after the last number closed %d", wait_ms(ep, ev, 4, 50));
    close(c);
    close(ep);
}

static void turns(void) {
    int c[FAIR], s[FAIR];
    int ep = epoll_create1(0);
    for (int i = 0; i < FAIR; i++) {
        local_pair(&c[i], &s[i]);
        struct epoll_event e = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, s[i], &e) == 0, "add");
        write_all(c[i], "r", 1);
    }
    msleep(50);
    int seen[FAIR] = {0}, distinct = 0;
    for (int k = 0; k < FAIR; k++) {
        struct epoll_event ev;
        CHECK(wait_ms(ep, &ev, 1, 1000) == 1, "wait");
        if (ev.data.u32 < FAIR && !seen[ev.data.u32]++) distinct++;
    }
    say("turns: %d waits for one event each reported %d different connections", FAIR, distinct);
    for (int i = 0; i < FAIR; i++) {
        close(c[i]);
        close(s[i]);
    }
    close(ep);
}

static void nested_fin(void) {
    int c, s;
    local_pair(&c, &s);
    int e1 = epoll_create1(0), e2 = epoll_create1(0), e3 = epoll_create1(0);
    struct epoll_event e = {.events = EPOLLIN | EPOLLRDHUP | EPOLLET, .data.u32 = 1}, ev[4];
    CHECK(epoll_ctl(e1, EPOLL_CTL_ADD, s, &e) == 0, "add s");
    e.events = EPOLLIN;
    e.data.u32 = 2;
    CHECK(epoll_ctl(e2, EPOLL_CTL_ADD, e1, &e) == 0, "add e1");
    e.data.u32 = 3;
    CHECK(epoll_ctl(e3, EPOLL_CTL_ADD, e2, &e) == 0, "add e2");
    say("nested: idle %d", wait_ms(e3, ev, 4, 50));
    write_all(c, "1", 1);
    fd_set r;
    FD_ZERO(&r);
    FD_SET(e3, &r);
    struct timeval tv = {2, 0};
    say("nested: select on the outermost after data %d", select(e3 + 1, &r, NULL, NULL, &tv));
    int n = wait_ms(e1, ev, 4, 0);
    say("nested: innermost %d events %#x", n, n > 0 ? ev[0].events : 0);
    char b[4];
    say("nested: read %zd", read(s, b, sizeof b));
    shutdown(c, SHUT_WR);
    say("nested: outermost after the peer's FIN %d", wait_ms(e3, ev, 4, 2000));
    n = wait_ms(e1, ev, 4, 0);
    say("nested: innermost after the FIN %d events %#x", n, n > 0 ? ev[0].events : 0);
    say("nested: EOF %zd", read(s, b, sizeof b));
    close(c);
    close(s);
    close(e1);
    close(e2);
    close(e3);
}

struct sleeper {
    int fd;
    short revents;
    int n;
};

static void *poll_on(void *arg) {
    struct sleeper *z = arg;
    struct pollfd p = {.fd = z->fd, .events = POLLIN};
    z->n = poll(&p, 1, 3000);
    z->revents = p.revents;
    return NULL;
}

static void closed_under_poll(void) {
    int c, s;
    local_pair(&c, &s);
    int keep = dup(s);
    struct sleeper z = {.fd = s};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, poll_on, &z) == 0, "thread");
    msleep(200);
    close(s);
    write_all(c, "w", 1);
    pthread_join(t, NULL);
    say("closed under poll: %d, POLLNVAL %d POLLIN %d", z.n, !!(z.revents & POLLNVAL), !!(z.revents & POLLIN));
    char b[4];
    say("closed under poll: the dup reads %zd", read(keep, b, sizeof b));
    close(keep);
    close(c);
}

struct waiter {
    int ep;
    int n;
    uint32_t data;
};

static void *wait_on(void *arg) {
    struct waiter *w = arg;
    struct epoll_event ev;
    w->n = wait_ms(w->ep, &ev, 1, 3000);
    w->data = w->n > 0 ? ev.data.u32 : 0;
    return NULL;
}

/* Another thread adds (or re-arms) a connection while one waits: the waiter wakes for it. */
static void added_while_waiting(void) {
    for (int pending = 0; pending < 3; pending++) {
        int c, s;
        local_pair(&c, &s);
        struct waiter w = {.ep = epoll_create1(0)};
        struct epoll_event e = {.events = pending == 2 ? 0 : EPOLLIN, .data.u32 = 5};
        if (pending == 2) CHECK(epoll_ctl(w.ep, EPOLL_CTL_ADD, s, &e) == 0, "add, no events");
        if (pending) write_all(c, "p", 1);
        pthread_t t;
        CHECK(pthread_create(&t, NULL, wait_on, &w) == 0, "thread");
        msleep(150);
        e.events = EPOLLIN;
        CHECK(epoll_ctl(w.ep, pending == 2 ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, s, &e) == 0, "ctl");
        if (!pending) {
            msleep(150);
            write_all(c, "q", 1);
        }
        pthread_join(t, NULL);
        const char *what[] = {"added, data after", "added with data pending", "re-armed with data pending"};
        say("while waiting: %s: %d event(s), data %u", what[pending], w.n, w.data);
        close(c);
        close(s);
        close(w.ep);
    }
}

int main(void) {
    added_while_waiting();
    lifetime();
    turns();
    nested_fin();
    closed_under_poll();
    say("done");
    return 0;
}
