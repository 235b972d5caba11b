/* A peer killed with SIGKILL: everything it wrote before dying arrives, then EOF; a writer
 * whose reader was killed gets EPIPE or ECONNRESET instead of blocking; a peer killed with
 * our data unread resets the connection (ECONNRESET, not EOF), as its kernel would; so does
 * one that closes with our data unread while we sleep in a read. */
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

/* HTTP-style abrupt close: the server reads part of what the client sent, answers, and
 * closes with the rest unread (its kernel resets the connection) while the client is
 * asleep in a blocking read: the client reads the whole answer, then ECONNRESET. */
static void unread_client(int port) {
    int s = connect_to(0, port, 0);
    write_all(s, "0123456789abcdefghijklmnopqrst", 30);
    char in[1000];
    read_exact(s, in, sizeof in);
    char x;
    ssize_t r = read(s, &x, 1);
    say("abrupt close with requests unread: whole answer, then r=%zd ECONNRESET %d", r, r < 0 && errno == ECONNRESET);
    close(s);
}

static void unread_server(int l) {
    msleep(100); /* the request is written before the connection is accepted */
    int c = accept_one(l);
    char b[10];
    read_exact(c, b, sizeof b);
    msleep(200);
    static char reply[1000];
    memset(reply, 'r', sizeof reply);
    write_all(c, reply, sizeof reply);
    msleep(150);
    close(c);
}

/* close() under SO_LINGER with a timeout waits until the peer has the data (here it starts
 * reading after 0.5 s); the peer reads all of it, then EOF. */
static void linger_client(int port) {
    int s = connect_to(0, port, 0);
    msleep(500);
    static char in[1 << 16];
    size_t got = 0;
    ssize_t r;
    while ((r = read(s, in, sizeof in)) > 0) got += (size_t)r;
    say("lingering close: the peer read %zu bytes, then EOF %d", got, r == 0);
    close(s);
}

static void linger_server(int l) {
    int c = accept_one(l);
    static char out[1 << 20];
    memset(out, 'l', sizeof out);
    write_all(c, out, sizeof out);
    struct linger lg = {1, 5};
    CHECK(setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof lg) == 0, "SO_LINGER");
    double t0 = now_ms();
    close(c);
    say("lingering close waited for the peer to read %d", now_ms() - t0 > 300);
}

/* Writes to a peer that closed: the first provokes its reset, the next fails with EPIPE;
 * poll then reports the hang-up. */
static void hangup_after_reset(void) {
    signal(SIGPIPE, SIG_IGN);
    int c, s;
    local_pair(&c, &s);
    close(s);
    msleep(30);
    ssize_t r1 = write(c, "more", 4);
    msleep(30);
    ssize_t r2 = write(c, "more", 4);
    int e2 = errno;
    struct pollfd p = {c, POLLIN | POLLOUT | POLLRDHUP, 0};
    poll(&p, 1, 0);
    say("after the reset: first write %zd, second EPIPE %d, poll POLLHUP %d POLLRDHUP %d", r1, r2 < 0 && e2 == EPIPE,
        (p.revents & POLLHUP) != 0, (p.revents & POLLRDHUP) != 0);
    close(c);
    signal(SIGPIPE, SIG_DFL);
}

int main(void) {
    pair(0, unread_server, unread_client);
    pair(0, linger_server, linger_client);
    hangup_after_reset();
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
