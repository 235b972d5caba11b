/* poll, ppoll, select and pselect on connections: nothing before data, readable after,
 * timeouts, a sleeper woken by data that comes later, POLLRDHUP/POLLHUP at the end. */
#include "common.h"
#include <sys/select.h>

static void client(int port) {
    int s = connect_to(0, port, 0);
    char go;
    read_exact(s, &go, 1); /* the server is ready for the first round */
    msleep(100);
    write_all(s, "1", 1); /* wakes a blocked poll */
    read_exact(s, &go, 1);
    msleep(100);
    write_all(s, "2", 1); /* wakes a blocked ppoll */
    read_exact(s, &go, 1);
    msleep(100);
    write_all(s, "3", 1); /* wakes a blocked select */
    read_exact(s, &go, 1);
    msleep(100);
    write_all(s, "4", 1); /* wakes a blocked pselect */
    read_exact(s, &go, 1);
    CHECK(shutdown(s, SHUT_WR) == 0, "shutdown");
    CHECK(read(s, &go, 1) == 0, "EOF from the server");
    close(s);
}

static void server(int l) {
    int c = accept_one(l);
    struct pollfd p = {c, POLLIN | POLLOUT | POLLRDHUP, 0};
    CHECK(poll(&p, 1, 0) == 1, "poll");
    say("server: idle: writable %d, readable %d", (p.revents & POLLOUT) != 0, (p.revents & POLLIN) != 0);
    p.events = POLLIN;
    double t0 = now_ms();
    CHECK(poll(&p, 1, 60) == 0, "poll timeout");
    say("server: poll timed out after at least 50 ms %d", now_ms() - t0 >= 50);
    char b;
    write_all(c, "g", 1);
    CHECK(poll(&p, 1, 10000) == 1 && (p.revents & POLLIN), "poll wake");
    read_exact(c, &b, 1);
    say("server: poll woken by data %c", b);

    write_all(c, "g", 1);
    struct timespec ts = {10, 0};
    sigset_t mask;
    sigemptyset(&mask);
    CHECK(ppoll(&p, 1, &ts, &mask) == 1 && (p.revents & POLLIN), "ppoll wake");
    read_exact(c, &b, 1);
    say("server: ppoll woken by data %c", b);

    fd_set r, w;
    FD_ZERO(&r);
    FD_SET(c, &r);
    struct timeval tv = {0, 50000};
    CHECK(select(c + 1, &r, NULL, NULL, &tv) == 0, "select timeout");
    say("server: select timed out, set cleared %d", !FD_ISSET(c, &r));
    write_all(c, "g", 1);
    FD_ZERO(&r);
    FD_SET(c, &r);
    FD_ZERO(&w);
    FD_SET(c, &w);
    CHECK(select(c + 1, &r, &w, NULL, NULL) >= 1, "select");
    say("server: select sees writable %d", FD_ISSET(c, &w));
    FD_ZERO(&r);
    FD_SET(c, &r);
    CHECK(select(c + 1, &r, NULL, NULL, NULL) == 1 && FD_ISSET(c, &r), "select wake");
    read_exact(c, &b, 1);
    say("server: select woken by data %c", b);

    write_all(c, "g", 1);
    FD_ZERO(&r);
    FD_SET(c, &r);
    struct timespec ts2 = {10, 0};
    CHECK(pselect(c + 1, &r, NULL, NULL, &ts2, &mask) == 1 && FD_ISSET(c, &r), "pselect wake");
    read_exact(c, &b, 1);
    say("server: pselect woken by data %c", b);

    write_all(c, "g", 1);
    p.events = POLLIN | POLLRDHUP;
    CHECK(poll(&p, 1, 10000) == 1, "poll for hangup");
    say("server: after the peer's shutdown: POLLIN %d POLLRDHUP %d POLLHUP %d", (p.revents & POLLIN) != 0, (p.revents & POLLRDHUP) != 0, (p.revents & POLLHUP) != 0);
    CHECK(read(c, &b, 1) == 0, "EOF");
    CHECK(shutdown(c, SHUT_WR) == 0, "shutdown");
    p.events = POLLIN | POLLOUT;
    CHECK(poll(&p, 1, 1000) >= 1, "poll after both shut");
    say("server: both directions shut: POLLHUP %d", (p.revents & POLLHUP) != 0);
    close(c);
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    pair(0, server, client);
    say("done");
    return 0;
}
