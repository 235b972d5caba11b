/* Two processes (pre-fork workers) blocked in read on one connection at the same time:
 * every byte the peer sends reaches exactly one of them, none is lost or read twice, and
 * the parent then reads only what was sent after. */
#include "common.h"

#define BYTES 30

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
    close(c);
    close(s);
    return 0;
}
