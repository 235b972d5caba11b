/* fork: a child that only closes inherited descriptors (a background save) does not end the
 * connection; a forked child can take the connection over; pre-forked workers accept. */
#include "common.h"

static void client(int port) {
    /* 1: request/response while the server forks a child that closes everything. */
    int s = connect_to(0, port, 0);
    char b[32];
    for (int i = 0; i < 50; i++) {
        write_all(s, "ping", 4);
        read_exact(s, b, 4);
        CHECK(memcmp(b, "pong", 4) == 0, "pong");
    }
    /* 2: the next bytes come from a child, then from the parent again. */
    read_exact(s, b, 11);
    say("client: got %.11s", b);
    write_all(s, "bye", 3);
    CHECK(read(s, b, 1) == 0, "EOF");
    close(s);
    /* 3: a connection handled by a forked child after the parent closed its copy. */
    s = connect_to(0, port, 0);
    write_all(s, "hello", 5);
    read_exact(s, b, 5);
    say("client: forked handler answered %.5s", b);
    CHECK(read(s, b, 1) == 0, "EOF");
    close(s);
    /* 4: two pre-forked workers each accept one. */
    int a = connect_to(0, port, 0), c = connect_to(0, port, 0);
    write_all(a, "A", 1);
    write_all(c, "C", 1);
    read_exact(a, b, 2);
    read_exact(c, b + 2, 2);
    say("client: workers answered %.2s and %.2s", b, b + 2);
    close(a);
    close(c);
}

static void server(int l) {
    int c = accept_one(l);
    char b[8];
    for (int i = 0; i < 50; i++) {
        read_exact(c, b, 4);
        if (i == 10) {
            pid_t p = fork();
            CHECK(p >= 0, "fork");
            if (p == 0) {
                /* Like a background save: close inherited descriptors, work, exit. */
                close(c);
                close(l);
                msleep(50);
                exit(0);
            }
            waitpid(p, NULL, 0);
        }
        write_all(c, "pong", 4);
    }
    say("server: request/response survived a child closing its copy");
    pid_t p = fork();
    CHECK(p >= 0, "fork");
    if (p == 0) {
        write_all(c, "child", 5);
        _exit(0);
    }
    waitpid(p, NULL, 0);
    write_all(c, "parent", 6);
    read_exact(c, b, 3);
    say("server: parent and child wrote in turn, then read %.3s", b);
    close(c);

    c = accept_one(l);
    p = fork();
    CHECK(p >= 0, "fork");
    if (p == 0) {
        close(l);
        read_exact(c, b, 5);
        write_all(c, b, 5);
        close(c);
        _exit(0);
    }
    close(c);
    waitpid(p, NULL, 0);
    say("server: the parent closed its copy; the child handled the connection");

    pid_t w[2];
    for (int i = 0; i < 2; i++) {
        w[i] = fork();
        CHECK(w[i] >= 0, "fork");
        if (w[i] == 0) {
            int x = accept_one(l);
            char ch;
            read_exact(x, &ch, 1);
            char out[2] = {ch, (char)('0' + 1)};
            write_all(x, out, 2);
            close(x);
            _exit(0);
        }
    }
    for (int i = 0; i < 2; i++) {
        int st;
        waitpid(w[i], &st, 0);
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "worker");
    }
    say("server: two pre-forked workers accepted one connection each");
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    pair(0, server, client);
    say("done");
    return 0;
}
