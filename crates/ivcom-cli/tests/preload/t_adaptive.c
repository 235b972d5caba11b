/* Waiting that adapts to load: a client whose server answers only after 3 ms (longer than
 * the polling budget) must not poll away its CPU on every wait; once the server answers at
 * once again, every answer still arrives intact. The check is CPU time, which a waiting
 * thread spends only by polling: 60 waits with the default budget of 100 us would poll for
 * 6 ms; with the budget adapted to the long waits they cost far less (under 3 ms). */
#include "common.h"
#include <pthread.h>

#define SLOW 60
#define QUICK 2000

static int srv;

static void *server(void *arg) {
    (void)arg;
    char b;
    for (int i = 0; i < SLOW + QUICK; i++) {
        read_exact(srv, &b, 1);
        if (i < SLOW) msleep(3);
        b = (char)(b + 1);
        write_all(srv, &b, 1);
    }
    return NULL;
}

int main(void) {
    int c;
    local_pair(&c, &srv);
    pthread_t t;
    CHECK(pthread_create(&t, NULL, server, NULL) == 0, "thread");
    int bad = 0;
    double cpu0 = thread_cpu_ms();
    for (int i = 0; i < SLOW; i++) {
        char b = (char)i, r;
        write_all(c, &b, 1);
        read_exact(c, &r, 1);
        bad += r != (char)(b + 1);
    }
    double slow_cpu = thread_cpu_ms() - cpu0;
    say("slow answers: %d exchanged, %d wrong, waiting cost little CPU: %s", SLOW, bad,
        slow_cpu < 3.0 ? "yes" : "no");
    bad = 0;
    for (int i = 0; i < QUICK; i++) {
        char b = (char)i, r;
        write_all(c, &b, 1);
        read_exact(c, &r, 1);
        bad += r != (char)(b + 1);
    }
    say("quick answers: %d exchanged, %d wrong", QUICK, bad);
    pthread_join(t, NULL);
    close(c);
    close(srv);
    say("done");
    return 0;
}
