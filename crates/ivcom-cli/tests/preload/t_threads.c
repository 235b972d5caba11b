/* Threads: four connections used by four threads at once, and one connection with a reading
 * thread and a writing thread at the same time (full duplex), every byte checked. */
#include "common.h"
#include <pthread.h>

#define T 4
#define ROUNDS 2000
#define DUPLEX (8u << 20)

static int g_port;

static void *rr_client(void *arg) {
    int id = (int)(intptr_t)arg;
    int s = connect_to(0, g_port, 0);
    char q[64], a[64];
    for (int i = 0; i < ROUNDS; i++) {
        int n = snprintf(q, sizeof q, "%d:%d;", id, i);
        write_all(s, q, (size_t)n);
        read_exact(s, a, (size_t)n);
        CHECK(memcmp(q, a, (size_t)n) == 0, "echo");
    }
    close(s);
    return NULL;
}

static void *rr_server(void *arg) {
    int c = (int)(intptr_t)arg;
    char b[256];
    for (;;) {
        ssize_t n = read(c, b, sizeof b);
        if (n == 0) break;
        CHECK(n > 0, "read");
        write_all(c, b, (size_t)n);
    }
    close(c);
    return NULL;
}

struct half {
    int fd;
    uint64_t sum;
};

static void *writer(void *arg) {
    struct half *h = arg;
    unsigned char *b = malloc(DUPLEX);
    fill(b, DUPLEX, (uint32_t)h->fd);
    for (size_t off = 0; off < DUPLEX; off += 4096) write_all(h->fd, b + off, 4096);
    h->sum = fnv(b, DUPLEX, 0);
    free(b);
    return NULL;
}

static void *reader(void *arg) {
    struct half *h = arg;
    unsigned char b[8192];
    size_t got = 0;
    uint64_t sum = 0;
    while (got < DUPLEX) {
        ssize_t n = read(h->fd, b, sizeof b < DUPLEX - got ? sizeof b : DUPLEX - got);
        CHECK(n > 0, "duplex read");
        sum = fnv(b, (size_t)n, sum);
        got += (size_t)n;
    }
    h->sum = sum;
    return NULL;
}

static void client(int port) {
    g_port = port;
    pthread_t t[T];
    for (int i = 0; i < T; i++) pthread_create(&t[i], NULL, rr_client, (void *)(intptr_t)i);
    for (int i = 0; i < T; i++) pthread_join(t[i], NULL);
    int s = connect_to(0, port, 0);
    struct half w = {s, 0}, r = {s, 0};
    pthread_t tw, tr;
    pthread_create(&tw, NULL, writer, &w);
    pthread_create(&tr, NULL, reader, &r);
    pthread_join(tw, NULL);
    pthread_join(tr, NULL);
    /* The server sent its own stream, seeded with its descriptor number, which it tells. */
    write_all(s, &w.sum, 8);
    uint64_t theirs;
    read_exact(s, &theirs, 8);
    say("client: full-duplex stream from the server intact %d", theirs == r.sum);
    close(s);
}

static void server(int l) {
    pthread_t t[T];
    for (int i = 0; i < T; i++) {
        int c = accept_one(l);
        pthread_create(&t[i], NULL, rr_server, (void *)(intptr_t)c);
    }
    for (int i = 0; i < T; i++) pthread_join(t[i], NULL);
    say("server: %d threads x %d request/response rounds at once", T, ROUNDS);
    int c = accept_one(l);
    struct half w = {c, 0}, r = {c, 0};
    pthread_t tw, tr;
    pthread_create(&tw, NULL, writer, &w);
    pthread_create(&tr, NULL, reader, &r);
    pthread_join(tw, NULL);
    pthread_join(tr, NULL);
    uint64_t theirs;
    read_exact(c, &theirs, 8);
    say("server: full-duplex stream from the client intact %d", theirs == r.sum);
    write_all(c, &w.sum, 8);
    close(c);
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    pair(0, server, client);
    say("done");
    return 0;
}
