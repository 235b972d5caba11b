/* An epoll instance shared across fork (the kernel keeps one set of registrations for both
 * processes): the child waits on the inherited instance and is woken by data for the
 * parent's connection; after the child closes its copy of the socket the registration
 * still reports (the parent holds the file); the parent reads the rest of the stream in
 * order; a change the parent makes (EPOLL_CTL_MOD) is what the child's wait reports. */
#include "common.h"
#include <sys/epoll.h>

static int wait1(int ep, struct epoll_event *out) {
    int r;
    do r = epoll_wait(ep, out, 1, 5000);
    while (r < 0 && errno == EINTR);
    return r;
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    int c, s;
    local_pair(&c, &s);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 55}, out;
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev) == 0, "epoll_ctl");
    int rep[2], go[2];
    CHECK(pipe(rep) == 0 && pipe(go) == 0, "pipe");
    fflush(stdout);
    pid_t k = fork();
    CHECK(k >= 0, "fork");
    if (k == 0) {
        char res[4] = "NNNN", b[8];
        int r = wait1(ep, &out);
        res[0] = r == 1 && out.data.u64 == 55 ? 'Y' : 'N';
        res[1] = read(s, b, 5) == 5 && memcmp(b, "hello", 5) == 0 ? 'Y' : 'N';
        close(s);
        r = wait1(ep, &out);
        res[2] = r == 1 && out.data.u64 == 55 ? 'Y' : 'N';
        CHECK(write(rep[1], res, 3) == 3, "report");
        char g;
        CHECK(read(go[0], &g, 1) == 1, "go");
        r = wait1(ep, &out);
        res[3] = r == 1 && out.data.u64 == 66 && (out.events & EPOLLOUT) ? 'Y' : 'N';
        CHECK(write(rep[1], res + 3, 1) == 1, "report");
        _exit(0);
    }
    msleep(200);
    write_all(c, "hello", 5);
    msleep(300);
    write_all(c, "world", 5);
    char res[4];
    read_exact(rep[0], res, 3);
    say("the child's wait on the inherited instance is woken: %c; it reads the first message: %c", res[0], res[1]);
    say("after the child closed its copy, the registration still reports: %c", res[2]);
    char b[8];
    ssize_t r = read(s, b, sizeof b);
    say("the parent reads the rest in order: %d", r == 5 && memcmp(b, "world", 5) == 0);
    ev.events = EPOLLOUT;
    ev.data.u64 = 66;
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, s, &ev) == 0, "MOD");
    CHECK(write(go[1], "g", 1) == 1, "go");
    read_exact(rep[0], res + 3, 1);
    say("the parent's change is what the child's wait reports: %c", res[3]);
    int st;
    CHECK(waitpid(k, &st, 0) == k, "waitpid");
    write_all(s, "back", 4);
    read_exact(c, b, 4);
    say("the connection still works both ways: %d", memcmp(b, "back", 4) == 0);
    close(s);
    r = read(c, b, sizeof b);
    say("EOF after the last close: %d", r == 0);
    close(c);
    close(ep);
    say("done");
    return 0;
}
