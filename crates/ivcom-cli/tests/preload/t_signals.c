/* EPIPE and SIGPIPE as TCP gives them: after our own shutdown, after the peer closed (the
 * first write goes out, a later one fails), MSG_NOSIGNAL; and a peer that closes with
 * unread data resets the connection. */
#include "common.h"

static volatile sig_atomic_t pipes;
static void on_pipe(int sig) {
    (void)sig;
    pipes++;
}

static void client(int port) {
    signal(SIGPIPE, on_pipe);
    /* (a) our own shutdown. */
    int s = connect_to(0, port, 0);
    CHECK(shutdown(s, SHUT_WR) == 0, "shutdown");
    errno = 0;
    ssize_t r = write(s, "x", 1);
    say("client: write after shutdown: %zd EPIPE %d, SIGPIPE count %d", r, errno == EPIPE, (int)pipes);
    errno = 0;
    r = send(s, "x", 1, MSG_NOSIGNAL);
    say("client: send MSG_NOSIGNAL after shutdown: %zd EPIPE %d, SIGPIPE count %d", r, errno == EPIPE, (int)pipes);
    char b[8];
    CHECK(read(s, b, 1) == 0, "EOF");
    close(s);
    /* (b) the peer closed after reading everything. */
    s = connect_to(0, port, 0);
    write_all(s, "hi", 2);
    CHECK(read(s, b, 1) == 0, "EOF");
    msleep(50);
    errno = 0;
    r = write(s, "one", 3);
    say("client: first write after the peer closed: %zd", r);
    msleep(100);
    errno = 0;
    r = write(s, "two", 3);
    int e = errno;
    say("client: later write: %zd, EPIPE or ECONNRESET %d, SIGPIPE count %d", r, e == EPIPE || e == ECONNRESET, (int)pipes);
    close(s);
    /* (c) the peer closes with our data unread. */
    s = connect_to(0, port, 0);
    write_all(s, "unread", 6);
    read_exact(s, b, 1);
    msleep(100);
    errno = 0;
    r = read(s, b, 1);
    say("client: peer closed with unread data: read %zd ECONNRESET %d", r, errno == ECONNRESET);
    close(s);
}

static void server(int l) {
    int c = accept_one(l);
    char b[8];
    CHECK(read(c, b, 1) == 0, "EOF from shutdown");
    close(c);
    c = accept_one(l);
    read_exact(c, b, 2);
    close(c);
    c = accept_one(l);
    /* Wait for the data, then close without reading it. */
    struct pollfd p = {c, POLLIN, 0};
    CHECK(poll(&p, 1, 5000) == 1, "poll");
    write_all(c, "k", 1);
    msleep(20);
    close(c);
    say("server: done");
}

int main(void) {
    pair(0, server, client);
    say("done");
    return 0;
}
