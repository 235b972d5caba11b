/* Two processes (pre-fork workers) blocked in read on one connection at the same time:
 * every byte the peer sends reaches exactly one of them, none is lost or read twice, and
 * the parent then reads only what was sent after. A read on a connection a forked child
 * holds too is restarted after a handler with SA_RESTART, as the kernel restarts it. */
#include "common.h"

#define BYTES 30

static volatile sig_atomic_t alarms;
static void on_alarm(int sig) {
    (void)sig;
    alarms++;
}

int main(void) {
    int c, s;
    local_pair(&c, &s);
    int out[2];
    CHECK(pipe(out) == 0, "pipe");
    fflush(stdout);
    pid_t kid[2];
    for (int k = 0; k < 2; k++) {
        kid[k] = fork();
        CHECK(kid[k] >= 0, "fork");
        if (kid[k] == 0) {
            close(out[0]);
            char b;
            while (read(s, &b, 1) == 1) {
                write_all(out[1], &b, 1);
                if (b == '.') break;
            }
            _exit(0);
        }
    }
    close(out[1]);
    msleep(100);
    for (int i = 0; i < BYTES; i++) {
        char b = (char)('A' + i);
        write_all(c, &b, 1);
        msleep(10);
    }
    write_all(c, "..", 2); /* one stop byte for each worker, in one write */
    int count[256] = {0}, total = 0;
    char b;
    while (total < BYTES + 2) {
        struct pollfd p = {.fd = out[0], .events = POLLIN};
        if (poll(&p, 1, 5000) != 1 || read(out[0], &b, 1) != 1) break;
        count[(unsigned char)b]++;
        total++;
    }
    int once = 1;
    for (int i = 0; i < BYTES; i++) once &= count['A' + i] == 1;
    say("two readers: %d bytes, each read exactly once %d, stop bytes %d", total, once, count['.']);
    for (int k = 0; k < 2; k++) {
        int st;
        CHECK(waitpid(kid[k], &st, 0) == kid[k], "waitpid");
    }
    write_all(c, "!", 1);
    char r[8];
    say("parent then reads %zd", read(s, r, sizeof r));
    struct sigaction sa = {0};
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    CHECK(sigaction(SIGALRM, &sa, NULL) == 0, "sigaction");
    fflush(stdout);
    pid_t w = fork();
    CHECK(w >= 0, "fork");
    if (w == 0) {
        msleep(300);
        write_all(c, "late", 4);
        _exit(0);
    }
    alarm(1);
    ualarm(100000, 0);
    ssize_t got = read(s, r, 4);
    say("read across SA_RESTART handler: %zd '%.4s', handler ran %d", got, got > 0 ? r : "", alarms);
    alarm(0);
    waitpid(w, NULL, 0);
    close(c);
    close(s);
    return 0;
}
