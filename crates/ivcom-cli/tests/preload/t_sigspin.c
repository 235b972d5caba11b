/* Signals that arrive while a blocking call has not reached the kernel yet (the library
 * polls shared memory first: run with a long --spin-us, every signal here lands in that
 * phase): a handler without SA_RESTART ends read, poll and epoll_wait with EINTR, one with
 * SA_RESTART lets read go on; what sigaction, signal and siginterrupt read back is the
 * program's own handler and flags; SA_RESETHAND and SA_SIGINFO behave as without the
 * library; a call with a socket timeout is never restarted; a negative timeout never
 * blocks. */
#include "common.h"
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/time.h>

static volatile sig_atomic_t hits, info_ok;

static void on_sig(int sig) {
    (void)sig;
    hits++;
}

static void on_info(int sig, siginfo_t *si, void *ctx) {
    info_ok = sig == SIGUSR2 && si != NULL && si->si_signo == SIGUSR2 && ctx != NULL;
}

static void other(int sig) {
    (void)sig;
}

static void handle(int sig, void (*h)(int), int flags) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = h;
    sa.sa_flags = flags;
    CHECK(sigaction(sig, &sa, NULL) == 0, "sigaction");
}

/* One SIGALRM after `ms` milliseconds. */
static void timer_ms(int ms) {
    struct itimerval it = {{0, 0}, {ms / 1000, (ms % 1000) * 1000}};
    CHECK(setitimer(ITIMER_REAL, &it, NULL) == 0, "setitimer");
}

static int late_fd;
static void *late_writer(void *arg) {
    (void)arg;
    msleep(400);
    write_all(late_fd, "x", 1);
    return NULL;
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    int c, s;
    local_pair(&c, &s);

    handle(SIGALRM, on_sig, 0);
    struct sigaction back;
    CHECK(sigaction(SIGALRM, NULL, &back) == 0, "sigaction read back");
    say("sigaction reads back the program's handler %d, SA_SIGINFO %d, SA_RESTART %d", back.sa_handler == on_sig,
        (back.sa_flags & SA_SIGINFO) != 0, (back.sa_flags & SA_RESTART) != 0);

    char b;
    hits = 0;
    timer_ms(150);
    ssize_t r = read(c, &b, 1);
    say("read, handler without SA_RESTART: r=%zd EINTR %d, handler ran %d", r, r < 0 && errno == EINTR, hits);

    struct pollfd p = {c, POLLIN, 0};
    hits = 0;
    timer_ms(150);
    int n = poll(&p, 1, 5000);
    say("poll: n=%d EINTR %d, handler ran %d", n, n < 0 && errno == EINTR, hits);

    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = c}, out;
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev) == 0, "epoll_ctl");
    handle(SIGALRM, on_sig, SA_RESTART);
    hits = 0;
    timer_ms(150);
    n = epoll_wait(ep, &out, 1, 5000);
    say("epoll_wait, handler with SA_RESTART: n=%d EINTR %d, handler ran %d", n, n < 0 && errno == EINTR, hits);
    close(ep);

    hits = 0;
    late_fd = s;
    pthread_t t;
    CHECK(pthread_create(&t, NULL, late_writer, NULL) == 0, "pthread_create");
    timer_ms(150);
    r = read(c, &b, 1);
    pthread_join(t, NULL);
    say("read, handler with SA_RESTART: r=%zd (went on to the data), handler ran %d", r, hits);

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    CHECK(siginterrupt(SIGALRM, 1) == 0, "siginterrupt");
#pragma GCC diagnostic pop
    CHECK(sigaction(SIGALRM, NULL, &back) == 0, "read back");
    say("siginterrupt(1): same handler %d, SA_RESTART %d", back.sa_handler == on_sig, (back.sa_flags & SA_RESTART) != 0);
    hits = 0;
    timer_ms(150);
    r = read(c, &b, 1);
    say("read after siginterrupt(1): r=%zd EINTR %d, handler ran %d", r, r < 0 && errno == EINTR, hits);

    void (*was)(int) = signal(SIGUSR1, other);
    void (*now)(int) = signal(SIGUSR1, on_sig);
    say("signal returns the previous handlers: default %d, ours %d", was == SIG_DFL, now == other);
    hits = 0;
    raise(SIGUSR1);
    say("a signal() handler runs: %d", hits);

    handle(SIGUSR1, on_sig, SA_RESETHAND);
    raise(SIGUSR1);
    CHECK(sigaction(SIGUSR1, NULL, &back) == 0, "read back");
    say("SA_RESETHAND: default again after one delivery %d", back.sa_handler == SIG_DFL);

    struct sigaction si;
    memset(&si, 0, sizeof si);
    si.sa_sigaction = on_info;
    si.sa_flags = SA_SIGINFO;
    CHECK(sigaction(SIGUSR2, &si, NULL) == 0, "SA_SIGINFO");
    raise(SIGUSR2);
    CHECK(sigaction(SIGUSR2, NULL, &back) == 0, "read back");
    say("SA_SIGINFO handler gets its info %d; reads back %d", info_ok, back.sa_sigaction == on_info);

    /* The kernel never restarts a socket call that has a timeout: a blocked write with
     * SO_SNDTIMEO ends with EINTR even after a handler with SA_RESTART. */
    handle(SIGALRM, on_sig, SA_RESTART);
    struct timeval tmo = {3, 0};
    CHECK(setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tmo, sizeof tmo) == 0, "SO_SNDTIMEO");
    int fl = fcntl(c, F_GETFL);
    CHECK(fcntl(c, F_SETFL, fl | O_NONBLOCK) == 0, "nonblocking");
    static char fill_buf[65536];
    size_t filled = 0;
    for (ssize_t w; (w = write(c, fill_buf, sizeof fill_buf)) > 0;) filled += (size_t)w;
    CHECK(fcntl(c, F_SETFL, fl) == 0, "blocking");
    hits = 0;
    timer_ms(150);
    double t0 = now_ms();
    r = write(c, fill_buf, sizeof fill_buf);
    if (r > 0) filled += (size_t)r;
    say("blocked write with SO_SNDTIMEO, handler with SA_RESTART: r=%zd EINTR %d before the timeout %d, handler ran %d", r,
        r < 0 && errno == EINTR, now_ms() - t0 < 2500, hits);
    /* Drain what was queued, so the connection is usable again. */
    size_t drained = 0;
    static char sink[65536];
    while (drained < filled) {
        ssize_t k = read(s, sink, sizeof sink);
        CHECK(k > 0, "drain");
        drained += (size_t)k;
    }
    /* A negative receive timeout has passed already: a read never blocks. */
    struct timeval neg = {-1, 0};
    CHECK(setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &neg, sizeof neg) == 0, "SO_RCVTIMEO");
    t0 = now_ms();
    r = read(c, &b, 1);
    say("read with a negative SO_RCVTIMEO: r=%zd EAGAIN %d at once %d", r, r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK),
        now_ms() - t0 < 2000);
    struct timeval none = {0, 0};
    CHECK(setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof none) == 0, "SO_RCVTIMEO off");

    write_all(s, "y", 1);
    r = read(c, &b, 1);
    say("the connection still carries data: %zd %c", r, b);
    close(c);
    close(s);
    say("done");
    return 0;
}
