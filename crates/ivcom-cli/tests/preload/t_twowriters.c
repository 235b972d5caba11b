/* Two processes writing one connection at the same instant (a parent and its forked child,
 * each with its own copy of the descriptor): every byte each wrote arrives once, in the
 * order that process wrote it. Each write is one byte, which TCP never splits (a longer
 * write may be interleaved with another process's when the socket buffer fills); the two
 * writers use disjoint byte values so the reader can tell them apart. */
#include "common.h"

#define WRITES 100000

/* Writer w's i-th byte: 1..127 for the parent, 129..255 for the child. */
static unsigned char byte_of(int w, int i) {
    return (unsigned char)(w * 128 + 1 + i % 127);
}

static void writer(int s, int w) {
    for (int i = 0; i < WRITES; i++) {
        unsigned char b = byte_of(w, i);
        write_all(s, &b, 1);
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
        writer(s, 1);
        _exit(0);
    }
    writer(s, 0);
    int st;
    waitpid(pid, &st, 0);
    close(s);
}

static void server(int l) {
    int c = accept_one(l);
    write_all(c, "g", 1);
    int next[2] = {0, 0}, bad = 0;
    static unsigned char buf[65536];
    for (;;) {
        ssize_t n = read(c, buf, sizeof buf);
        CHECK(n >= 0, "read");
        if (n == 0) break;
        for (ssize_t k = 0; k < n; k++) {
            int w = buf[k] >= 128;
            if (next[w] >= WRITES || buf[k] != byte_of(w, next[w])) bad++;
            next[w]++;
        }
    }
    say("server: %d bytes from each writer, each once and in its order: %d", WRITES,
        bad == 0 && next[0] == WRITES && next[1] == WRITES);
    close(c);
}

int main(void) {
    pair(0, server, client);
    return 0;
}
