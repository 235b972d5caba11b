/* pthread_cancel of a thread blocked in a read, a poll, a MSG_WAITALL receive or a write to
 * a full connection: the thread ends (its cleanup handler runs), the process goes on, and
 * the connection still carries data both ways. */
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

int main(void) {
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
