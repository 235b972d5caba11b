/* A connection whose first exchange is made by a forked child of the connecting process (the
 * child reads the listener's claim and exits); the parent goes on with it, in both
 * directions, and half-closes it, as over TCP. Client and server are one process here, so
 * the server's end is served only when the program itself calls. */
#include "common.h"

/* The same with the server in another process, which answers and closes at once: the
 * connecting parent, whose child sent the request and exited, reads the whole answer, then
 * EOF (an HTTP/1.0 exchange). */
static void answering_server(int l) {
    int c = accept_one(l);
    char b[10];
    read_exact(c, b, sizeof b);
    static char reply[3000];
    memset(reply, 'a', sizeof reply);
    write_all(c, reply, sizeof reply);
    close(c);
}

static void forking_client(int port) {
    int s = connect_to(0, port, 0);
    pid_t pid = fork();
    CHECK(pid >= 0, "fork");
    if (pid == 0) {
        write_all(s, "GET /x 1.0", 10);
        _exit(0);
    }
    int st;
    waitpid(pid, &st, 0);
    static char in[4000];
    size_t got = 0;
    ssize_t r;
    while ((r = read(s, in + got, sizeof in - got)) > 0) got += (size_t)r;
    say("client: the child's request answered: %zu bytes, then EOF %d", got, r == 0);
    close(s);
}

int main(void) {
    pair(0, answering_server, forking_client);
    int port;
    int l = listen_any(0, &port);
    int s = connect_to(0, port, 0);
    int c = accept_one(l);
    fflush(stdout);
    pid_t pid = fork();
    CHECK(pid >= 0, "fork");
    if (pid == 0) {
        write_all(s, "from-child", 10);
        char b[8];
        read_exact(s, b, 8);
        _exit(memcmp(b, "to-child", 8) == 0 ? 0 : 1);
    }
    char b[16];
    read_exact(c, b, 10);
    say("server: child's request %.10s", b);
    write_all(c, "to-child", 8);
    int st;
    waitpid(pid, &st, 0);
    say("child: answer intact %d", WIFEXITED(st) && WEXITSTATUS(st) == 0);
    /* The parent now: request, answer, then a half-close and a last answer. */
    for (int i = 0; i < 3; i++) {
        write_all(s, "parent", 6);
        read_exact(c, b, 6);
        write_all(c, "answer", 6);
        read_exact(s, b, 6);
        say("parent: round %d answer %.6s", i, b);
    }
    CHECK(shutdown(s, SHUT_WR) == 0, "shutdown");
    say("server: EOF after the half-close %d", read(c, b, 1) == 0);
    write_all(c, "last", 4);
    read_exact(s, b, 4);
    say("parent: after the half-close %.4s", b);
    close(c);
    say("parent: EOF %d", read(s, b, 1) == 0);
    close(s);
    close(l);
    return 0;
}
