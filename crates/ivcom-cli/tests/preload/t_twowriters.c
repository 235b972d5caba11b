/* Two processes writing one connection at the same instant (a parent and its forked child,
 * each with its own copy of the descriptor): each write's bytes arrive whole and in the
 * order that process wrote them, as the kernel keeps them for TCP; nothing is lost. */
#include "common.h"

#define RECORDS 100000
#define LEN 64

/* Record i of writer `tag`: the tag, the number, then filler derived from both. */
static void record(char tag, int i, unsigned char *r) {
    r[0] = (unsigned char)tag;
    memcpy(r + 1, &i, sizeof i);
    for (int k = 1 + (int)sizeof i; k < LEN; k++) r[k] = (unsigned char)(tag + i * 7 + k);
}

static void writer(int s, char tag) {
    unsigned char r[LEN];
    for (int i = 0; i < RECORDS; i++) {
        record(tag, i, r);
        write_all(s, r, LEN);
    }
}

static void client(int port) {
    int s = connect_to(0, port, 0);
    char go;
    read_exact(s, &go, 1); /* the server is ready: both start now */
    fflush(stdout);
    pid_t pid = fork();
    CHECK(pid >= 0, "fork");
    if (pid == 0) {
        writer(s, 'C');
        _exit(0);
    }
    writer(s, 'P');
    int st;
    waitpid(pid, &st, 0);
    close(s);
}

static void server(int l) {
    int c = accept_one(l);
    write_all(c, "g", 1);
    unsigned char r[LEN], want[LEN];
    int next[2] = {0, 0}, bad = 0, total = 0;
    for (;;) {
        ssize_t got = 0;
        while (got < LEN) {
            ssize_t n = read(c, r + got, LEN - (size_t)got);
            CHECK(n >= 0, "read");
            if (n == 0) break;
            got += n;
        }
        if (got == 0) break;
        CHECK(got == LEN, "a torn record at the end");
        int w = r[0] == 'P' ? 0 : r[0] == 'C' ? 1 : -1;
        int i;
        memcpy(&i, r + 1, sizeof i);
        if (w < 0 || i != next[w]) {
            bad++;
            continue;
        }
        record((char)r[0], i, want);
        bad += memcmp(r, want, LEN) != 0;
        next[w]++;
        total++;
    }
    say("server: %d records from each writer, whole and in each writer's order: %d", RECORDS,
        bad == 0 && next[0] == RECORDS && next[1] == RECORDS && total == 2 * RECORDS);
    close(c);
}

int main(void) {
    pair(0, server, client);
    return 0;
}
