/* pthread_cancel of a thread blocked in a read, a poll, a MSG_WAITALL receive or a write to
 * a full connection: the thread ends (its cleanup handler runs), the process goes on, and
 * the connection still carries data both ways. Also: a write blocked on a full connection
 * returns when another thread shuts the connection down for writing, and the peer reads
 * exactly the bytes it reported. */
#include "common.h"
#include <pthread.h>

struct job {
    int fd;
    int mode;
};

static volatile int cleaned;
static void cleanup(void *arg) {
    (void)arg;
    cleaned++;
}

static void *blocked(void *arg) {
    struct job *j = arg;
    static char big[1 << 16];
    pthread_cleanup_push(cleanup, NULL);
    char b[64];
    struct pollfd p = {.fd = j->fd, .events = POLLIN};
    switch (j->mode) {
    case 0: read(j->fd, b, sizeof b); break;
    case 1: poll(&p, 1, -1); break;
    case 2: recv(j->fd, b, sizeof b, MSG_WAITALL); break;
    default:
        for (;;) write(j->fd, big, sizeof big);
    }
    pthread_cleanup_pop(0);
    return NULL;
}

struct big_write {
    int fd;
    ssize_t total;
    int err;
};

static void *write_until_stopped(void *arg) {
    struct big_write *w = arg;
    static char buf[1 << 16];
    for (;;) {
        ssize_t r = write(w->fd, buf, sizeof buf);
        if (r < 0) {
            w->err = errno;
            return NULL;
        }
        w->total += r;
    }
}

static void shutdown_unblocks_writer(void) {
    int c, s;
    local_pair(&c, &s);
    signal(SIGPIPE, SIG_IGN);
    struct big_write w = {.fd = c};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, write_until_stopped, &w) == 0, "thread");
    msleep(300);
    CHECK(shutdown(c, SHUT_WR) == 0, "shutdown");
    pthread_join(t, NULL);
    static char sink[1 << 16];
    long got = 0;
    ssize_t r;
    while ((r = read(s, sink, sizeof sink)) > 0) got += r;
    say("writer stopped by shutdown: EPIPE %d, peer read exactly what was written %d, then EOF %d",
        w.err == EPIPE, got == w.total, r == 0);
    close(c);
    close(s);
}

int main(void) {
    shutdown_unblocks_writer();
    const char *what[] = {"read", "poll", "recv(MSG_WAITALL)", "write to a full connection"};
    for (int mode = 0; mode < 4; mode++) {
        int c, s;
        local_pair(&c, &s);
        struct job j = {.fd = mode == 3 ? c : s, .mode = mode};
        pthread_t t;
        CHECK(pthread_create(&t, NULL, blocked, &j) == 0, "thread");
        msleep(200);
        CHECK(pthread_cancel(t) == 0, "cancel");
        void *res;
        CHECK(pthread_join(t, &res) == 0, "join");
        say("%s: cancelled %d", what[mode], res == PTHREAD_CANCELED);
        if (mode == 3) {
            /* Drain what the cancelled writer left, then check both directions. */
            int fl = fcntl(s, F_GETFL);
            fcntl(s, F_SETFL, fl | O_NONBLOCK);
            static char sink[1 << 16];
            while (read(s, sink, sizeof sink) > 0) {
            }
            fcntl(s, F_SETFL, fl);
        }
        char b[4];
        write_all(c, "ab", 2);
        read_exact(s, b, 2);
        write_all(s, "cd", 2);
        read_exact(c, b + 2, 2);
        say("%s: the connection still works '%.4s'", what[mode], b);
        close(c);
        close(s);
    }
    say("cleanup handlers ran %d", cleaned);
    return 0;
}
