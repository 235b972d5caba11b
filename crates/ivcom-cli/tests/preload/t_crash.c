/* A peer killed with SIGKILL: everything it wrote before dying arrives, then EOF; a writer
 * whose reader was killed gets EPIPE or ECONNRESET instead of blocking; a peer killed with
 * our data unread resets the connection (ECONNRESET, not EOF), as its kernel would. */
#include "common.h"

#define SENT (2u << 20)

static void client(int port) {
    signal(SIGPIPE, SIG_IGN);
    int s = connect_to(0, port, 0);
    unsigned char *b = malloc(SENT);
    fill(b, SENT, 3);
    write_all(s, b, SENT);
    /* Second connection: write until the killed reader makes writes fail. */
    int t = connect_to(0, port, 0);
    static unsigned char chunk[65536];
    size_t total = 0;
    int e = 0;
    while (total < (256u << 20)) {
        ssize_t w = write(t, chunk, sizeof chunk);
        if (w < 0) {
            e = errno;
            break;
        }
        total += (size_t)w;
    }
    say("client: writes to a killed reader fail with EPIPE or ECONNRESET %d", e == EPIPE || e == ECONNRESET);
    close(t);
    raise(SIGKILL);
}

static void server(int l) {
    int c = accept_one(l);
    unsigned char *b = malloc(SENT);
    read_exact(c, b, SENT);
    unsigned char *w = malloc(SENT);
    fill(w, SENT, 3);
    say("server: %u bytes from the peer intact %d", SENT, memcmp(b, w, SENT) == 0);
    int t = accept_one(l);
    pid_t v = fork();
    CHECK(v >= 0, "fork");
    if (v == 0) {
        static unsigned char x[100000];
        read_exact(t, x, sizeof x);
        raise(SIGKILL);
    }
    close(t);
    int st;
    waitpid(v, &st, 0);
    say("server: reader killed %d", WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
    char ch;
    ssize_t r = read(c, &ch, 1);
    say("server: after the peer was killed: read %zd", r);
    close(c);
}

/* A connection whose other end (a forked process that accepted it) was killed while the
 * bytes we wrote to it were unread. */
static int killed_with_our_data_unread(void) {
    int port, st;
    int l = listen_any(0, &port);
    int go[2];
    CHECK(pipe(go) == 0, "pipe");
    fflush(stdout);
    pid_t pid = fork();
    CHECK(pid >= 0, "fork");
    if (pid == 0) {
        int c = accept_one(l);
        char x;
        write_all(c, "!", 1);
        read_exact(go[0], &x, 1); /* our peer wrote: die without reading it */
        raise(SIGKILL);
    }
    int s = connect_to(0, port, 0); /* while this process holds the listener it announced */
    close(l);
    char ch;
    read_exact(s, &ch, 1);
    static char unread[1000];
    write_all(s, unread, sizeof unread);
    write_all(go[1], "x", 1);
    waitpid(pid, &st, 0);
    close(go[0]);
    close(go[1]);
    msleep(50);
    return s;
}

int main(void) {
    int port;
    int l = listen_any(0, &port);
    fflush(stdout);
    pid_t pid = fork();
    CHECK(pid >= 0, "fork");
    if (pid == 0) {
        close(l);
        client(port);
        _exit(0);
    }
    server(l);
    close(l);
    int st;
    waitpid(pid, &st, 0);
    say("client killed %d", WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);

    /* A reader killed with our data unread: the reset is reported once, by whichever call
     * asks first (a read, or SO_ERROR); then reads see EOF, writes EPIPE, poll POLLHUP
     * without POLLERR, as the kernel's pending socket error works. */
    for (int first_so_error = 0; first_so_error < 2; first_so_error++) {
        int s = killed_with_our_data_unread();
        char ch;
        if (first_so_error) {
            int e = -1;
            socklen_t el = sizeof e;
            CHECK(getsockopt(s, SOL_SOCKET, SO_ERROR, &e, &el) == 0, "getsockopt");
            say("killed reader, SO_ERROR first: ECONNRESET %d", e == ECONNRESET);
            el = sizeof e;
            CHECK(getsockopt(s, SOL_SOCKET, SO_ERROR, &e, &el) == 0, "getsockopt");
            say("killed reader: SO_ERROR again %d", e);
        } else {
            errno = 0;
            ssize_t r = read(s, &ch, 1);
            say("reader killed with our data unread: read %zd ECONNRESET %d", r, errno == ECONNRESET);
        }
        say("killed reader %d: then read %zd", first_so_error, read(s, &ch, 1));
        struct pollfd p = {.fd = s, .events = POLLIN | POLLOUT};
        CHECK(poll(&p, 1, 0) == 1, "poll");
        say("killed reader %d: poll IN %d OUT %d HUP %d ERR %d", first_so_error, !!(p.revents & POLLIN),
            !!(p.revents & POLLOUT), !!(p.revents & POLLHUP), !!(p.revents & POLLERR));
        errno = 0;
        ssize_t w = send(s, "x", 1, MSG_NOSIGNAL);
        say("killed reader %d: then write %zd EPIPE %d", first_so_error, w, errno == EPIPE);
        close(s);
    }
    /* A server woken by the peer's byte reads it and closes: the peer sees EOF (no reset for
     * a wakeup byte the server never saw). */
    {
        int c, s;
        local_pair(&c, &s);
        fflush(stdout);
        pid_t k = fork();
        CHECK(k >= 0, "fork");
        if (k == 0) {
            close(s);
            msleep(100);
            write_all(c, "q", 1);
            char x;
            errno = 0;
            ssize_t r = read(c, &x, 1);
            say("client after the server read and closed: read %zd ECONNRESET %d", r, errno == ECONNRESET);
            _exit(0);
        }
        close(c);
        struct pollfd p = {.fd = s, .events = POLLIN};
        CHECK(poll(&p, 1, 5000) == 1, "poll");
        char x;
        CHECK(read(s, &x, 1) == 1, "read");
        close(s);
        int st;
        waitpid(k, &st, 0);
    }
    say("done");
    return 0;
}
