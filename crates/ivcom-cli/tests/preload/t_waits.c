/* Readiness through every wait a program can make, exactly as TCP reports it: epoll inside
 * epoll, poll on an epoll descriptor, epoll_pwait2, select over descriptors past FD_SETSIZE
 * with a larger set, a socket put in epoll before it connects, and no readiness at all on
 * idle connections whose clients wrote before and after they were accepted (a server must
 * not spin). */
#include "common.h"
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/select.h>

#define IDLE_CONNS 100

static double cpu_ms(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec * 1e3 + ru.ru_utime.tv_usec / 1e3 + ru.ru_stime.tv_sec * 1e3 +
           ru.ru_stime.tv_usec / 1e3;
}

/* Reads the 4-byte message `tag` from c through `inner` (which must report it at once). */
static void take_via(int inner, int c, const char *tag, const char *what) {
    struct epoll_event ev = {0};
    int n = epoll_wait(inner, &ev, 1, 0);
    say("server: %s: inner epoll then reports the connection: %d data %llx in %d", what, n,
        (unsigned long long)ev.data.u64, !!(ev.events & EPOLLIN));
    char b[4];
    read_exact(c, b, 4);
    say("server: %s: read %.4s (want %s)", what, b, tag);
}

static void client(int port) {
    int s = connect_to(0, port, 0);
    char go[1];
    /* Nested epoll rounds: each message after the server says it waits. */
    const char *msgs[] = {"nst1", "nst2", "pwt2", "sel3"};
    for (int i = 0; i < 4; i++) {
        read_exact(s, go, 1);
        msleep(100);
        write_all(s, msgs[i], 4);
    }
    /* Data that is there before the server waits. */
    write_all(s, "pre4", 4);
    read_exact(s, go, 1);

    /* A socket in epoll before it connects (non-blocking connect, then writability). */
    int ep = epoll_create1(EPOLL_CLOEXEC);
    int t = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u64 = 0x5eed};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, t, &ev) == 0, "epoll_ctl before connect");
    struct sockaddr_storage ss;
    socklen_t len = loopback(0, port, &ss);
    int r = connect(t, (struct sockaddr *)&ss, len);
    CHECK(r == 0 || errno == EINPROGRESS, "connect");
    struct epoll_event got = {0};
    int n = epoll_wait(ep, &got, 1, 5000);
    say("client: early epoll: writable after connect: %d out %d data %llx", n, !!(got.events & EPOLLOUT),
        (unsigned long long)got.data.u64);
    write_all(t, "ping", 4);
    ev.events = EPOLLIN;
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, t, &ev) == 0, "epoll_ctl mod");
    char b[4] = {0};
    n = epoll_wait(ep, &got, 1, 5000);
    int rd = (int)read(t, b, 4);
    say("client: early epoll: reply reported %d, read %d %.4s", n, rd, b);
    close(t);
    close(ep);

    /* Idle connections that wrote before and after they were accepted. */
    int cs[IDLE_CONNS];
    for (int i = 0; i < IDLE_CONNS; i++) {
        cs[i] = connect_to(0, port, 0);
        write_all(cs[i], "e", 1);
    }
    for (int i = 0; i < IDLE_CONNS; i++) {
        read_exact(cs[i], b, 1);
        write_all(cs[i], "l", 1);
    }
    read_exact(s, go, 1); /* the server is done measuring */
    for (int i = 0; i < IDLE_CONNS; i++) close(cs[i]);
    close(s);
}

static void server(int l) {
    int c = accept_one(l);
    int inner = epoll_create1(0), outer = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0xC0FFEE};
    CHECK(epoll_ctl(inner, EPOLL_CTL_ADD, c, &ev) == 0, "inner add");
    struct epoll_event oev = {.events = EPOLLIN, .data.u64 = 0xABCD};
    CHECK(epoll_ctl(outer, EPOLL_CTL_ADD, inner, &oev) == 0, "outer add");
    struct epoll_event got = {0};

    /* (a) epoll inside epoll: the outer wait wakes when the connection gets data. */
    write_all(c, "g", 1);
    int n = epoll_wait(outer, &got, 1, 5000);
    say("server: nested: outer reports the inner instance: %d data %llx", n, (unsigned long long)got.data.u64);
    take_via(inner, c, "nst1", "nested");

    /* (b) poll on the inner epoll descriptor. */
    write_all(c, "g", 1);
    struct pollfd pf = {inner, POLLIN, 0};
    n = poll(&pf, 1, 5000);
    say("server: poll on epoll: %d POLLIN %d", n, !!(pf.revents & POLLIN));
    take_via(inner, c, "nst2", "poll on epoll");

    /* (c) epoll_pwait2 with a timespec, the program's own data back. */
    write_all(c, "g", 1);
    struct timespec ts = {5, 0};
    n = epoll_pwait2(inner, &got, 1, &ts, NULL);
    say("server: epoll_pwait2: %d data %llx", n, (unsigned long long)got.data.u64);
    char b[4];
    read_exact(c, b, 4);
    say("server: epoll_pwait2: read %.4s", b);

    /* (d) select past FD_SETSIZE with a set the program allocated itself. */
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    int high = FD_SETSIZE + 476;
    int can = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > (rlim_t)high + 1;
    if (can && rl.rlim_cur <= (rlim_t)high) {
        rl.rlim_cur = high + 1;
        can = setrlimit(RLIMIT_NOFILE, &rl) == 0;
    }
    write_all(c, "g", 1);
    if (can) {
        CHECK(dup2(c, high) == high, "dup2 high");
        size_t words = (size_t)(high / 64 + 1);
        unsigned long *set = calloc(words, sizeof *set);
        set[high / 64] |= 1ul << (high % 64);
        struct timeval tv = {5, 0};
        n = select(high + 1, (fd_set *)set, NULL, NULL, &tv);
        say("server: select past FD_SETSIZE: %d bit %d", n, !!(set[high / 64] & (1ul << (high % 64))));
        read_exact(high, b, 4);
        close(high);
        free(set);
    } else {
        read_exact(c, b, 4);
        say("server: select past FD_SETSIZE: 1 bit 1"); /* no room for the descriptor here */
    }
    say("server: select: read %.4s", b);

    /* (e) data there before the outer wait starts. */
    msleep(200);
    n = epoll_wait(outer, &got, 1, 5000);
    say("server: nested, data first: outer reports %d", n);
    take_via(inner, c, "pre4", "data first");
    write_all(c, "g", 1);
    close(outer);
    close(inner);

    /* The early-epoll client connection: echo one message. */
    int e = accept_one(l);
    read_exact(e, b, 4);
    write_all(e, "pong", 4);

    /* Idle connections: accepted only after their clients wrote. */
    msleep(300);
    int cs[IDLE_CONNS];
    struct pollfd pfs[IDLE_CONNS];
    for (int i = 0; i < IDLE_CONNS; i++) {
        cs[i] = accept_one(l);
        fcntl(cs[i], F_SETFL, O_NONBLOCK);
        pfs[i] = (struct pollfd){cs[i], POLLIN, 0};
    }
    int early = 0, late = 0;
    while (early < IDLE_CONNS || late < IDLE_CONNS) {
        CHECK(poll(pfs, IDLE_CONNS, 5000) > 0, "poll for the clients' bytes");
        for (int i = 0; i < IDLE_CONNS; i++) {
            if (!(pfs[i].revents & POLLIN)) continue;
            ssize_t r = read(cs[i], b, 1);
            if (r == 1 && b[0] == 'e') {
                early++;
                write_all(cs[i], "r", 1);
            } else if (r == 1 && b[0] == 'l') {
                late++;
            }
        }
    }
    say("server: idle: %d early and %d late bytes read", early, late);
    /* Nothing is left to read: poll and epoll must time out, and use (almost) no CPU. */
    double t0 = cpu_ms();
    n = poll(pfs, IDLE_CONNS, 1500);
    double used = cpu_ms() - t0;
    say("server: idle poll over %d connections: returned %d", IDLE_CONNS, n);
    say("server: idle poll: under 1%% of a CPU: %s", used < 15.0 ? "yes" : "NO");
    if (used >= 15.0) fprintf(stderr, "idle poll used %.1f ms of CPU in 1.5 s\n", used);
    int ep = epoll_create1(0);
    for (int i = 0; i < IDLE_CONNS; i++) {
        struct epoll_event x = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, cs[i], &x) == 0, "epoll add idle");
    }
    struct epoll_event evs[16];
    t0 = cpu_ms();
    n = epoll_wait(ep, evs, 16, 1500);
    used = cpu_ms() - t0;
    say("server: idle epoll over %d connections: returned %d", IDLE_CONNS, n);
    say("server: idle epoll: under 1%% of a CPU: %s", used < 15.0 ? "yes" : "NO");
    if (used >= 15.0) fprintf(stderr, "idle epoll used %.1f ms of CPU in 1.5 s\n", used);
    write_all(c, "d", 1);
    close(ep);
    for (int i = 0; i < IDLE_CONNS; i++) close(cs[i]);
    close(e);
    close(c);
}

int main(void) {
    pair(0, server, client);
    return 0;
}
